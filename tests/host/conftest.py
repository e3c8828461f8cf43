"""Fixtures of the shared-host tests: one daemon per module where tests only read."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, Daemon, _kill_leftovers
from tests.e2e.helpers import run_flow


@dataclass
class Shared:
    """A daemon shared by a module, with one finished HelloFlow run."""

    daemon: Daemon
    run_id: str


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    """Started once per module; tests must leave it as they found it (or clean up)."""
    root = Path(tempfile.mkdtemp(prefix="ms-h-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
    env.update(
        MILLSTREAM_DAEMON_SOCKET=str(root / "d.sock"),
        MILLSTREAM_DATASTORE_ROOT=str(root / "ds"),
        MILLSTREAM_DAEMON_STATE_DIR=str(root / "state"),
        MILLSTREAM_DATASTORE_DURABLE="false",
        MILLSTREAM_CONFIG=str(root / "config.toml"),
        MILLSTREAM_DAEMON_MAX_BODY_MB="4",
        PYTHONUNBUFFERED="1",
    )
    d = Daemon(root=root, env=env)
    d.start()
    try:
        run_id, proc = run_flow(d, EXAMPLES / "hello.py")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield Shared(d, run_id)
    finally:
        if d.proc is not None:
            with contextlib.suppress(Exception):
                d.stop(signal.SIGKILL, 10)
        _kill_leftovers(root)
        shutil.rmtree(root, ignore_errors=True)
