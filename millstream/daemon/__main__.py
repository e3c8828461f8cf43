"""``python -m millstream.daemon``: the daemon alone, configured from the environment."""

import os
import sys

from millstream.config.settings import load_settings
from millstream.daemon.main import run_daemon

sys.exit(run_daemon(load_settings(os.environ)))
