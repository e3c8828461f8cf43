"""The two systemd protocols the daemon speaks: readiness notification and socket activation.

Both are tiny and stable, so they are spoken directly rather than through libsystemd
bindings (``sd_notify(3)``, ``sd_listen_fds(3)``):

- :class:`Notifier` sends ``READY=1``, ``STOPPING=1`` and ``STATUS=...`` datagrams to
  ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace) for a
  ``Type=notify`` unit. Without ``$NOTIFY_SOCKET`` (not under systemd) it does nothing.
- :func:`listen_fds` takes the listening sockets systemd passes a socket-activated
  service: ``$LISTEN_FDS`` descriptors from fd 3 on, meant for this process only when
  ``$LISTEN_PID`` is our pid.

Both read their variables once and remove them from the environment they were given,
so task processes started later neither inherit the descriptors' meaning nor can talk
to systemd in the daemon's name.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import structlog

log = structlog.get_logger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to the service manager; a no-op when not run by systemd."""

    def __init__(self, environ: MutableMapping[str, str]) -> None:
        address = environ.pop("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            # Abstract namespace: the name starts with a NUL byte instead of '@'.
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        elif address:
            log.warning("notify_socket_ignored", address=address, reason="neither a path nor @abstract")

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(states).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            # The manager going away must never take the daemon down with it.
            log.warning("sd_notify_failed", error=str(exc), states=list(states))
            return False
        return True

    def ready(self, status: str) -> bool:
        """``READY=1``: the socket serves requests."""
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "stopping") -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """``STATUS=...``: one line ``systemctl status`` shows."""
        return self.notify(f"STATUS={status}")


def sd_notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send one notification without keeping a :class:`Notifier` (leaves the environment alone)."""
    env = dict(os.environ if environ is None else environ)
    return Notifier(env).notify(state)


def listen_fds(environ: MutableMapping[str, str], *, pid: int | None = None) -> list[socket.socket]:
    """The listening sockets passed by socket activation, or ``[]``; unsets the variables.

    The descriptors are made close-on-exec, so task processes do not inherit them.
    """
    raw_pid = environ.pop("LISTEN_PID", None)
    raw_fds = environ.pop("LISTEN_FDS", None)
    names = environ.pop("LISTEN_FDNAMES", None)
    if raw_pid is None or raw_fds is None:
        return []
    try:
        target, count = int(raw_pid), int(raw_fds)
    except ValueError:
        log.warning("listen_fds_ignored", listen_pid=raw_pid, listen_fds=raw_fds, reason="not integers")
        return []
    if target != (os.getpid() if pid is None else pid):
        # Meant for another process (we were started by one that was activated).
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    log.info("listen_fds", count=len(sockets), names=names)
    return sockets


def unix_listener(sockets: list[socket.socket]) -> socket.socket | None:
    """The first listening ``AF_UNIX`` stream socket among ``sockets``; the others are closed."""
    chosen = None
    for sock in sockets:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if chosen is None and sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM and listening:
            chosen = sock
            continue
        log.warning("listen_fd_unused", fd=sock.fileno(), family=sock.family.name, type=sock.type.name)
        sock.close()
    return chosen
