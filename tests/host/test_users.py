"""Several real Unix users share one daemon run by root, as on the shared host.

The module creates the accounts (``useradd``) and groups it needs and removes them
afterwards: ``ms-alice`` and ``ms-bob`` of the team group, ``ms-carol`` of the team
and the admin group. Every client command runs as one of them (``subprocess`` with
``user=``), so the daemon tells them apart by SO_PEERCRED exactly as in production.

The users run the system interpreter with the repository and this virtualenv's
packages on ``PYTHONPATH``: the virtualenv's own interpreter lives under ``/root``,
where other accounts cannot go.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Daemon, _kill_leftovers, wait_until
from tests.e2e.helpers import artifact

TEAM, ADMINS = "ms-team", "ms-admins"
USERS = {"ms-alice": [TEAM], "ms-bob": [TEAM], "ms-carol": [TEAM, ADMINS]}
SYSTEM_PYTHON = "/usr/bin/python3"

WHOAMI_FLOW = textwrap.dedent(
    '''
    import os
    import time

    from millstream import FlowSpec, Parameter, step


    class WhoAmIFlow(FlowSpec):
        sleep_s = Parameter("sleep_s", default=0.0)

        @step
        def start(self):
            self.uid = os.getuid()
            self.gid = os.getgid()
            self.groups = sorted(os.getgroups())
            self.home = os.environ.get("HOME")
            self.user = os.environ.get("USER")
            self.leaked = os.environ.get("DAEMON_ONLY_SECRET")
            self.cwd = os.getcwd()
            with open("/proc/self/status") as f:
                self.caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k.startswith("Cap")}
            with open("written-by-task.txt", "w") as f:
                f.write("hello")
            time.sleep(self.sleep_s)
            self.next(self.end)

        @step
        def end(self):
            pass


    if __name__ == "__main__":
        WhoAmIFlow()
    '''
)


def _need(tool: str) -> None:
    if shutil.which(tool) is None or os.geteuid() != 0:
        message = f"creating Unix users needs root and {tool}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _drop_accounts() -> None:
    for name in USERS:
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True, check=False)
    for group in (TEAM, ADMINS):
        subprocess.run(["groupdel", group], capture_output=True, check=False)


@dataclass
class Host:
    """The daemon (as root) and the accounts that use it."""

    daemon: Daemon
    env: dict[str, str]

    def user_env(self, name: str) -> dict[str, str]:
        """What a login shell of ``name`` would have, pointed at the shared daemon."""
        entry = pwd.getpwnam(name)
        return {
            **self.env,
            "HOME": entry.pw_dir,
            "USER": name,
            "LOGNAME": name,
        }

    def as_user(self, name: str, *args: str, cwd: str | None = None, timeout_s: float = 120
                ) -> subprocess.CompletedProcess[str]:
        """Run ``python ARGS`` as ``name`` (with its groups), in its home by default."""
        entry = pwd.getpwnam(name)
        return subprocess.run(
            [SYSTEM_PYTHON, *args],
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=os.getgrouplist(name, entry.pw_gid),
            env=self.user_env(name),
            cwd=cwd or entry.pw_dir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def popen_as(self, name: str, *args: str) -> subprocess.Popen[str]:
        """Start ``python ARGS`` as ``name`` without waiting."""
        entry = pwd.getpwnam(name)
        return subprocess.Popen(
            [SYSTEM_PYTHON, *args],
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=os.getgrouplist(name, entry.pw_gid),
            env=self.user_env(name),
            cwd=entry.pw_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def flow_file(self, name: str) -> str:
        """The WhoAmI flow in ``name``'s home, owned by ``name``."""
        entry = pwd.getpwnam(name)
        path = Path(entry.pw_dir) / "flows" / "whoami.py"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_text(WHOAMI_FLOW)
            for p in (path.parent, path):
                os.chown(p, entry.pw_uid, entry.pw_gid)
        return str(path)

    def run(self, name: str, *args: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        """``python whoami.py run ARGS`` as ``name``, from the flow's folder; (run id, process)."""
        flow = self.flow_file(name)
        id_file = Path(flow).parent / f"run-id-{len(list(Path(flow).parent.glob('run-id-*')))}"
        proc = self.as_user(name, flow, "run", "--run-id-file", str(id_file), *args, cwd=str(Path(flow).parent))
        return (id_file.read_text().strip() if id_file.exists() else ""), proc


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    """Accounts, groups, and a root daemon serving the team on a 0660 socket."""
    _need("useradd")
    _drop_accounts()
    for group in (TEAM, ADMINS):
        subprocess.run(["groupadd", group], check=True, capture_output=True)
    for name, groups in USERS.items():
        subprocess.run(["useradd", "--create-home", "--groups", ",".join(groups), name], check=True,
                       capture_output=True)
    # Readable by the team: the users walk to the socket, the datastore and the state.
    root = Path(tempfile.mkdtemp(prefix="ms-u-", dir="/tmp"))
    os.chown(root, 0, grp.getgrnam(TEAM).gr_gid)
    root.chmod(0o750)
    site = sysconfig.get_paths()["purelib"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(REPO), site]),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MILLSTREAM_DAEMON_SOCKET": str(root / "sock" / "d.sock"),
        "MILLSTREAM_DATASTORE_ROOT": str(root / "ds"),
        "MILLSTREAM_DAEMON_STATE_DIR": str(root / "state"),
        "MILLSTREAM_DATASTORE_DURABLE": "false",
        "MILLSTREAM_CONFIG": str(root / "config.toml"),
    }
    daemon_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")},
        **env,
        "MILLSTREAM_DAEMON_SOCKET_GROUP": TEAM,
        "MILLSTREAM_DAEMON_ADMIN_GROUP": ADMINS,
        "MILLSTREAM_DAEMON_LOG_FORMAT": "json",
        "DAEMON_ONLY_SECRET": "the daemon's own environment",
    }
    d = Daemon(root=root, env=daemon_env)
    d.start()
    try:
        yield Host(daemon=d, env=env)
    finally:
        if d.proc is not None:
            with contextlib.suppress(Exception):
                d.stop(signal.SIGKILL, 10)
        # The users' clients and tasks all name the root in their environment.
        _kill_leftovers(root)
        shutil.rmtree(root, ignore_errors=True)
        _drop_accounts()


def _cli(host: Host, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    return host.as_user(user, "-m", "millstream", *args)


def _api_as(host: Host, user: str, method: str, path: str, body: Any = None, *,
            socket_path: str | None = None) -> tuple[int, Any]:
    """One request over the socket from a process of ``user`` (the kernel vouches for the uid)."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from millstream.client.http import DaemonClient
        from millstream.errors import ApiError
        try:
            status, body = 200, DaemonClient({socket_path or host.daemon.socket!r}).request(
                {method!r}, {path!r}, json_body={body!r})[1]
        except ApiError as exc:
            status, body = exc.status, {{"error": exc.code, "message": exc.message}}
        print(json.dumps([status, body]))
        """
    )
    proc = host.as_user(user, "-c", script)
    assert proc.returncode == 0, proc.stderr
    status, answer = json.loads(proc.stdout)
    return status, answer


def test_the_socket_is_the_teams_and_tasks_run_as_their_owner(host: Host) -> None:
    sock = os.stat(host.daemon.socket)
    assert (sock.st_mode & 0o777, sock.st_gid) == (0o660, grp.getgrnam(TEAM).gr_gid)
    alice = pwd.getpwnam("ms-alice")
    run_id, proc = host.run("ms-alice")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = host.daemon
    assert artifact(d, "WhoAmIFlow", run_id, "start", "uid") == alice.pw_uid
    assert artifact(d, "WhoAmIFlow", run_id, "start", "gid") == alice.pw_gid
    assert grp.getgrnam(TEAM).gr_gid in artifact(d, "WhoAmIFlow", run_id, "start", "groups")
    assert artifact(d, "WhoAmIFlow", run_id, "start", "home") == "/home/ms-alice"
    assert artifact(d, "WhoAmIFlow", run_id, "start", "user") == "ms-alice"
    assert artifact(d, "WhoAmIFlow", run_id, "start", "leaked") is None, "the daemon's environment leaked"
    caps = artifact(d, "WhoAmIFlow", run_id, "start", "caps")
    assert int(caps["CapEff"], 16) == int(caps["CapPrm"], 16) == int(caps["CapAmb"], 16) == 0, caps
    # The task ran where alice ran the flow and wrote there as alice.
    written = Path(alice.pw_dir) / "flows" / "written-by-task.txt"
    assert artifact(d, "WhoAmIFlow", run_id, "start", "cwd") == str(written.parent)
    assert written.stat().st_uid == alice.pw_uid
    # What the task wrote to the datastore is alice's, in the team's group, for the daemon to read.
    done = d.datastore / "WhoAmIFlow" / run_id / "start" / "0" / "0" / "done.json"
    st = done.stat()
    assert (st.st_uid, st.st_gid) == (alice.pw_uid, grp.getgrnam(TEAM).gr_gid)
    assert st.st_mode & 0o040, "the team reads the task's records"
    state = d.run_state("WhoAmIFlow", run_id)
    assert state["owner"] == "ms-alice"


def test_bob_reads_alices_run_but_cannot_cancel_or_tag_it_and_an_admin_can(host: Host) -> None:
    flow = host.flow_file("ms-alice")
    id_file = Path(flow).parent / "run-id-long"
    id_file.unlink(missing_ok=True)
    running = host.popen_as("ms-alice", flow, "run", "--run-id-file", str(id_file), "--sleep_s", "60")
    try:
        wait_until(id_file.exists, 60)
        run_id = id_file.read_text().strip()
        path = f"/v1/runs/WhoAmIFlow/{run_id}"

        def started() -> bool:
            status, body = _api_as(host, "ms-bob", "GET", path)
            assert status == 200, body
            return any(t["step"] == "start" and t["status"] == "running" for t in body["tasks"])

        wait_until(started, 60, interval_s=0.3)
        status, body = _api_as(host, "ms-bob", "POST", f"{path}/cancel")
        assert status == 403, body
        assert body["error"] == "forbidden"
        assert "only ms-alice (the owner) or a member of group 'ms-admins'" in body["message"]
        assert body["message"].endswith("you are ms-bob")

        tag = _cli(host, "ms-bob", "tag", "add", f"WhoAmIFlow/{run_id}", "bobs-tag")
        assert tag.returncode != 0
        assert "only ms-alice (the owner)" in tag.stderr + tag.stdout
        status, body = _api_as(host, "ms-bob", "POST", f"{path}/tags", {"add": ["bobs-tag"]})
        assert status == 403 and "ms-alice" in body["message"], body

        # The owner tags her run; the admin cancels it.
        tag = _cli(host, "ms-alice", "tag", "add", f"WhoAmIFlow/{run_id}", "alices-tag")
        assert tag.returncode == 0, tag.stdout + tag.stderr
        assert "alices-tag" in host.daemon.run_state("WhoAmIFlow", run_id)["tags"]
        cancel = _cli(host, "ms-carol", "cancel", f"WhoAmIFlow/{run_id}")
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        wait_until(lambda: host.daemon.run_state("WhoAmIFlow", run_id)["status"] == "cancelled", 60)
        running.wait(60)
    finally:
        if running.poll() is None:
            running.kill()
        running.communicate()


def test_bob_cannot_resume_alices_run_but_resumes_his_own(host: Host) -> None:
    run_id, proc = host.run("ms-alice")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flow = host.flow_file("ms-bob")
    resumed = host.as_user("ms-bob", flow, "resume", "--origin-run-id", run_id, cwd=str(Path(flow).parent))
    assert resumed.returncode != 0
    assert "only ms-alice (the owner)" in resumed.stdout + resumed.stderr
    # Without an id, resume takes bob's own latest run, never alice's.
    mine, proc = host.run("ms-bob")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = host.as_user("ms-bob", flow, "resume", cwd=str(Path(flow).parent))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = host.daemon.request("GET", "/v1/runs?flow=WhoAmIFlow&owner=ms-bob")[1]["runs"]
    assert runs[0]["origin_run_id"] == mine


def test_every_daemon_log_line_is_json_and_run_events_carry_the_run(host: Host) -> None:
    run_id, proc = host.run("ms-bob")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in host.daemon.logs[-1].read_text().splitlines() if line.strip()]
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a daemon log line is not JSON: {line[:300]!r}")
    assert all("event" in e and "timestamp" in e for e in events)
    ready = next(e for e in events if e["event"] == "daemon_ready")
    assert ready["tasks_run_as"] == "owner" and ready["socket_group"] == TEAM
    mine = [e for e in events if e.get("run") == f"WhoAmIFlow/{run_id}"]
    names = {e["event"] for e in mine}
    assert {"run_submitted", "attempt_started", "attempt_finished", "run_finished"} <= names, names
    for e in mine:
        if e["event"] in ("attempt_started", "attempt_finished"):
            assert e["step"] in ("start", "end") and e["task"], e


@contextlib.contextmanager
def _service_daemon(host: Host, caps: str, **settings: str) -> Iterator[tuple[Daemon, Path]]:
    """A daemon run as an unprivileged account (ms-carol) holding ``caps`` as ambient capabilities.

    As under systemd's ``User=`` with ``AmbientCapabilities=``; ``caps`` "" holds none.
    """
    _need("setpriv")
    service = pwd.getpwnam("ms-carol")  # any unprivileged account will do for the daemon
    root = Path(tempfile.mkdtemp(prefix="ms-c-", dir="/tmp"))
    os.chown(root, service.pw_uid, grp.getgrnam(TEAM).gr_gid)
    root.chmod(0o750)
    env = {
        **host.env,
        "HOME": service.pw_dir,
        "MILLSTREAM_DAEMON_SOCKET": str(root / "d.sock"),
        "MILLSTREAM_DATASTORE_ROOT": str(root / "ds"),
        "MILLSTREAM_DAEMON_STATE_DIR": str(root / "state"),
        "MILLSTREAM_DAEMON_SOCKET_GROUP": TEAM,
        "MILLSTREAM_DAEMON_LOG_FORMAT": "json",
        **{f"MILLSTREAM_{k.upper()}": v for k, v in settings.items()},
    }
    log = root / "daemon.log"
    cap_args = [f"--inh-caps={caps}", f"--ambient-caps={caps}"] if caps else []
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            ["setpriv", f"--reuid={service.pw_uid}", f"--regid={service.pw_gid}", "--init-groups", *cap_args,
             SYSTEM_PYTHON, "-m", "millstream.daemon"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    saved = host.env
    try:
        wait_until(lambda: os.path.exists(env["MILLSTREAM_DAEMON_SOCKET"]) or daemon.poll() is not None, 30)
        assert daemon.poll() is None, log.read_text()
        host.env = {**host.env, "MILLSTREAM_DAEMON_SOCKET": env["MILLSTREAM_DAEMON_SOCKET"]}
        yield Daemon(root=root, env=env), log
    finally:
        host.env = saved
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        _kill_leftovers(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("fork", ["true", "false"])
def test_a_daemon_holding_only_setuid_and_setgid_runs_tasks_as_owners_without_capabilities(
    host: Host, fork: str
) -> None:
    """As under systemd: a service account with ambient CAP_SETUID/CAP_SETGID (and CAP_KILL).

    Both ways a task starts: forked from the owner's zygote, and a fresh interpreter.
    """
    alice = pwd.getpwnam("ms-alice")
    with _service_daemon(host, "+setuid,+setgid,+kill", local_fork=fork) as (d, log):
        run_id, proc = host.run("ms-alice")
        assert proc.returncode == 0, proc.stdout + proc.stderr + log.read_text()
        assert artifact(d, "WhoAmIFlow", run_id, "start", "uid") == alice.pw_uid
        caps_seen = artifact(d, "WhoAmIFlow", run_id, "start", "caps")
        assert int(caps_seen["CapAmb"], 16) == 0 and int(caps_seen["CapEff"], 16) == 0, caps_seen
        assert int(caps_seen["CapPrm"], 16) == 0, caps_seen
        state = d.run_state("WhoAmIFlow", run_id)
        vias = {a["handle"]["via"] for t in state["tasks"] for a in t["attempts"]}
        assert vias == ({"zygote"} if fork == "true" else {"exec"}), vias


def test_a_daemon_that_cannot_switch_refuses_other_users_runs(host: Host) -> None:
    with _service_daemon(host, "") as (d, log):
        status, body = _api_as(host, "ms-alice", "POST", "/v1/runs", {}, socket_path=d.socket)
        assert status == 403, body
        assert body["message"].startswith("this daemon runs as ms-carol and cannot run tasks as ms-alice")
        # Reading stays open, and its own account still submits.
        assert _api_as(host, "ms-alice", "GET", "/v1/runs", socket_path=d.socket)[0] == 200
        status, body = _api_as(host, "ms-carol", "POST", "/v1/runs", {}, socket_path=d.socket)
        assert status == 400 and body["error"] == "missing_field", body
        assert '"tasks_run_as": "daemon"' in log.read_text()


def test_a_plain_users_daemon_runs_tasks_as_itself_on_a_private_socket(daemon_factory: Any) -> None:
    d = daemon_factory(daemon_run_tasks_as="daemon")
    d.start()
    assert os.stat(d.socket).st_mode & 0o777 == 0o600
    line = next(json.loads(x) for x in d.logs[-1].read_text().splitlines() if "daemon_ready" in x)
    assert line["tasks_run_as"] == "daemon"
