"""Every example and behaviour through a real daemon on a real socket, as a user runs it."""

from __future__ import annotations

import pytest

from tests.conftest import EXAMPLES, Daemon
from tests.e2e.helpers import FLOWS, artifact, done_marker, ok_attempt, run_flow


def test_hello(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"[{run_id}/greet/0 (pid" in proc.stdout and "hello, world" in proc.stdout
    assert proc.stdout.rstrip().endswith("Done!")
    assert artifact(daemon_on_store, "HelloFlow", run_id, "end", "message") == "hello, world"


def test_run_ids_are_monotonic(daemon: Daemon) -> None:
    first, _ = run_flow(daemon, EXAMPLES / "hello.py")
    second, _ = run_flow(daemon, EXAMPLES / "hello.py")
    assert int(second) == int(first) + 1


def test_foreach_of_200_sums(daemon: Daemon) -> None:
    run_id, proc = run_flow(daemon, EXAMPLES / "foreach.py", "--count", "200", "--max-num-splits", "200")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert artifact(daemon, "ForeachFlow", run_id, "join", "total") == sum(i * i for i in range(200))
    state = daemon.run_state("ForeachFlow", run_id)
    assert state["steps"]["square"]["ok"] == 200
    assert sorted(int(t["task_id"]) for t in state["tasks"] if t["step"] == "square") == list(range(200))


def test_too_many_splits_is_a_clear_error(daemon: Daemon) -> None:
    run_id, proc = run_flow(daemon, EXAMPLES / "foreach.py", "--count", "101")
    assert proc.returncode != 0
    assert "--max-num-splits" in proc.stdout + proc.stderr
    assert daemon.run_state("ForeachFlow", run_id)["status"] == "failed"


def test_nested_foreach(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, EXAMPLES / "nested_foreach.py")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert artifact(daemon_on_store, "NestedForeachFlow", run_id, "join", "table") == {
        "a": [11, 12],
        "b": [21, 22],
        "c": [31, 32],
    }
    fits = {t["task_id"] for t in daemon_on_store.run_state("NestedForeachFlow", run_id)["tasks"] if t["step"] == "fit"}
    assert fits == {f"{i}-{j}" for i in range(3) for j in range(2)}


def test_branch_and_merge_artifacts(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, EXAMPLES / "branch.py")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert artifact(daemon_on_store, "BranchFlow", run_id, "pick", "best_model") == "tree"
    assert artifact(daemon_on_store, "BranchFlow", run_id, "end", "seed") == 42
    assert artifact(daemon_on_store, "BranchFlow", run_id, "end", "scores") == {"linear": 4.5, "tree": 5.5}


@pytest.mark.parametrize(("size", "branch"), [("5", "small"), ("500", "large")])
def test_switch(daemon_on_store: Daemon, size: str, branch: str) -> None:
    run_id, proc = run_flow(daemon_on_store, EXAMPLES / "switch.py", "--size", size)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    steps = {t["step"] for t in daemon_on_store.run_state("SwitchFlow", run_id)["tasks"]}
    assert steps == {"start", branch, "end"}
    assert artifact(daemon_on_store, "SwitchFlow", run_id, "end", "route") == branch


def test_parameters(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(
        daemon_on_store, EXAMPLES / "parameters.py", "--alpha", "0.2", "--epochs", "2", "--config", '{"layers": [3]}'
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert artifact(daemon_on_store, "ParameterFlow", run_id, "end", "schedule") == [0.2, 0.1]
    assert "hello from" in proc.stdout and "[3]" in proc.stdout


def test_bad_parameter_value_fails_before_submitting(daemon: Daemon) -> None:
    proc = daemon.run_flow(EXAMPLES / "parameters.py", "run", "--epochs", "three")
    assert proc.returncode != 0
    assert "epochs" in proc.stderr + proc.stdout


def test_retry_then_success(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, FLOWS / "retry_flow.py")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    task = next(t for t in daemon_on_store.run_state("RetryFlow", run_id)["tasks"] if t["step"] == "flaky")
    assert [a["status"] for a in task["attempts"]] == ["failed", "ok"]
    assert "first attempt fails on purpose" in task["attempts"][0]["message"]
    assert artifact(daemon_on_store, "RetryFlow", run_id, "end", "attempt_seen") == 1


def test_catch_lets_the_flow_go_on(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, FLOWS / "catch_flow.py")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    caught = artifact(daemon_on_store, "CatchFlow", run_id, "end", "divide_error")
    assert caught.type == "builtins.ZeroDivisionError"
    assert "caught: builtins.ZeroDivisionError" in proc.stdout


def test_failure_fails_the_run_with_its_message(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, FLOWS / "catch_flow.py", "--fail_hard", "true")
    assert proc.returncode == 1
    state = daemon_on_store.run_state("CatchFlow", run_id)
    assert state["status"] == "failed"
    assert "asked to fail" in state["message"]
    task = next(t for t in state["tasks"] if t["step"] == "maybe_fail")
    done = done_marker(daemon_on_store, "CatchFlow", run_id, "maybe_fail", "0", 0)
    assert task["status"] == "failed" and done is not None and done["status"] == "failed"
    assert "ValueError: asked to fail" in done["exception"]["traceback"]


def test_timeout_stops_the_step(daemon: Daemon) -> None:
    run_id, proc = run_flow(daemon, FLOWS / "timeout_flow.py", timeout_s=60)
    assert proc.returncode == 1
    state = daemon.run_state("TimeoutFlow", run_id)
    task = next(t for t in state["tasks"] if t["step"] == "slow")
    assert task["status"] == "failed"
    assert "timed out after 1 s" in task["attempts"][0]["message"]
    finished = task["attempts"][0]["finished_at"] - task["attempts"][0]["started_at"]
    assert finished < 10


def test_logs_command_and_api(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, EXAMPLES / "hello.py")
    assert proc.returncode == 0
    out = daemon_on_store.cli("logs", f"HelloFlow/{run_id}/greet/0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello, world\n"
    status, body = daemon_on_store.request("GET", f"/v1/runs/HelloFlow/{run_id}/logs/greet/0?stream=stdout&offset=7")
    assert status == 200 and body == b"world\n"


def test_runs_and_status_commands(daemon: Daemon) -> None:
    run_id, _ = run_flow(daemon, EXAMPLES / "hello.py")
    runs = daemon.cli("runs")
    assert runs.returncode == 0 and "HelloFlow" in runs.stdout and run_id in runs.stdout
    status = daemon.cli("status", f"HelloFlow/{run_id}")
    assert status.returncode == 0 and "greet" in status.stdout


def test_every_attempt_ran_once_when_nothing_failed(daemon_on_store: Daemon) -> None:
    run_id, proc = run_flow(daemon_on_store, EXAMPLES / "foreach.py", "--count", "30")
    assert proc.returncode == 0
    for task in daemon_on_store.run_state("ForeachFlow", run_id)["tasks"]:
        assert len(task["attempts"]) == 1 and ok_attempt(task) == 0


def test_resources_never_oversubscribe_the_host(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(local_max_cpus="2")
    d.start()
    run_id, proc = run_flow(d, FLOWS / "resources_flow.py")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    tasks = {t["step"]: t["attempts"][0] for t in d.run_state("ResourcesFlow", run_id)["tasks"]}
    a, b = tasks["heavy_a"], tasks["heavy_b"]
    assert a["finished_at"] <= b["started_at"] or b["finished_at"] <= a["started_at"], (a, b)


def test_resources_beyond_the_host_are_refused(daemon: Daemon) -> None:
    proc = daemon.run_flow(FLOWS / "greedy_flow.py", "run")
    assert proc.returncode != 0
    assert "exceeds this host" in proc.stdout + proc.stderr


def test_tasks_run_in_the_submitters_working_directory(daemon: Daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    (tmp_path / "input.txt").write_text("read from the cwd\n")
    id_file = tmp_path / "id"
    proc = subprocess.run(
        [sys.executable, str(FLOWS / "cwd_flow.py"), "run", "--run-id-file", str(id_file)],
        env=daemon.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert artifact(daemon, "CwdFlow", id_file.read_text(), "start", "text") == "read from the cwd"
