"""What a daemon serving several users sets up before it serves.

A per-user daemon (no ``daemon.socket_group``) keeps its socket at mode 0600: only
its own user reaches it, so every run is that user's and tasks run as the daemon.

A shared daemon (``daemon.socket_group = "team"``) makes the socket 0660 of that
group, and when it may switch uids (root, or ``CAP_SETUID`` + ``CAP_SETGID``) and
``daemon.run_tasks_as = "owner"`` it runs each task as the run's owner. Those tasks
write the local datastore and their log files themselves, so the datastore root and
the daemon's ``logs``, ``spool`` and ``packages`` folders become set-group-id
folders of the team's group, and the daemon's umask is ``0007``: whatever anyone
writes there stays readable and writable by the group, which is also who may read
every run through the API.
"""

from __future__ import annotations

import contextlib
import grp
import os
from dataclasses import dataclass
from pathlib import Path

from millstream.compute.runas import TASK_UMASK, can_switch_users, prepare_shared_dir
from millstream.config.settings import Settings
from millstream.errors import ConfigError


def group_id(settings: Settings, key: str, name: str) -> int:
    """The gid of the group a setting names; a ConfigError naming the setting if none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        source = settings.sources.get(f"daemon.{key}", "default")
        raise ConfigError(f"{source}: daemon.{key} names group {name!r}, which does not exist") from None


@dataclass(frozen=True)
class SharedHost:
    """How this daemon shares itself: the socket's group, and whether tasks switch uids."""

    socket_gid: int | None
    run_as_owner: bool
    shared_gid: int
    reachable_by_others: bool = False  # a socket group or a TCP listener

    @classmethod
    def from_settings(cls, settings: Settings) -> SharedHost:
        """Resolve the groups (failing on unknown ones) and the daemon's powers."""
        daemon = settings.daemon
        socket_gid = group_id(settings, "socket_group", daemon.socket_group) if daemon.socket_group else None
        if daemon.admin_group:
            group_id(settings, "admin_group", daemon.admin_group)
        run_as_owner = daemon.run_tasks_as == "owner" and can_switch_users()
        return cls(socket_gid=socket_gid, run_as_owner=run_as_owner,
                   shared_gid=socket_gid if socket_gid is not None else os.getegid(),
                   reachable_by_others=socket_gid is not None or bool(daemon.tcp_listen))

    def prepare_dirs(self, settings: Settings) -> None:
        """Make the folders tasks write shared by the group.

        Only when tasks switch uids and someone else can reach the daemon: a per-user
        daemon's folders keep the modes they have.
        """
        if not (self.run_as_owner and self.reachable_by_others):
            return
        os.umask(TASK_UMASK)
        state = Path(settings.daemon.state_dir)
        shared = [state / "logs", state / "spool", state / "packages"]
        if settings.datastore.type == "local":
            shared.append(Path(settings.datastore.root))
        for path in shared:
            prepare_shared_dir(str(path), self.shared_gid)
        # Tasks only need to pass through the state folder, not list it.
        st = state.stat()
        with contextlib.suppress(PermissionError):
            if st.st_gid != self.shared_gid:
                os.chown(state, -1, self.shared_gid)
            os.chmod(state, (st.st_mode & 0o7777) | 0o010)

    def secure_socket(self, path: str) -> None:
        """0600 for the daemon's user alone, or 0660 of ``daemon.socket_group``."""
        if self.socket_gid is None:
            os.chmod(path, 0o600)
            return
        os.chown(path, -1, self.socket_gid)
        os.chmod(path, 0o660)
        parent = Path(path).parent
        st = parent.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & 0o011:
            # A folder we made for the socket (0700): let the group through, no one else.
            os.chown(parent, -1, self.socket_gid)
            os.chmod(parent, (st.st_mode & 0o7777) | 0o010)
