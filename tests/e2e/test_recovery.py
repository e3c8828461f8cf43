"""Kill the daemon in the middle of a run and check the restarted one finishes it right."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import Daemon, wait_until
from tests.e2e.helpers import FLOWS, artifact, done_marker

WIDTH = 12


def _submit_in_background(d: Daemon) -> tuple[subprocess.Popen[str], str]:
    id_file = d.root / "run-id"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(FLOWS / "slow_foreach.py"),
            "run",
            "--run-id-file",
            str(id_file),
            "--width",
            str(WIDTH),
            "--nap",
            "0.4",
            "--max-workers",
            "4",
        ],
        env=d.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: id_file.exists() and id_file.read_text().strip(), 30)
    return proc, id_file.read_text().strip()


def _count(d: Daemon, run_id: str, step: str, status: str) -> int:
    code, body = d.request("GET", f"/v1/runs/SlowForeachFlow/{run_id}")
    return body["steps"][step][status] if code == 200 else 0


POINTS = {
    "start running": lambda d, r: _count(d, r, "start", "running") >= 1 or _count(d, r, "start", "ok") >= 1,
    "foreach in flight": lambda d, r: _count(d, r, "work", "ok") >= 3,
    "join running": lambda d, r: _count(d, r, "join", "running") >= 1,
}


def _check_finished_correctly(d: Daemon, run_id: str) -> None:
    wait_until(lambda: d.run_state("SlowForeachFlow", run_id)["status"] != "running", 60, 0.1)
    state = d.run_state("SlowForeachFlow", run_id)
    assert state["status"] == "ok", state["message"]
    assert artifact(d, "SlowForeachFlow", run_id, "join", "total") == sum(i * i for i in range(WIDTH))
    assert state["steps"]["work"]["ok"] == WIDTH
    for task in state["tasks"]:
        # No successful attempt ran twice: exactly one ok done marker per task, and every
        # attempt the datastore has is one the run's state knows.
        folder = d.datastore / "SlowForeachFlow" / run_id / task["step"] / task["task_id"]
        on_disk = sorted(int(p.name) for p in folder.iterdir() if p.is_dir())
        assert on_disk == [a["number"] for a in task["attempts"]], task
        oks = [
            n
            for n in on_disk
            if (done_marker(d, "SlowForeachFlow", run_id, task["step"], task["task_id"], n) or {}).get("status") == "ok"
        ]
        assert len(oks) == 1, task


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_daemon_killed_mid_run(daemon: Daemon, point: str, sig: int) -> None:
    client, run_id = _submit_in_background(daemon)
    wait_until(lambda: POINTS[point](daemon, run_id), 30, 0.02)
    code = daemon.stop(sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), daemon.logs[-1].read_text()[-3000:]
    daemon.start()
    _check_finished_correctly(daemon, run_id)
    # The client that submitted the run reconnects and follows it to its end.
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0, out
    assert out.rstrip().endswith("Done!")


def test_sigterm_is_prompt_and_leaves_attempts_running(daemon: Daemon) -> None:
    client, run_id = _submit_in_background(daemon)
    wait_until(lambda: _count(daemon, run_id, "work", "running") >= 2, 30, 0.02)
    running = [t for t in daemon.run_state("SlowForeachFlow", run_id)["tasks"] if t["status"] == "running"]
    pids = [t["attempts"][-1]["handle"]["pid"] for t in running]
    import time

    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    alive = [pid for pid in pids if _alive(pid)]
    assert alive, "the attempts should outlive the daemon"
    checkpoint = json.loads((daemon.datastore / "SlowForeachFlow" / run_id / "_run" / "checkpoint.json").read_text())
    assert checkpoint["version"] == 1
    daemon.start()
    _check_finished_correctly(daemon, run_id)
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0, out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False
