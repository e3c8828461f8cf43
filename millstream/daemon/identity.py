"""Who is calling, and what they may do to a run.

Identity never comes from a request's body. On the Unix socket it is the uid the
kernel reports for the peer (``SO_PEERCRED``); on the optional TCP listener it is the
user a bearer token maps to in ``daemon.tokens_file``.

Permissions follow the shared host's purpose, collaboration: every caller may read
every run, its events, logs and artifacts. Changing a run (cancel, resume from it,
tag it) is for its owner, root, the daemon's own account, and members of
``daemon.admin_group``. A refusal names the owner, so the caller knows whom to ask.
"""

from __future__ import annotations

import grp
import hmac
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from millstream.errors import ConfigError


@dataclass(frozen=True)
class Caller:
    """The account a request acts for."""

    uid: int
    name: str
    via: str  # "socket" (SO_PEERCRED) or "token" (TCP bearer token)


def user_name(uid: int) -> str:
    """The account name of ``uid``, or the number when the account is unknown."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_uid(name: str) -> int | None:
    """The uid of account ``name``, or None."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def in_group(name: str, group: str) -> bool:
    """Whether account ``name`` belongs to ``group`` (as a primary or supplementary group)."""
    try:
        entry = pwd.getpwnam(name)
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    return gid in os.getgrouplist(name, entry.pw_gid)


@dataclass(frozen=True)
class Authority:
    """Decides who may change a run."""

    admin_group: str = ""
    daemon_uid: int = -1
    # False for a daemon that would have to run other users' tasks as its own account
    # without being told to (see submit_refusal).
    runs_others_tasks: bool = True

    def is_admin(self, caller: Caller) -> bool:
        """Root, the daemon's own account, or a member of the admin group."""
        if caller.uid in (0, self.daemon_uid):
            return True
        return bool(self.admin_group) and in_group(caller.name, self.admin_group)

    def submit_refusal(self, caller: Caller) -> str | None:
        """Why ``caller`` may not start runs here; None when allowed.

        A daemon that cannot switch uids runs every task as its own account. That is
        the operator's choice with ``daemon.run_tasks_as = "daemon"`` (a service
        account); otherwise another user's code would run as the daemon's user, so
        their runs are refused.
        """
        if self.runs_others_tasks or caller.uid in (self.daemon_uid, 0):
            return None
        return (f"this daemon runs as {user_name(self.daemon_uid)} and cannot run tasks as {caller.name} "
                "(it has neither root nor CAP_SETUID and CAP_SETGID); start your own daemon, or ask its "
                "operator to set daemon.run_tasks_as = \"daemon\"")

    def refusal(self, caller: Caller, action: str, what: str, owner: str, owner_uid: int | None) -> str | None:
        """Why ``caller`` may not ``action`` ``what`` owned by ``owner``; None when allowed.

        ``owner_uid`` is compared when known (a renamed account keeps its runs);
        records that carry only a name are compared by name.
        """
        if owner_uid is not None and owner_uid >= 0:
            if caller.uid == owner_uid:
                return None
        elif caller.name == owner:
            return None
        if self.is_admin(caller):
            return None
        admins = f" or a member of group {self.admin_group!r}" if self.admin_group else ""
        return f"only {owner} (the owner){admins} may {action} {what}; you are {caller.name}"


# --------------------------------------------------------------------- bearer tokens
MIN_TOKEN_CHARS = 16


def load_tokens(path: str) -> dict[str, str]:
    """``token -> user`` from a file of ``TOKEN = USER`` lines (``#`` comments).

    The file must not be readable by group or others: a token is a password.
    """
    file = Path(path)
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the tokens file: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: the tokens file is mode {stat.S_IMODE(mode):04o}; it must be 0600 "
                          f"(chmod 600 {path})")
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        token, sep, user = (part.strip() for part in line.partition("="))
        if not sep or not token or not user:
            raise ConfigError(f"{path}:{number}: expected 'TOKEN = USER'")
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{path}:{number}: a token must have at least {MIN_TOKEN_CHARS} characters")
        if user_uid(user) is None:
            raise ConfigError(f"{path}:{number}: no account named {user!r} on this host")
        if token in tokens:
            raise ConfigError(f"{path}:{number}: this token is already given to {tokens[token]}")
        tokens[token] = user
    return tokens


def token_caller(tokens: dict[str, str], header: str | None) -> Caller | None:
    """The caller an ``Authorization: Bearer TOKEN`` header stands for, or None."""
    if not header:
        return None
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    presented_bytes = presented.strip().encode()
    user = None
    # Compare against every token, in constant time each, so timing tells nothing.
    for token, name in tokens.items():
        if hmac.compare_digest(token.encode(), presented_bytes):
            user = name
    if user is None:
        return None
    uid = user_uid(user)
    return None if uid is None else Caller(uid=uid, name=user, via="token")
