"""Find, start and stop the per-user daemon, as Gradle and Bazel clients do.

A client that finds no daemon on the configured socket starts one in the background
(``python -m millstream daemon`` in a session of its own, so it outlives the client and
ignores the terminal's Ctrl-C) and waits until it answers ``/v1/health``. Two clients
starting at once serialise on ``fcntl.flock`` of ``<socket>.lock`` and the second one
finds the first one's daemon; the daemon itself must not take that lock, because the
client holds it while it waits for the daemon to answer.

Settings given on the command line (``--socket``, ``--datastore-root``, ...) reach the
daemon as ``MILLSTREAM_<SECTION>_<KEY>`` variables, the layer just below them, so the
daemon this client starts is the one it then talks to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import millstream
from millstream.client.http import DaemonClient
from millstream.config.settings import Settings, describe
from millstream.errors import ApiError, MillstreamError

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.02
LOG_TAIL_LINES = 20


class DaemonControlError(MillstreamError):
    """The daemon could not be started or stopped."""


def log_path(settings: Settings) -> Path:
    """Where a daemon started by a client writes its stdout and stderr."""
    return Path(settings.daemon.state_dir) / "daemon.log"


def daemon_env(settings: Settings, env: Mapping[str, str]) -> dict[str, str]:
    """The environment of a daemon this client starts: ``env`` plus its command-line settings."""
    child = dict(env)
    for key, value, source in describe(settings):
        if source == "command line":
            section, _, name = key.partition(".")
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            child[f"MILLSTREAM_{section.upper()}_{name.upper()}"] = text
    # The daemon must run this very millstream, even from a checkout that is not installed.
    source_root = str(Path(millstream.__file__).resolve().parent.parent)
    paths = [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p]
    if source_root not in paths:
        child["PYTHONPATH"] = os.pathsep.join([source_root, *paths])
    return child


def ensure_daemon(settings: Settings, env: Mapping[str, str]) -> DaemonClient:
    """A client of the daemon on the configured socket, starting one if none answers."""
    client = DaemonClient(settings.daemon.socket)
    if client.health() is not None:
        return client
    socket_path = Path(settings.daemon.socket)
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(socket_path.with_name(socket_path.name + ".lock")):
        # Whoever held the lock before us may have started it already.
        if client.health() is not None:
            return client
        remove_stale_socket(socket_path)
        process = _spawn(settings, env)
        _wait_until_healthy(client, process, settings)
    return client


def remove_stale_socket(socket_path: Path) -> bool:
    """Delete a socket file that nothing listens on; True if one was removed."""
    try:
        mode = socket_path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise DaemonControlError(
            f"{socket_path} exists and is not a socket; remove it or set daemon.socket elsewhere")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
    except ConnectionRefusedError:
        socket_path.unlink(missing_ok=True)
        return True
    except FileNotFoundError:
        return False
    finally:
        probe.close()
    return False


def stop_daemon(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Send SIGTERM to the daemon and wait until it stops answering; its pid, or None if none ran."""
    client = DaemonClient(settings.daemon.socket)
    health = client.health()
    if health is None:
        return None
    pid = int(health["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return pid
    except PermissionError:
        raise DaemonControlError(
            f"the daemon on {settings.daemon.socket} (pid {pid}) belongs to another user; "
            "stop it the way it was started (systemctl stop millstream)") from None
    if not _poll(lambda: not _answers(client), timeout_s):
        raise DaemonControlError(
            f"the daemon (pid {pid}) still answers {timeout_s:.0f} s after SIGTERM; "
            f"see {log_path(settings)}")
    return pid


def daemon_status(settings: Settings) -> dict[str, Any] | None:
    """The daemon's health plus its socket and log, or None when no daemon answers."""
    health = DaemonClient(settings.daemon.socket).health()
    if health is None:
        return None
    return {**health, "socket": settings.daemon.socket, "log": str(log_path(settings))}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _spawn(settings: Settings, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    log = log_path(settings)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # The daemon gets its own file descriptor; ours can close as soon as it has started.
        return subprocess.Popen(
            [sys.executable, "-m", "millstream", "daemon"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=daemon_env(settings, env), cwd=log.parent, start_new_session=True,
        )


def _wait_until_healthy(client: DaemonClient, process: subprocess.Popen[bytes],
                        settings: Settings) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise DaemonControlError(
                f"the millstream daemon exited with code {process.returncode} before it "
                f"answered on {settings.daemon.socket}.{_log_tail(settings)}")
        try:
            return client.health() is not None
        except ApiError:
            return False  # listening but not serving yet: keep waiting

    if not _poll(ready, START_TIMEOUT_S):
        raise DaemonControlError(
            f"the millstream daemon (pid {process.pid}) did not answer on "
            f"{settings.daemon.socket} within {START_TIMEOUT_S:.0f} s.{_log_tail(settings)}")


def _answers(client: DaemonClient) -> bool:
    try:
        return client.health() is not None
    except ApiError:
        return True  # something still holds the socket, if only to shut down


def _poll(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)


def _log_tail(settings: Settings) -> str:
    log = log_path(settings)
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        lines = []
    tail = "".join(f"\n    {line}" for line in lines)
    return f" Its log is {log}" + (f"; it ends with:{tail}" if tail else ".")
