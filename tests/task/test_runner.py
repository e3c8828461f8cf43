"""The task runner on every kind of step, driven by the real scheduler in this process.

Each test runs attempts through ``run_spec`` against a local datastore in tmp_path
and reads the outcome back from what the runner stored: done markers and artifacts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from millstream.daemon import scheduler as sch
from millstream.datastore import layout
from millstream.task.runner import CaughtException
from millstream.task.spec import EXIT_NO_RETRY, EXIT_OK, EXIT_USER_FAILURE

from ._support import FLOWS, Run, copy_examples, drive, new_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of the example flows."""
    return copy_examples(tmp_path / "examples")


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    """The datastore root."""
    return tmp_path / "ds"


def failure(run: Run, key: str, attempt: int = 0) -> dict[str, str]:
    """The exception recorded in a failed attempt's done marker."""
    done = run.done(key, attempt)
    assert done is not None
    assert done["status"] == "failed"
    return done["exception"]


# ------------------------------------------------------------------ the examples


def test_hello_passes_the_message_along(ds: Path, examples: Path) -> None:
    """Each step inherits the previous one's artifacts and adds to them."""
    run = drive(ds, examples / "hello.py", "HelloFlow")
    assert run.state.status == sch.OK
    assert list(run.state.tasks) == ["start/0", "greet/0", "end/0"]
    assert run.artifact("start/0", "message") == "hello"
    assert run.artifact("greet/0", "message") == "hello, world"
    assert run.artifact("end/0", "message") == "hello, world"
    assert set(run.exit_codes.values()) == {EXIT_OK}


def test_branch_join_merges_artifacts(ds: Path, examples: Path) -> None:
    """The join keeps the better model; merge_artifacts carries the shared seed and data."""
    run = drive(ds, examples / "branch.py", "BranchFlow")
    assert run.state.status == sch.OK
    assert run.state.tasks["pick/0"].parents == [["linear_model", "0"], ["tree_model", "0"]]
    assert run.artifact("pick/0", "best_model") == "tree"
    assert run.artifact("pick/0", "best_score") == 5.5
    assert run.artifact("pick/0", "scores") == {"linear": 4.5, "tree": 5.5}
    pick, start = run.refs("pick/0"), run.refs("start/0")
    assert pick["seed"] == start["seed"]  # merged by reference, not re-pickled
    assert pick["data"] == start["data"]
    assert run.artifact("end/0", "seed") == 42
    assert "score" not in pick  # excluded: it differs between the branches
    assert "model" not in pick


def test_foreach_sums_two_hundred_squares(ds: Path, examples: Path) -> None:
    """count=200: 200 square tasks, each with its own input, summed by the join."""
    run = drive(ds, examples / "foreach.py", "ForeachFlow", {"count": 200}, max_num_splits=200)
    assert run.state.status == sch.OK
    squares = [t for t in run.state.tasks.values() if t.step == "square"]
    assert [t.task_id for t in squares] == [str(i) for i in range(200)]
    assert run.artifact("square/7", "value") == 49
    assert run.artifact("join/0", "total") == sum(i * i for i in range(200))
    done = run.done("start/0")
    assert done is not None
    assert done["foreach"]["num_splits"] == 200
    assert run.load(done["foreach"]["values"]) == list(range(200))


def test_nested_foreach_builds_the_table(ds: Path, examples: Path) -> None:
    """Every (model, fold) cell runs once; the inner joins make rows, the outer join the table."""
    run = drive(ds, examples / "nested_foreach.py", "NestedForeachFlow")
    assert run.state.status == sch.OK
    fits = sorted(t.task_id for t in run.state.tasks.values() if t.step == "fit")
    assert fits == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1"]
    assert run.artifact("fit/2-1", "score") == 32
    assert run.artifact("per_model_join/1", "scores") == [21, 22]
    assert run.artifact("join/0", "table") == {"a": [11, 12], "b": [21, 22], "c": [31, 32]}
    done = run.done("fit/2-1")
    assert done is not None
    assert [(f["step"], f["index"], f["num_splits"]) for f in done["foreach_stack"]] == [
        ("start", 2, 3),
        ("per_model", 1, 2),
    ]


@pytest.mark.parametrize(
    ("size", "branch", "result"),
    [
        (5, "small", "in memory (5)"),
        (500, "large", "in chunks (500)"),
    ],
)
def test_switch_runs_only_the_chosen_branch(ds: Path, examples: Path, size: int, branch: str, result: str) -> None:
    """The done marker records the branch taken, and only that step ran."""
    run = drive(ds, examples / "switch.py", "SwitchFlow", {"size": size})
    assert run.state.status == sch.OK
    done = run.done("start/0")
    assert done is not None
    assert done["next"] == [branch]
    assert done["switch"] == {"value": branch, "step": branch}
    assert run.steps_run() == {"start", branch, "end"}
    assert run.artifact("end/0", "result") == result


def test_example_parameters_reach_the_steps(ds: Path, examples: Path) -> None:
    """Defaults (a computed one and a JSON one) and a given value, as the steps saw them."""
    run = drive(ds, examples / "parameters.py", "ParameterFlow", {"alpha": "0.25"})
    assert run.state.status == sch.OK
    assert run.params["greeting"] == "hello from tester"
    assert run.params["config"] == {"layers": [8, 4]}
    assert run.artifact("start/0", "schedule") == [0.25, 0.125, 0.25 / 3]


# ------------------------------------------------------------------ parameters


def test_parameters_are_visible_in_every_step(ds: Path) -> None:
    """Each step reads the run's parameter values, not the defaults."""
    run = drive(ds, FLOWS, "ParamsFlow", {"alpha": "0.1", "label": "abc"})
    assert run.state.status == sch.OK
    assert run.artifact("end/0", "seen") == [("start", 0.1, "abc"), ("middle", 0.1, "abc"), ("end", 0.1, "abc")]


def test_assigning_a_parameter_fails_the_attempt(ds: Path) -> None:
    """Parameters are read-only inside steps."""
    run = drive(ds, FLOWS, "AssignParamFlow")
    assert run.state.status == sch.FAILED
    assert run.exit_codes[("start/0", 0)] == EXIT_USER_FAILURE
    exc = failure(run, "start/0")
    assert exc["type"] == "builtins.AttributeError"
    assert "Parameter 'alpha' is read-only" in exc["message"]


# ------------------------------------------------------------------ @catch, @retry, @timeout


def test_catch_stores_the_exception_and_the_flow_goes_on(ds: Path) -> None:
    """The caught step succeeds with the exception in its var; what it set before is kept."""
    run = drive(ds, FLOWS, "CatchFlow")
    assert run.state.status == sch.OK
    assert run.exit_codes[("risky/0", 0)] == EXIT_OK
    done = run.done("risky/0")
    assert done is not None
    assert done["caught"] == "builtins.ValueError"
    assert done["next"] == ["after"]
    err = run.artifact("risky/0", "err")
    assert isinstance(err, CaughtException)
    assert (err.type, err.message) == ("builtins.ValueError", "risky went wrong")
    assert "raise ValueError" in err.traceback
    assert run.artifact("after/0", "report") == ("builtins.ValueError", "risky went wrong", "set before the error")


def test_catch_under_retry_only_catches_the_last_attempt(ds: Path) -> None:
    """Attempt 0 fails and is retried; attempt 1's failure is caught."""
    run = drive(ds, FLOWS, "RetryCatchFlow")
    assert run.state.status == sch.OK
    assert run.exit_codes[("start/0", 0)] == EXIT_USER_FAILURE
    assert failure(run, "start/0", 0)["message"] == "attempt 0 failed"
    assert run.exit_codes[("start/0", 1)] == EXIT_OK
    assert run.state.tasks["start/0"].ok_attempt == 1
    assert run.artifact("start/0", "err").message == "attempt 1 failed"


def test_retry_then_success(ds: Path) -> None:
    """The first attempt fails, the retry sees retry_count 1 and succeeds."""
    run = drive(ds, FLOWS, "FlakyFlow")
    assert run.state.status == sch.OK
    assert [a.status for a in run.state.tasks["start/0"].attempts] == [sch.FAILED, sch.OK]
    exc = failure(run, "start/0", 0)
    assert (exc["type"], exc["message"]) == ("builtins.RuntimeError", "first attempt fails")
    assert exc["traceback"].endswith("RuntimeError: first attempt fails\n")
    assert run.artifact("start/0", "succeeded_on") == 1
    assert run.done("end/0") is not None


def test_timeout_fails_the_attempt(ds: Path) -> None:
    """@timeout(seconds=1) stops a 5 s sleep after about a second."""
    run = new_run(ds, FLOWS, "SlowFlow")
    began = time.monotonic()
    code = run.run_attempt("start/0")
    elapsed = time.monotonic() - began
    assert code == EXIT_USER_FAILURE
    assert 0.9 < elapsed < 3
    exc = failure(run, "start/0")
    assert exc["type"] == "millstream.task.runner.StepTimeout"
    assert "timed out after 1 s (@timeout)" in exc["message"]
    assert run.state.status == sch.FAILED


def test_timeout_under_catch_is_caught(ds: Path) -> None:
    """The timeout is an exception like any other for @catch."""
    run = drive(ds, FLOWS, "SlowCaughtFlow")
    assert run.state.status == sch.OK
    err = run.artifact("start/0", "timeout_error")
    assert err.type == "millstream.task.runner.StepTimeout"
    assert "timed out" in err.message


# ------------------------------------------------------------------ flows wrong for the runner


def test_self_next_differing_from_the_source_is_not_retried(ds: Path) -> None:
    """The run fails at once despite @retry, saying what was called and what the source says."""
    run = drive(ds, FLOWS, "WrongNextFlow")
    assert run.state.status == sch.FAILED
    assert run.exit_codes == {("start/0", 0): EXIT_NO_RETRY}
    assert failure(run, "start/0")["message"] == (
        "step 'start' called self.next(b) at run time, but its source says self.next(a)"
    )


def test_foreach_over_a_non_iterable_is_not_retried(ds: Path) -> None:
    """The message names the variable."""
    run = drive(ds, FLOWS, "NotIterableFlow")
    assert run.state.status == sch.FAILED
    assert run.exit_codes == {("start/0", 0): EXIT_NO_RETRY}
    assert failure(run, "start/0")["message"] == "foreach in step 'start': self.items is not iterable"


@pytest.mark.parametrize(
    ("flow", "name", "type_name"),
    [
        ("LockFlow", "guard", "_thread.lock"),
        ("LambdaFlow", "square", "function"),
    ],
)
def test_unpicklable_artifact_fails_naming_it(ds: Path, flow: str, name: str, type_name: str) -> None:
    """Storing cannot succeed on a retry either; the message names the artifact and its type."""
    run = drive(ds, FLOWS, flow)
    assert run.state.status == sch.FAILED
    assert run.exit_codes == {("start/0", 0): EXIT_NO_RETRY}
    message = failure(run, "start/0")["message"]
    assert f"artifact {name!r} of type {type_name} cannot be pickled" in message


# ------------------------------------------------------------------ artifacts


def test_unread_inherited_artifacts_are_carried_by_reference(ds: Path) -> None:
    """A step that never reads an artifact does not load it and keeps its id.

    The blob of ``big`` is deleted before ``middle`` runs: the step can only succeed
    if it never loads it.
    """
    run = new_run(ds, FLOWS, "LazyFlow")
    assert run.run_attempt("start/0") == EXIT_OK
    start = run.refs("start/0")
    os.remove(ds / layout.artifact_key("LazyFlow", start["big"]["sha"]))

    assert run.run_attempt("middle/0") == EXIT_OK
    middle = run.refs("middle/0")
    assert middle["big"] == start["big"]
    assert middle["counter"] != start["counter"]
    assert run.artifact("middle/0", "counter") == 2


# ------------------------------------------------------------------ a real task process


def _run_process(run: Run, key: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """One attempt through ``python -m millstream.task SPEC.json``, reported to the scheduler."""
    number = sch.attempt_started(run.state, key, None, run.now).number
    spec_file = tmp_path / f"{key.replace('/', '-')}-{number}.json"
    spec_file.write_text(json.dumps(run.spec(key, number).to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "millstream.task", str(spec_file)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    sch.attempt_finished(
        run.graph, run.state, key, number, exit_code=proc.returncode, done=run.done(key, number), now=run.now
    )
    return proc


def test_task_process_stdout_is_only_the_users_output(ds: Path, examples: Path, tmp_path: Path) -> None:
    """Nothing of the runner's own appears on the step's stdout or, on success, stderr."""
    run = new_run(ds, examples / "hello.py", "HelloFlow", run_id="42")
    proc = _run_process(run, "start/0", tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (EXIT_OK, "HelloFlow run 42 starting\n", "")
    proc = _run_process(run, "greet/0", tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (EXIT_OK, "hello, world\n", "")
    assert run.artifact("greet/0", "message") == "hello, world"


def test_failing_task_process_prints_the_traceback_on_stderr_only(ds: Path, tmp_path: Path) -> None:
    """stdout keeps the user's line; stderr has the user's line and then the traceback."""
    run = new_run(ds, FLOWS, "NoisyFlow")
    proc = _run_process(run, "start/0", tmp_path)
    assert proc.returncode == EXIT_USER_FAILURE
    assert proc.stdout == "to stdout\n"
    assert proc.stderr.startswith("to stderr\nTraceback (most recent call last):\n")
    assert proc.stderr.rstrip().endswith("ValueError: noisy failure")
    assert run.state.status == sch.FAILED
