"""``python -m millstream.daemon``: the daemon alone, configured from the environment."""

import os
import sys

from millstream.config.settings import load_settings
from millstream.daemon.main import run_daemon
from millstream.errors import ConfigError

try:
    settings = load_settings(os.environ)
except ConfigError as exc:
    print(f"millstream daemon: {exc}", file=sys.stderr)
    sys.exit(2)
sys.exit(run_daemon(settings))
