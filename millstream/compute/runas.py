"""Running a task process as the user who submitted its run.

On a shared host the daemon runs as root or as a service account holding only
``CAP_SETUID`` and ``CAP_SETGID`` (``systemd/millstream.service``). A local attempt
(or the zygote that forks a code package's attempts) must then run as the run's
owner, so that user code can do no more than its author could.

The switch happens in a tiny stdlib-only program, this file run as a script
(``python -I runas.py ...``), started by the daemon and replacing itself with the
task's interpreter: it clears the ambient capabilities, calls ``setgroups``,
``setresgid`` and ``setresuid``, checks that no way back to the old ids remains,
sets the umask, enters the working directory as the new user, and ``execve``\\ s. A
separate program rather than ``preexec_fn`` because the daemon runs threads
(``asyncio.to_thread``) and code between ``fork`` and ``exec`` must not take locks;
rather than ``subprocess``'s ``user=`` because that cannot clear ambient
capabilities, which a non-root daemon's child would otherwise keep across ``exec``
(and with ``CAP_SETUID`` could become root); the switch then empties the other
capability sets too. Never ``sudo``/``runuser``: the unit's
``NoNewPrivileges=yes`` forbids gaining privileges through ``execve``.

The environment is clean: the daemon's own (``NOTIFY_SOCKET``, its ``HOME``,
settings) never reaches the task. It is the submission's environment with the
user's ``HOME``, ``USER``, ``LOGNAME`` and ``SHELL`` from the password database.

The umask is ``0007``: artifacts, records and logs are written into the shared
directories with their group (set-group-id directories made by the daemon, see
:func:`prepare_shared_dir`), so the daemon and the other members of the group read
them, and others nothing.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import sys
from collections.abc import Mapping
from dataclasses import dataclass

CAP_SETGID = 6
CAP_SETUID = 7
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
TASK_UMASK = 0o007
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class TaskUser:
    """The account a task runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str
    shell: str

    @classmethod
    def of(cls, uid: int) -> TaskUser:
        """The account ``uid`` from the password database (KeyError if there is none)."""
        entry = pwd.getpwuid(uid)
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
        return cls(uid=uid, gid=entry.pw_gid, groups=groups, name=entry.pw_name,
                   home=entry.pw_dir, shell=entry.pw_shell or "/bin/sh")

    def environment(self, submitted: Mapping[str, str]) -> dict[str, str]:
        """The task's environment: the submission's, with this account's identity."""
        env = {"PATH": DEFAULT_PATH, **submitted}
        env.update(HOME=self.home, USER=self.name, LOGNAME=self.name, SHELL=self.shell)
        return env

    def command(self, argv: list[str], *, cwd: str, fallback_cwd: str) -> list[str]:
        """``argv`` prefixed by the switch to this account (run with the daemon's interpreter)."""
        return [sys.executable, "-I", __file__, str(self.uid), str(self.gid),
                ",".join(map(str, self.groups)), cwd, fallback_cwd, "--", *argv]


def _effective_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def can_switch_users() -> bool:
    """Whether this process may take other uids: root, or both capabilities held."""
    if os.geteuid() == 0:
        return True
    caps = _effective_caps()
    return bool(caps & (1 << CAP_SETUID)) and bool(caps & (1 << CAP_SETGID))


def prepare_shared_dir(path: str, gid: int) -> None:
    """Make ``path`` a set-group-id directory of group ``gid``, writable by the group.

    Files and folders tasks create below it inherit the group (and folders the
    set-group-id bit), whichever account writes them.
    """
    os.makedirs(path, exist_ok=True)
    st = os.stat(path)
    if st.st_gid != gid:
        os.chown(path, -1, gid)
    if st.st_mode & 0o2770 != 0o2770:
        # Under systemd (RestrictSUIDSGID=yes) tmpfiles makes these folders right beforehand.
        os.chmod(path, (st.st_mode & 0o7777) | 0o2770)


# --------------------------------------------------------------------- the switch
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _drop_all_capabilities(libc: ctypes.CDLL) -> None:
    """Empty the effective, permitted and inheritable sets of this process.

    Switching from root to another uid clears them by itself; switching from a
    non-root account that holds CAP_SETUID does not, and the process would keep the
    power to become root until ``execve``.
    """
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _switch(uid: int, gid: int, groups: list[int]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # Fails with EINVAL on kernels before 4.3, which have no ambient capabilities to clear.
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0:
        _drop_all_capabilities(libc)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"the switch to uid {uid} gid {gid} did not take")
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PermissionError("the task could go back to root after switching")


def main(argv: list[str]) -> int:
    """``runas.py UID GID GROUPS CWD FALLBACK_CWD -- PROGRAM ARGS...``."""
    try:
        sep = argv.index("--")
        uid, gid, groups, cwd, fallback = argv[:sep]
        program = argv[sep + 1:]
        if not program:
            raise ValueError("no program")
        group_ids = [int(g) for g in groups.split(",") if g]
        _switch(int(uid), int(gid), group_ids)
    except (ValueError, OSError) as exc:
        print(f"millstream runas: cannot switch user: {exc}", file=sys.stderr)
        return 126
    os.umask(TASK_UMASK)
    for directory in (cwd, fallback):
        try:
            os.chdir(directory)
            break
        except OSError:
            continue
    try:
        os.execve(program[0], program, dict(os.environ))
    except OSError as exc:
        print(f"millstream runas: cannot run {program[0]}: {exc}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover - execve does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
