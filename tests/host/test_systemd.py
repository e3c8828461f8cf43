"""Socket activation and readiness: the daemon as systemd runs it, without systemd.

The test plays the service manager: it makes the listening socket and a notification
socket, starts ``python -m millstream.daemon`` with ``LISTEN_FDS``/``LISTEN_PID`` and
``NOTIFY_SOCKET`` as systemd sets them, and reads the datagrams the daemon sends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from millstream.daemon import systemd
from tests.conftest import Daemon

# Put the listening socket on fd 3 and make LISTEN_PID this process's pid, which
# exec keeps: the pid must be the daemon's own, as systemd does after its fork.
_EXEC_AS_ACTIVATED = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='millstream.socket')\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'millstream.daemon'])\n"
)


class Manager:
    """The service manager's side: a listening socket and a notification socket."""

    def __init__(self, root: Path) -> None:
        self.listen_path = str(root / "activated.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.listen_path)
        self.listener.listen(64)
        # The abstract namespace, as systemd uses: '@' in the variable, NUL on the wire.
        self.notify_name = f"@millstream-test-{uuid.uuid4().hex}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(b"\0" + self.notify_name[1:].encode())
        self.notify.settimeout(30)

    def start(self, d: Daemon) -> subprocess.Popen[bytes]:
        """Start the daemon as socket-activated and notify-typed."""
        env = {**d.env, "NOTIFY_SOCKET": self.notify_name}
        d.starts += 1
        log = d.root / f"daemon-{d.starts}.log"
        d.logs.append(log)
        with open(log, "wb") as out:
            d.proc = subprocess.Popen(
                [sys.executable, "-c", _EXEC_AS_ACTIVATED, str(self.listener.fileno())],
                env=env,
                pass_fds=[self.listener.fileno()],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return d.proc

    def next_message(self) -> dict[str, str]:
        """The next notification, as a dict of its KEY=value lines."""
        data = self.notify.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def wait_for(self, key: str) -> dict[str, str]:
        """Read notifications until one carries ``key``."""
        while True:
            message = self.next_message()
            if key in message:
                return message

    def close(self) -> None:
        """Close both sockets."""
        self.listener.close()
        self.notify.close()


@pytest.fixture
def manager(daemon_factory: Callable[..., Daemon]) -> Iterator[tuple[Manager, Daemon]]:
    """A daemon (not started) whose own socket path is never used, and its manager."""
    d = daemon_factory()
    # Where the daemon would bind if it ignored the inherited socket.
    d.env["MILLSTREAM_DAEMON_SOCKET"] = str(d.root / "must-not-exist.sock")
    m = Manager(d.root)
    yield m, d
    m.close()


def _over(path: str, d: Daemon) -> Daemon:
    """The same daemon, addressed through another socket path."""
    return Daemon(root=d.root, env={**d.env, "MILLSTREAM_DAEMON_SOCKET": path})


def test_socket_activated_daemon_reports_ready_serves_and_stops(manager: tuple[Manager, Daemon]) -> None:
    m, d = manager
    proc = m.start(d)
    ready = m.wait_for("READY")
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(proc.pid)
    assert m.listen_path in ready["STATUS"]

    status, health = _over(m.listen_path, d).request("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok"
    assert health["pid"] == proc.pid
    assert not Path(d.env["MILLSTREAM_DAEMON_SOCKET"]).exists()

    proc.send_signal(signal.SIGTERM)
    assert m.wait_for("STOPPING")["STOPPING"] == "1"
    assert proc.wait(20) == 0, d.logs[-1].read_text()
    d.proc = None


def test_the_socket_outlives_a_restart(manager: tuple[Manager, Daemon]) -> None:
    """A request sent while no daemon runs waits in the backlog and is served by the next one."""
    m, d = manager
    m.start(d)
    m.wait_for("READY")
    assert d.stop() == 0

    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.settimeout(30)
    waiting.connect(m.listen_path)  # accepted by the kernel: systemd's socket is still listening
    waiting.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    proc = m.start(d)
    m.wait_for("READY")
    reply = b""
    while chunk := waiting.recv(65536):
        reply += chunk
    waiting.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert f'"pid": {proc.pid}'.encode() in reply
    assert d.stop() == 0


# --------------------------------------------------------------------- the protocol pieces
def test_listen_fds_takes_only_fds_meant_for_this_process() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(env) == []
    assert env == {}, "the variables are unset even when the fds are not ours"
    assert systemd.listen_fds({}) == []
    assert systemd.listen_fds({"LISTEN_FDS": "one", "LISTEN_PID": str(os.getpid())}) == []


@contextmanager
def _on_fd3(sock: socket.socket) -> Iterator[None]:
    saved = os.dup(3) if _fd_open(3) else None
    os.dup2(sock.fileno(), 3)
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_listen_fds_returns_the_socket_not_inheritable(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "s"))
        listener.listen()
        with _on_fd3(listener):
            os.set_inheritable(3, True)
            env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}
            (sock,) = systemd.listen_fds(env)
            assert env == {}
            assert sock.fileno() == 3 and not os.get_inheritable(3)
            assert systemd.unix_listener([sock]) is sock
            sock.detach()  # fd 3 is restored by _on_fd3, not closed here


def test_notifier_sends_to_a_path_and_unsets_the_variable(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(path)
        sink.settimeout(5)
        env = {"NOTIFY_SOCKET": path}
        notifier = systemd.Notifier(env)
        assert env == {} and notifier.enabled
        assert notifier.status("recovering 3 runs")
        assert sink.recv(4096) == b"STATUS=recovering 3 runs"
        assert systemd.sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": path})
        assert sink.recv(4096) == b"WATCHDOG=1"


def test_notifier_without_a_manager_does_nothing(tmp_path: Path) -> None:
    assert not systemd.Notifier({}).ready("x")
    # A manager that went away must not take the daemon down.
    assert not systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).stopping()
