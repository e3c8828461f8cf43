"""The crash tests' run: a slow foreach submitted in the background, and the checks of its end."""

from __future__ import annotations

import subprocess
import sys

from millstream.datastore import layout
from tests.conftest import Daemon, wait_until
from tests.e2e.helpers import FLOWS, artifact, done_marker, stored

WIDTH = 12


def submit_slow_foreach(d: Daemon, nap_s: float = 0.4) -> tuple[subprocess.Popen[str], str]:
    """Start ``slow_foreach.py run`` (it follows the run); returns the client and the run id."""
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
            str(nap_s),
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


def step_count(d: Daemon, run_id: str, step: str, status: str) -> int:
    """How many tasks of a step have a status, by the daemon's API (0 while it does not answer)."""
    code, body = d.request("GET", f"/v1/runs/SlowForeachFlow/{run_id}")
    return body["steps"][step][status] if code == 200 else 0


def check_slow_foreach_finished(d: Daemon, run_id: str) -> None:
    """Wait for the run's end; it succeeded, with the right sum, and no successful attempt ran twice."""
    wait_until(lambda: d.run_state("SlowForeachFlow", run_id)["status"] != "running", 60, 0.1)
    state = d.run_state("SlowForeachFlow", run_id)
    assert state["status"] == "ok", state["message"]
    assert artifact(d, "SlowForeachFlow", run_id, "join", "total") == sum(i * i for i in range(WIDTH))
    assert state["steps"]["work"]["ok"] == WIDTH
    for task in state["tasks"]:
        # No successful attempt ran twice: exactly one ok done marker per task, and every
        # attempt the datastore has is one the run's state knows. Only an attempt killed
        # before it wrote anything (its host was lost) is known to the state alone.
        prefix = layout.task_prefix("SlowForeachFlow", run_id, task["step"], task["task_id"])
        on_disk = sorted({int(key[len(prefix) :].split("/")[0]) for key in stored(d).list(prefix)})
        unrecorded = [a for a in task["attempts"] if a["number"] not in on_disk]
        assert set(on_disk) <= {a["number"] for a in task["attempts"]}, task
        assert all(a["status"] == "failed" and "lost" in a["message"] for a in unrecorded), task
        oks = [
            n
            for n in on_disk
            if (done_marker(d, "SlowForeachFlow", run_id, task["step"], task["task_id"], n) or {}).get("status") == "ok"
        ]
        assert len(oks) == 1, task


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False
