"""Resume: clone what succeeded, run again what failed and what follows it."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import Daemon
from tests.e2e.helpers import FLOWS, artifact, clone_origins

FLOW = "ResumableFlow"


def _run(d: Daemon, flow_file: Path, *args: str, fail: str = "", command: str = "run") -> tuple[str, int, str]:
    env = dict(d.env, MS_FAIL=fail)
    id_file = d.root / f"id-{len(list(d.root.glob('id-*')))}"
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(flow_file), command, "--run-id-file", str(id_file), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(flow_file.parent),
    )
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    return run_id, proc.returncode, proc.stdout + proc.stderr


def test_resume_inside_a_foreach_reruns_only_the_failed_split(daemon_on_store: Daemon) -> None:
    # One worker: splits 0-2 succeed, 3 fails, and the failure stops the run before 4 and 5.
    origin, code, out = _run(daemon_on_store, FLOWS / "resumable.py", "--max-workers", "1", fail="work:3")
    assert code == 1, out
    new, code, out = _run(daemon_on_store, FLOWS / "resumable.py", command="resume")
    assert code == 0, out
    cloned = clone_origins(daemon_on_store, FLOW, new)
    assert {k for k, v in cloned.items() if v} == {"start/0", "work/0", "work/1", "work/2"}
    assert {k for k, v in cloned.items() if not v} == {"work/3", "work/4", "work/5", "join/0", "end/0"}
    assert cloned["work/0"] == f"{FLOW}/{origin}/work/0/0"
    assert artifact(daemon_on_store, FLOW, new, "join", "total") == sum(i * 10 for i in range(6))
    assert artifact(daemon_on_store, FLOW, new, "join", "split_runs") == [origin] * 3 + [new] * 3
    assert artifact(daemon_on_store, FLOW, new, "end", "origin_seen") == origin


def test_splits_running_when_another_fails_are_cancelled_then_rerun(daemon: Daemon) -> None:
    origin, code, _ = _run(daemon, FLOWS / "resumable.py", "--max-workers", "6", fail="work:3")
    assert code == 1
    state = daemon.run_state(FLOW, origin)
    statuses = {t["task_id"]: t["status"] for t in state["tasks"] if t["step"] == "work"}
    assert statuses["3"] == "failed" and set(statuses.values()) <= {"ok", "failed", "cancelled"}
    new, code, out = _run(daemon, FLOWS / "resumable.py", command="resume")
    assert code == 0, out
    cloned = clone_origins(daemon, FLOW, new)
    assert {k for k, v in cloned.items() if v and k.startswith("work/")} == {
        f"work/{i}" for i, s in statuses.items() if s == "ok"
    }


def test_resume_after_a_failed_join_clones_every_split(daemon: Daemon) -> None:
    origin, code, _ = _run(daemon, FLOWS / "resumable.py", fail="join")
    assert code == 1
    new, code, out = _run(daemon, FLOWS / "resumable.py", "--origin-run-id", origin, command="resume")
    assert code == 0, out
    cloned = clone_origins(daemon, FLOW, new)
    assert {k for k, v in cloned.items() if not v} == {"join/0", "end/0"}
    assert artifact(daemon, FLOW, new, "join", "split_runs") == [origin] * 6


def test_resume_at_end(daemon: Daemon) -> None:
    origin, code, _ = _run(daemon, FLOWS / "resumable.py", fail="end")
    assert code == 1
    new, code, out = _run(daemon, FLOWS / "resumable.py", command="resume")
    assert code == 0, out
    assert {k for k, v in clone_origins(daemon, FLOW, new).items() if not v} == {"end/0"}
    assert artifact(daemon, FLOW, new, "end", "end_ran_in") == new


def test_resume_at_start_reruns_everything(daemon: Daemon) -> None:
    origin, code, _ = _run(daemon, FLOWS / "resumable.py", fail="start")
    assert code == 1
    new, code, out = _run(daemon, FLOWS / "resumable.py", command="resume")
    assert code == 0, out
    assert not any(clone_origins(daemon, FLOW, new).values())


def test_resume_from_a_named_foreach_step(daemon: Daemon) -> None:
    origin, code, _ = _run(daemon, FLOWS / "resumable.py")
    assert code == 0
    new, code, out = _run(daemon, FLOWS / "resumable.py", "work", command="resume")
    assert code == 0, out
    cloned = clone_origins(daemon, FLOW, new)
    assert {k for k, v in cloned.items() if v} == {"start/0"}
    assert artifact(daemon, FLOW, new, "join", "split_runs") == [new] * 6


def test_resume_keeps_the_origin_parameters(daemon: Daemon) -> None:
    origin, code, _ = _run(daemon, FLOWS / "resumable.py", "--width", "4", fail="join")
    assert code == 1
    new, code, out = _run(daemon, FLOWS / "resumable.py", command="resume")
    assert code == 0, out
    assert artifact(daemon, FLOW, new, "join", "total") == sum(i * 10 for i in range(4))


def test_resume_inside_nested_foreach_and_switch(daemon_on_store: Daemon) -> None:
    flow = "ResumableNestedFlow"
    # One worker: group 0's cells run, then cell 1-0 fails and stops the run.
    origin, code, _ = _run(daemon_on_store, FLOWS / "resumable_nested.py", "--max-workers", "1", fail="fit:1-0")
    assert code == 1
    new, code, out = _run(daemon_on_store, FLOWS / "resumable_nested.py", command="resume")
    assert code == 0, out
    cloned = clone_origins(daemon_on_store, flow, new)
    assert {k for k, v in cloned.items() if v} == {"start/0", "outer/0", "outer/1", "fit/0-0", "fit/0-1"}
    assert {k for k, v in cloned.items() if not v} == {
        "fit/1-0",
        "fit/1-1",
        "inner_join/0",
        "inner_join/1",
        "outer_join/0",
        "large/0",
        "end/0",
    }
    assert artifact(daemon_on_store, flow, new, "outer_join", "grid") == [(0, 0), (0, 1), (1, 0), (1, 1)]

    origin2, code, _ = _run(daemon_on_store, FLOWS / "resumable_nested.py", fail="large")
    assert code == 1
    new2, code, out = _run(daemon_on_store, FLOWS / "resumable_nested.py", command="resume")
    assert code == 0, out
    assert {k for k, v in clone_origins(daemon_on_store, flow, new2).items() if not v} == {"large/0", "end/0"}
    assert artifact(daemon_on_store, flow, new2, "large", "result") == "large"


def test_resume_errors(daemon: Daemon, tmp_path: Path) -> None:
    _, code, out = _run(daemon, FLOWS / "resumable.py", command="resume")
    assert code != 0 and "no run of ResumableFlow to resume" in out
    origin, code, _ = _run(daemon, FLOWS / "resumable.py", fail="end")
    _, code, out = _run(daemon, FLOWS / "resumable.py", "nosuchstep", command="resume")
    assert code != 0 and "no such step" in out and "nosuchstep" in out
    _, code, out = _run(daemon, FLOWS / "resumable.py", "--origin-run-id", "999", command="resume")
    assert code != 0 and "999" in out
    # The same flow whose work step now goes through a new step: the reused part changed.
    changed = tmp_path / "resumable.py"
    shutil.copy(FLOWS / "resumable.py", changed)
    text = changed.read_text().replace(
        "        self.ran_in = current.run_id\n        self.next(self.join)",
        "        self.ran_in = current.run_id\n        self.next(self.extra)\n\n"
        "    @step\n    def extra(self):\n        self.next(self.join)",
    )
    assert "def extra" in text
    changed.write_text(text)
    _, code, out = _run(daemon, changed, "--origin-run-id", origin, command="resume")
    assert code != 0, out
    assert "work" in out and "changed" in out


def test_resume_twice_in_a_row(daemon: Daemon) -> None:
    first, code, _ = _run(daemon, FLOWS / "resumable.py", "--max-workers", "1", fail="work:2")
    assert code == 1
    second, code, _ = _run(daemon, FLOWS / "resumable.py", "--max-workers", "1", fail="work:4", command="resume")
    assert code == 1
    third, code, out = _run(daemon, FLOWS / "resumable.py", command="resume")
    assert code == 0, out
    runs = artifact(daemon, FLOW, third, "join", "split_runs")
    assert runs == [first, first, second, second, third, third]
