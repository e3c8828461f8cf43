"""The pure scheduler, driven by hand: fixed clocks, graphs of real flow classes.

Each test plays the driver: it takes the ready tasks, reports them started, and feeds
back the done marker the task runner would have written. Nothing runs a step.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from millstream import FlowSpec, Parameter, retry, step
from millstream.daemon.scheduler import (
    CANCELLED,
    FAILED,
    INFRA_RETRIES,
    OK,
    PENDING,
    RUNNING,
    Decisions,
    RunState,
    attempt_finished,
    attempt_started,
    cancel_run,
    initial_state,
    make_task_id,
    next_wakeup,
    ready_tasks,
)
from millstream.flow.graph import FlowGraph
from millstream.task.spec import EXIT_INFRA_FAILURE, EXIT_NO_RETRY, EXIT_OK, EXIT_USER_FAILURE

SHA = "ab" * 32  # the foreach values' artifact id: the scheduler only passes it on
T0 = 1_000_000.0


# ------------------------------------------------------------------ flows


class LinearFlow(FlowSpec):
    """start -> middle -> end."""

    @step
    def start(self):
        """First."""
        self.next(self.middle)

    @step
    def middle(self):
        """Second."""
        self.next(self.end)

    @step
    def end(self):
        """Last."""


class BranchFlow(FlowSpec):
    """Three branches and a join."""

    @step
    def start(self):
        """Fan out."""
        self.next(self.a, self.b, self.c)

    @step
    def a(self):
        """Branch a."""
        self.next(self.join)

    @retry(times=1, minutes_between_retries=1)
    @step
    def b(self):
        """Branch b, with a retry."""
        self.next(self.b2)

    @step
    def b2(self):
        """Branch b goes on for one more step."""
        self.next(self.join)

    @step
    def c(self):
        """Branch c."""
        self.next(self.join)

    @step
    def join(self, inputs):
        """Fan in."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class ForeachFlow(FlowSpec):
    """A foreach over a list."""

    @step
    def start(self):
        """The list."""
        self.items = [1, 2, 3]
        self.next(self.body, foreach="items")

    @step
    def body(self):
        """One item."""
        self.next(self.join)

    @step
    def join(self, inputs):
        """All items."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class NestedFlow(FlowSpec):
    """A foreach in a foreach."""

    @step
    def start(self):
        """Outer list."""
        self.outer = [1, 2, 3]
        self.next(self.per_outer, foreach="outer")

    @step
    def per_outer(self):
        """Inner list."""
        self.inner = [1, 2]
        self.next(self.cell, foreach="inner")

    @step
    def cell(self):
        """One cell."""
        self.next(self.inner_join)

    @step
    def inner_join(self, inputs):
        """One row."""
        self.next(self.outer_join)

    @step
    def outer_join(self, inputs):
        """The table."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class BranchInForeachFlow(FlowSpec):
    """Every foreach task splits into two branches that join again."""

    @step
    def start(self):
        """The list."""
        self.items = [1, 2]
        self.next(self.body, foreach="items")

    @step
    def body(self):
        """Split."""
        self.next(self.x, self.y)

    @step
    def x(self):
        """One branch."""
        self.next(self.branch_join)

    @step
    def y(self):
        """The other."""
        self.next(self.branch_join)

    @step
    def branch_join(self, inputs):
        """Close the branch."""
        self.next(self.foreach_join)

    @step
    def foreach_join(self, inputs):
        """Close the foreach."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class SwitchFlow(FlowSpec):
    """A switch between two steps."""

    @step
    def start(self):
        """Choose."""
        self.route = "small"
        self.next({"small": self.small, "large": self.large}, condition="route")

    @step
    def small(self):
        """One way."""
        self.next(self.end)

    @step
    def large(self):
        """The other way."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


class LoopFlow(FlowSpec):
    """A switch that loops back to an earlier step."""

    limit = Parameter("limit", default=3)

    @step
    def start(self):
        """Set up."""
        self.count = 0
        self.next(self.work)

    @step
    def work(self):
        """One round."""
        self.count += 1
        self.next(self.check)

    @step
    def check(self):
        """Again or done."""
        self.verdict = "again" if self.count < self.limit else "done"
        self.next({"again": self.work, "done": self.end}, condition="verdict")

    @step
    def end(self):
        """Done."""


class RetryFlow(FlowSpec):
    """A flaky step with @retry(times=2, minutes_between_retries=1)."""

    @step
    def start(self):
        """First."""
        self.next(self.flaky)

    @retry(times=2, minutes_between_retries=1)
    @step
    def flaky(self):
        """Fails sometimes."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""


def graph_of(cls: type[FlowSpec]) -> dict[str, Any]:
    """The graph dict the daemon gets, from a flow that must be valid."""
    graph = FlowGraph(cls)
    graph.validate()
    return graph.to_dict()


LINEAR = graph_of(LinearFlow)
BRANCH = graph_of(BranchFlow)
FOREACH = graph_of(ForeachFlow)
NESTED = graph_of(NestedFlow)
BRANCH_IN_FOREACH = graph_of(BranchInForeachFlow)
SWITCH = graph_of(SwitchFlow)
LOOP = graph_of(LoopFlow)
RETRY = graph_of(RetryFlow)


# ------------------------------------------------------------------ the hand-driven driver


def ok(*next_steps: str) -> dict[str, Any]:
    """A success done marker going to ``next_steps``."""
    return {"status": "ok", "next": list(next_steps)}


def ok_foreach(target: str, var: str, n: int) -> dict[str, Any]:
    """A success done marker of a foreach step with ``n`` splits."""
    return {"status": "ok", "next": [target], "foreach": {"var": var, "num_splits": n, "values": SHA}}


def ok_switch(value: str, target: str) -> dict[str, Any]:
    """A success done marker of a switch that took ``target``."""
    return {"status": "ok", "next": [target], "switch": {"value": value, "step": target}}


def failed(type_: str = "builtins.ValueError", message: str = "boom") -> dict[str, Any]:
    """The done marker of an attempt whose step raised."""
    return {
        "status": "failed",
        "exit_code": EXIT_USER_FAILURE,
        "exception": {"type": type_, "message": message, "traceback": "..."},
    }


def start(state: RunState, key: str, now: float = T0) -> int:
    """Report the next attempt of ``key`` launched; returns its number."""
    return attempt_started(state, key, {"pid": 4242}, now).number


def run(
    graph: dict[str, Any],
    state: RunState,
    key: str,
    done: dict[str, Any] | None,
    *,
    exit_code: int = EXIT_OK,
    now: float = T0,
) -> Decisions:
    """Start the next attempt of ``key`` and finish it with ``done``."""
    number = start(state, key, now)
    return attempt_finished(graph, state, key, number, exit_code=exit_code, done=done, now=now)


def finish(
    graph: dict[str, Any],
    state: RunState,
    key: str,
    done: dict[str, Any] | None,
    *,
    exit_code: int = EXIT_OK,
    now: float = T0,
) -> Decisions:
    """Finish the latest (running) attempt of ``key``."""
    number = state.tasks[key].attempts[-1].number
    return attempt_finished(graph, state, key, number, exit_code=exit_code, done=done, now=now)


def ready(state: RunState, now: float = T0) -> list[str]:
    """Keys of the ready tasks."""
    return [t.key for t in ready_tasks(state, now)]


def parents(state: RunState, key: str) -> list[list[str]]:
    """A task's parents as ``[step, task_id]`` pairs."""
    return state.tasks[key].parents


# ------------------------------------------------------------------ task ids


@pytest.mark.parametrize(
    ("index", "visit", "expected"),
    [
        ((), 0, "0"),
        ((3,), 0, "3"),
        ((3, 1), 0, "3-1"),
        ((), 1, "0.1"),
        ((2, 0), 2, "2-0.2"),
    ],
)
def test_task_ids_are_derived_from_the_place_in_the_run(index: tuple[int, ...], visit: int, expected: str) -> None:
    """Split indexes joined by '-', a switch revisit appended as '.N'."""
    assert make_task_id(index, visit) == expected


# ------------------------------------------------------------------ linear


def test_linear_flow_runs_one_step_after_the_other() -> None:
    """Each step becomes ready only once its parent succeeded; end finishes the run."""
    state = initial_state("LinearFlow", "1")
    assert ready(state) == ["start/0"]

    d = run(LINEAR, state, "start/0", ok("middle"))
    assert d.new_tasks == ["middle/0"]
    assert d.finished is None
    assert ready(state) == ["middle/0"]
    assert parents(state, "middle/0") == [["start", "0"]]

    number = start(state, "middle/0")
    assert ready(state) == []  # running, not ready twice
    d = attempt_finished(LINEAR, state, "middle/0", number, exit_code=0, done=ok("end"), now=T0)
    assert d.new_tasks == ["end/0"]

    d = run(LINEAR, state, "end/0", ok())
    assert d.new_tasks == []
    assert d.finished == OK
    assert state.status == OK
    assert state.finished
    assert ready(state) == []
    assert list(state.tasks) == ["start/0", "middle/0", "end/0"]
    assert state.tasks["middle/0"].ok_attempt == 0
    assert state.tasks["middle/0"].outcome == {"next": ["end"]}


def test_the_run_is_not_finished_before_end_succeeds() -> None:
    """A started but unfinished end keeps the run running."""
    state = initial_state("LinearFlow", "1")
    run(LINEAR, state, "start/0", ok("middle"))
    run(LINEAR, state, "middle/0", ok("end"))
    start(state, "end/0")
    assert state.status == RUNNING
    assert not state.finished


# ------------------------------------------------------------------ branches


def test_branch_fans_out_and_the_join_waits_for_every_branch() -> None:
    """The join is created by the last branch to arrive, its parents in the split's order."""
    state = initial_state("BranchFlow", "1")
    d = run(BRANCH, state, "start/0", ok("a", "b", "c"))
    assert d.new_tasks == ["a/0", "b/0", "c/0"]
    assert ready(state) == ["a/0", "b/0", "c/0"]
    for key in ("a/0", "b/0", "c/0"):
        start(state, key)

    # Branches arrive out of order: c, then b (through b2), then a.
    assert finish(BRANCH, state, "c/0", ok("join")).new_tasks == []
    assert finish(BRANCH, state, "b/0", ok("b2")).new_tasks == ["b2/0"]
    assert run(BRANCH, state, "b2/0", ok("join")).new_tasks == []
    assert "join/0" not in state.tasks
    d = finish(BRANCH, state, "a/0", ok("join"))
    assert d.new_tasks == ["join/0"]
    assert parents(state, "join/0") == [["a", "0"], ["b2", "0"], ["c", "0"]]
    assert state.arrivals == {}

    run(BRANCH, state, "join/0", ok("end"))
    assert run(BRANCH, state, "end/0", ok()).finished == OK


def test_branch_inside_a_foreach_joins_per_foreach_index() -> None:
    """The branch join of split i gets task id i and only that split's branches."""
    state = initial_state("BranchInForeachFlow", "1")
    run(BRANCH_IN_FOREACH, state, "start/0", ok_foreach("body", "items", 2))
    run(BRANCH_IN_FOREACH, state, "body/0", ok("x", "y"))
    run(BRANCH_IN_FOREACH, state, "body/1", ok("x", "y"))
    assert ready(state) == ["x/0", "y/0", "x/1", "y/1"]

    run(BRANCH_IN_FOREACH, state, "y/1", ok("branch_join"))
    run(BRANCH_IN_FOREACH, state, "x/0", ok("branch_join"))
    assert "branch_join/0" not in state.tasks
    assert "branch_join/1" not in state.tasks
    assert run(BRANCH_IN_FOREACH, state, "x/1", ok("branch_join")).new_tasks == ["branch_join/1"]
    assert parents(state, "branch_join/1") == [["x", "1"], ["y", "1"]]
    assert run(BRANCH_IN_FOREACH, state, "y/0", ok("branch_join")).new_tasks == ["branch_join/0"]
    assert parents(state, "branch_join/0") == [["x", "0"], ["y", "0"]]

    run(BRANCH_IN_FOREACH, state, "branch_join/1", ok("foreach_join"))
    d = run(BRANCH_IN_FOREACH, state, "branch_join/0", ok("foreach_join"))
    assert d.new_tasks == ["foreach_join/0"]
    assert parents(state, "foreach_join/0") == [["branch_join", "0"], ["branch_join", "1"]]


# ------------------------------------------------------------------ foreach


def test_foreach_creates_one_task_per_split_and_the_join_after_the_last() -> None:
    """N splits: tasks 0..N-1 with their split index; the join has them in index order."""
    state = initial_state("ForeachFlow", "1")
    d = run(FOREACH, state, "start/0", ok_foreach("body", "items", 4))
    assert d.new_tasks == ["body/0", "body/1", "body/2", "body/3"]
    for i in range(4):
        task = state.tasks[f"body/{i}"]
        assert (task.task_id, task.index, task.split_index) == (str(i), [i], i)
        assert task.parents == [["start", "0"]]
        start(state, task.key)

    for i in (3, 1, 0):
        assert finish(FOREACH, state, f"body/{i}", ok("join")).new_tasks == []
    assert "join/0" not in state.tasks
    d = finish(FOREACH, state, "body/2", ok("join"))
    assert d.new_tasks == ["join/0"]
    join = state.tasks["join/0"]
    assert join.parents == [["body", "0"], ["body", "1"], ["body", "2"], ["body", "3"]]
    assert (join.index, join.split_index) == ([], None)


def test_nested_foreach_names_tasks_by_both_indexes_and_joins_each_row() -> None:
    """Inner tasks are 'i-j'; the inner join of row i comes once row i is complete."""
    state = initial_state("NestedFlow", "1")
    run(NESTED, state, "start/0", ok_foreach("per_outer", "outer", 3))
    for i in range(3):
        d = run(NESTED, state, f"per_outer/{i}", ok_foreach("cell", "inner", 2))
        assert d.new_tasks == [f"cell/{i}-0", f"cell/{i}-1"]
    cell = state.tasks["cell/2-1"]
    assert (cell.index, cell.split_index, cell.parents) == ([2, 1], 1, [["per_outer", "2"]])

    # Row 2 completes first: only its inner join appears.
    run(NESTED, state, "cell/2-1", ok("inner_join"))
    run(NESTED, state, "cell/0-0", ok("inner_join"))
    d = run(NESTED, state, "cell/2-0", ok("inner_join"))
    assert d.new_tasks == ["inner_join/2"]
    assert parents(state, "inner_join/2") == [["cell", "2-0"], ["cell", "2-1"]]
    assert state.tasks["inner_join/2"].index == [2]
    assert "inner_join/0" not in state.tasks
    assert run(NESTED, state, "cell/0-1", ok("inner_join")).new_tasks == ["inner_join/0"]
    run(NESTED, state, "cell/1-0", ok("inner_join"))
    assert run(NESTED, state, "cell/1-1", ok("inner_join")).new_tasks == ["inner_join/1"]

    run(NESTED, state, "inner_join/0", ok("outer_join"))
    run(NESTED, state, "inner_join/2", ok("outer_join"))
    assert "outer_join/0" not in state.tasks
    d = run(NESTED, state, "inner_join/1", ok("outer_join"))
    assert d.new_tasks == ["outer_join/0"]
    assert parents(state, "outer_join/0") == [["inner_join", "0"], ["inner_join", "1"], ["inner_join", "2"]]
    run(NESTED, state, "outer_join/0", ok("end"))
    assert run(NESTED, state, "end/0", ok()).finished == OK


def test_foreach_of_more_splits_than_allowed_fails_the_run() -> None:
    """The message names --max-num-splits; no split task is created."""
    state = initial_state("ForeachFlow", "1", max_num_splits=3)
    d = run(FOREACH, state, "start/0", ok_foreach("body", "items", 4))
    assert d.finished == FAILED
    assert d.new_tasks == []
    assert state.status == FAILED
    assert state.message is not None
    assert "--max-num-splits" in state.message
    assert "4 splits" in state.message
    assert list(state.tasks) == ["start/0"]


def test_foreach_of_exactly_max_num_splits_runs() -> None:
    """The limit itself is allowed."""
    state = initial_state("ForeachFlow", "1", max_num_splits=3)
    d = run(FOREACH, state, "start/0", ok_foreach("body", "items", 3))
    assert d.finished is None
    assert d.new_tasks == ["body/0", "body/1", "body/2"]


def test_empty_foreach_fails_the_run() -> None:
    """Zero splits could never reach the join: the run fails, naming the variable."""
    state = initial_state("ForeachFlow", "1")
    d = run(FOREACH, state, "start/0", ok_foreach("body", "items", 0))
    assert d.finished == FAILED
    assert state.status == FAILED
    assert "self.items has no items" in (state.message or "")
    assert list(state.tasks) == ["start/0"]


# ------------------------------------------------------------------ switch


def test_switch_creates_only_the_chosen_branch() -> None:
    """The other case never gets a task, and end after the chosen one finishes the run."""
    state = initial_state("SwitchFlow", "1")
    d = run(SWITCH, state, "start/0", ok_switch("large", "large"))
    assert d.new_tasks == ["large/0"]
    assert state.tasks["start/0"].outcome == {"next": ["large"], "switch": {"value": "large", "step": "large"}}
    run(SWITCH, state, "large/0", ok("end"))
    assert run(SWITCH, state, "end/0", ok()).finished == OK
    assert sorted(state.tasks) == ["end/0", "large/0", "start/0"]


def test_switch_loop_revisits_steps_with_dotted_task_ids() -> None:
    """Each new visit of a step appends .N; the parent is the previous visit's switch."""
    state = initial_state("LoopFlow", "1")
    run(LOOP, state, "start/0", ok("work"))
    run(LOOP, state, "work/0", ok("check"))
    assert run(LOOP, state, "check/0", ok_switch("again", "work")).new_tasks == ["work/0.1"]
    assert parents(state, "work/0.1") == [["check", "0"]]
    assert state.tasks["work/0.1"].visit == 1
    assert run(LOOP, state, "work/0.1", ok("check")).new_tasks == ["check/0.1"]
    run(LOOP, state, "check/0.1", ok_switch("again", "work"))
    run(LOOP, state, "work/0.2", ok("check"))
    d = run(LOOP, state, "check/0.2", ok_switch("done", "end"))
    assert d.new_tasks == ["end/0"]
    assert parents(state, "end/0") == [["check", "0.2"]]
    assert run(LOOP, state, "end/0", ok()).finished == OK
    assert list(state.tasks) == [
        "start/0",
        "work/0",
        "check/0",
        "work/0.1",
        "check/0.1",
        "work/0.2",
        "check/0.2",
        "end/0",
    ]


# ------------------------------------------------------------------ retries


def test_retry_waits_minutes_between_retries_and_fails_after_the_last() -> None:
    """@retry(times=2, minutes_between_retries=1): 3 attempts, 60 s apart, then the run fails."""
    state = initial_state("RetryFlow", "1")
    run(RETRY, state, "start/0", ok("flaky"))
    assert next_wakeup(state) is None

    d = run(RETRY, state, "flaky/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0)
    task = state.tasks["flaky/0"]
    assert d.finished is None
    assert d.cancel == []
    assert (task.status, task.not_before) == (PENDING, T0 + 60)
    assert task.attempts[0].status == FAILED
    assert task.attempts[0].kind == "user"
    assert task.attempts[0].message == "builtins.ValueError: boom"
    assert next_wakeup(state) == T0 + 60
    assert ready(state, T0 + 59.9) == []
    assert ready(state, T0 + 60) == ["flaky/0"]

    run(RETRY, state, "flaky/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0 + 70)
    assert (task.status, task.not_before) == (PENDING, T0 + 130)
    assert next_wakeup(state) == T0 + 130

    d = run(RETRY, state, "flaky/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0 + 140)
    assert d.finished == FAILED
    assert state.status == FAILED
    assert task.status == FAILED
    assert [a.number for a in task.attempts] == [0, 1, 2]
    assert "flaky" in (state.message or "")
    assert "builtins.ValueError: boom" in (state.message or "")
    assert next_wakeup(state) is None


def test_retry_then_success_goes_on() -> None:
    """A retried task that succeeds continues the run from its successful attempt."""
    state = initial_state("RetryFlow", "1")
    run(RETRY, state, "start/0", ok("flaky"))
    run(RETRY, state, "flaky/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0)
    d = run(RETRY, state, "flaky/0", ok("end"), now=T0 + 60)
    assert d.new_tasks == ["end/0"]
    assert state.tasks["flaky/0"].ok_attempt == 1
    assert run(RETRY, state, "end/0", ok(), now=T0 + 61).finished == OK


def test_user_failure_without_retry_fails_the_run_at_once() -> None:
    """No @retry: one attempt."""
    state = initial_state("LinearFlow", "1")
    run(LINEAR, state, "start/0", ok("middle"))
    d = run(LINEAR, state, "middle/0", failed(), exit_code=EXIT_USER_FAILURE)
    assert d.finished == FAILED
    assert len(state.tasks["middle/0"].attempts) == 1


@pytest.mark.parametrize(
    ("exit_code", "done"),
    [
        (
            EXIT_INFRA_FAILURE,
            {
                "status": "failed",
                "exit_code": EXIT_INFRA_FAILURE,
                "exception": {"type": "millstream.errors.DatastoreError", "message": "disk gone", "traceback": "..."},
            },
        ),
        (-9, None),  # killed, no done marker
        (EXIT_OK, None),  # exited 0 but never wrote its outcome
    ],
    ids=["exit-2", "killed", "no-done-marker"],
)
def test_infra_failures_are_retried_without_retry_decorator(exit_code: int, done: dict[str, Any] | None) -> None:
    """INFRA_RETRIES immediate retries, then the run fails."""
    state = initial_state("LinearFlow", "1")
    run(LINEAR, state, "start/0", ok("middle"))
    task = state.tasks["middle/0"]
    for i in range(INFRA_RETRIES):
        d = run(LINEAR, state, "middle/0", done, exit_code=exit_code, now=T0 + i)
        assert d.finished is None
        assert task.status == PENDING
        assert task.attempts[-1].kind == "infra"
        assert ready(state, T0 + i) == ["middle/0"]  # no wait
    d = run(LINEAR, state, "middle/0", done, exit_code=exit_code, now=T0 + 10)
    assert d.finished == FAILED
    assert len(task.attempts) == INFRA_RETRIES + 1
    message = task.attempts[-1].message or ""
    if done is None:
        assert f"exited with code {exit_code} and no done marker" in message
    else:
        assert message == "millstream.errors.DatastoreError: disk gone"


def test_infra_failures_do_not_use_up_user_retries() -> None:
    """Each kind is counted on its own: an infra failure, then three user failures."""
    state = initial_state("RetryFlow", "1")
    run(RETRY, state, "start/0", ok("flaky"))
    run(RETRY, state, "flaky/0", None, exit_code=-9, now=T0)
    for i in range(2):
        run(RETRY, state, "flaky/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0 + 100 * i)
        assert state.tasks["flaky/0"].status == PENDING
    d = run(RETRY, state, "flaky/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0 + 300)
    assert d.finished == FAILED
    assert [a.kind for a in state.tasks["flaky/0"].attempts] == ["infra", "user", "user", "user"]


def test_no_retry_exit_code_fails_at_once_despite_retry() -> None:
    """EXIT_NO_RETRY: the flow is wrong, so @retry does not apply."""
    state = initial_state("RetryFlow", "1")
    run(RETRY, state, "start/0", ok("flaky"))
    done = failed("millstream.task.runner._NoRetry", "step 'flaky' called self.next(a) at run time")
    d = run(RETRY, state, "flaky/0", done, exit_code=EXIT_NO_RETRY)
    assert d.finished == FAILED
    assert state.status == FAILED
    assert len(state.tasks["flaky/0"].attempts) == 1
    assert "called self.next(a) at run time" in (state.message or "")


# ------------------------------------------------------------------ failing and cancelling


def test_failure_cancels_running_attempts_and_fails_once_they_report() -> None:
    """The run is 'failing' until every running attempt reported; they end cancelled."""
    state = initial_state("BranchFlow", "1")
    run(BRANCH, state, "start/0", ok("a", "b", "c"))
    for key in ("a/0", "b/0", "c/0"):
        start(state, key)

    d = finish(BRANCH, state, "a/0", failed(), exit_code=EXIT_USER_FAILURE)
    assert state.status == "failing"
    assert d.cancel == [("b/0", 0), ("c/0", 0)]
    assert d.finished is None
    assert not state.finished
    assert ready(state) == []

    d = finish(BRANCH, state, "b/0", None, exit_code=-15)  # killed: no done marker
    assert d.finished is None
    assert state.tasks["b/0"].status == CANCELLED
    assert state.tasks["b/0"].attempts[0].status == CANCELLED
    assert state.tasks["b/0"].attempts[0].kind is None

    d = finish(BRANCH, state, "c/0", failed("builtins.KeyboardInterrupt", ""), exit_code=EXIT_USER_FAILURE)
    assert d.finished == FAILED
    assert state.status == FAILED
    assert state.tasks["c/0"].status == CANCELLED
    assert state.tasks["a/0"].status == FAILED
    assert "step a (task a/0) failed" in (state.message or "")
    assert "join/0" not in state.tasks


def test_success_reported_while_failing_starts_nothing() -> None:
    """A branch that finishes after the run began failing does not expand."""
    state = initial_state("BranchFlow", "1")
    run(BRANCH, state, "start/0", ok("a", "b", "c"))
    for key in ("a/0", "b/0", "c/0"):
        start(state, key)
    finish(BRANCH, state, "c/0", failed(), exit_code=EXIT_USER_FAILURE)
    d = finish(BRANCH, state, "b/0", ok("b2"))
    assert d.new_tasks == []
    assert "b2/0" not in state.tasks
    assert finish(BRANCH, state, "a/0", None, exit_code=-15).finished == FAILED


def test_waiting_retry_is_cancelled_when_the_run_fails() -> None:
    """A task waiting for its retry never runs once another task failed the run."""
    state = initial_state("BranchFlow", "1")
    run(BRANCH, state, "start/0", ok("a", "b", "c"))
    for key in ("a/0", "b/0", "c/0"):
        start(state, key)
    finish(BRANCH, state, "b/0", failed(), exit_code=EXIT_USER_FAILURE)
    assert state.tasks["b/0"].status == PENDING
    finish(BRANCH, state, "c/0", ok("join"))
    d = finish(BRANCH, state, "a/0", failed(), exit_code=EXIT_USER_FAILURE)
    assert d.cancel == []
    assert d.finished == FAILED
    assert state.tasks["b/0"].status == CANCELLED
    assert ready(state, T0 + 3600) == []


def test_failing_run_has_no_wakeup_for_a_waiting_retry() -> None:
    """While the run is failing the retry will never start, so the driver need not wake for it."""
    state = initial_state("BranchFlow", "1")
    run(BRANCH, state, "start/0", ok("a", "b", "c"))
    for key in ("a/0", "b/0", "c/0"):
        start(state, key)
    finish(BRANCH, state, "b/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0)
    assert next_wakeup(state) == T0 + 60
    d = finish(BRANCH, state, "a/0", failed(), exit_code=EXIT_USER_FAILURE, now=T0 + 1)
    assert d.cancel == [("c/0", 0)]
    assert state.status == "failing"
    assert next_wakeup(state) is None
    assert ready(state, T0 + 60) == []
    assert finish(BRANCH, state, "c/0", None, exit_code=-15, now=T0 + 90).finished == FAILED
    assert state.tasks["b/0"].status == CANCELLED


def test_cancel_run_kills_running_attempts_and_ends_cancelled() -> None:
    """cancel_run lists every running attempt; the run ends once they all reported."""
    state = initial_state("ForeachFlow", "1")
    run(FOREACH, state, "start/0", ok_foreach("body", "items", 3))
    for i in range(3):
        start(state, f"body/{i}")
    run_ok = finish(FOREACH, state, "body/0", ok("join"))
    assert run_ok.new_tasks == []

    d = cancel_run(state, "stopped by alice")
    assert state.status == "cancelling"
    assert state.message == "stopped by alice"
    assert d.cancel == [("body/1", 0), ("body/2", 0)]
    assert d.finished is None
    assert ready(state) == []
    assert cancel_run(state).cancel == []  # a second cancel adds nothing

    assert finish(FOREACH, state, "body/1", None, exit_code=-15).finished is None
    d = finish(FOREACH, state, "body/2", ok("join"))  # finished before the kill landed
    assert d.new_tasks == []
    assert d.finished == CANCELLED
    assert state.status == CANCELLED
    assert state.tasks["body/1"].status == CANCELLED
    assert "join/0" not in state.tasks


def test_cancel_run_with_nothing_running_ends_at_once() -> None:
    """A run with only a waiting retry is cancelled immediately, the retry with it."""
    state = initial_state("RetryFlow", "1")
    run(RETRY, state, "start/0", ok("flaky"))
    run(RETRY, state, "flaky/0", failed(), exit_code=EXIT_USER_FAILURE)
    d = cancel_run(state)
    assert d.cancel == []
    assert d.finished == CANCELLED
    assert state.status == CANCELLED
    assert state.tasks["flaky/0"].status == CANCELLED
    assert next_wakeup(state) is None


def test_cancel_run_of_a_finished_run_changes_nothing() -> None:
    """A succeeded run stays succeeded."""
    state = initial_state("LinearFlow", "1")
    run(LINEAR, state, "start/0", ok("middle"))
    run(LINEAR, state, "middle/0", ok("end"))
    run(LINEAR, state, "end/0", ok())
    d = cancel_run(state)
    assert (d.cancel, d.finished, state.status) == ([], None, OK)


# ------------------------------------------------------------------ reports and checkpoints


def test_duplicate_report_is_ignored() -> None:
    """A second report of the same attempt changes nothing and creates nothing."""
    state = initial_state("BranchFlow", "1")
    number = start(state, "start/0")
    first = attempt_finished(BRANCH, state, "start/0", number, exit_code=0, done=ok("a", "b", "c"), now=T0)
    assert first.new_tasks == ["a/0", "b/0", "c/0"]
    before = json.dumps(state.to_dict())
    again = attempt_finished(BRANCH, state, "start/0", number, exit_code=0, done=ok("a", "b", "c"), now=T0 + 5)
    assert again == Decisions()
    assert json.dumps(state.to_dict()) == before

    # Nor does a contradicting late report flip a failed attempt.
    start(state, "a/0")
    finish(BRANCH, state, "a/0", failed(), exit_code=EXIT_USER_FAILURE)
    late = attempt_finished(BRANCH, state, "a/0", 0, exit_code=0, done=ok("join"), now=T0 + 9)
    assert late == Decisions()
    assert state.tasks["a/0"].attempts[0].status == FAILED
    assert state.status == FAILED


def _to_middle(state: RunState) -> None:
    """A nested-foreach run part-way: rows started, one cell waiting for its retry."""
    run(NESTED, state, "start/0", ok_foreach("per_outer", "outer", 2))
    run(NESTED, state, "per_outer/0", ok_foreach("cell", "inner", 2))
    start(state, "per_outer/1", now=T0 + 1)
    run(NESTED, state, "cell/0-0", ok("inner_join"), now=T0 + 2)
    run(NESTED, state, "cell/0-1", None, exit_code=-9, now=T0 + 3)  # infra: retried


def _to_end(state: RunState) -> list[str]:
    """Finish the run from :func:`_to_middle`; returns the keys in the order they ran."""
    order = []
    finish(NESTED, state, "per_outer/1", ok_foreach("cell", "inner", 2), now=T0 + 10)
    now = T0 + 20
    while not state.finished:
        keys = ready(state, now)
        assert keys, "the run is stuck"
        for key in keys:
            step = key.split("/")[0]
            outcome = {"cell": ok("inner_join"), "inner_join": ok("outer_join"), "outer_join": ok("end"), "end": ok()}[
                step
            ]
            run(NESTED, state, key, outcome, now=now)
            order.append(key)
            now += 1
    return order


def test_run_state_round_trips_through_json_mid_run() -> None:
    """from_dict(json(to_dict)) is equal, and both copies finish the same way."""
    state = initial_state("NestedFlow", "7", max_num_splits=50)
    _to_middle(state)
    assert state.arrivals  # a half-filled join is part of what must survive

    data = json.loads(json.dumps(state.to_dict()))
    restored = RunState.from_dict(data)
    assert restored.to_dict() == state.to_dict()
    assert ready(restored, T0 + 3) == ready(state, T0 + 3) == ["cell/0-1"]
    assert next_wakeup(restored) == next_wakeup(state)

    order = _to_end(state)
    restored_order = _to_end(restored)
    assert restored_order == order
    assert order[:3] == ["cell/0-1", "cell/1-0", "cell/1-1"]
    assert restored.status == state.status == OK
    assert restored.to_dict() == state.to_dict()
    assert restored.tasks["cell/0-1"].ok_attempt == 1


def test_from_dict_leaves_its_input_alone() -> None:
    """Restoring twice from the same parsed checkpoint gives the same state."""
    state = initial_state("NestedFlow", "7")
    _to_middle(state)
    data = json.loads(json.dumps(state.to_dict()))
    snapshot = json.dumps(data)
    first = RunState.from_dict(data)
    assert json.dumps(data) == snapshot
    assert RunState.from_dict(data).to_dict() == first.to_dict()


def test_from_dict_refuses_another_checkpoint_version() -> None:
    """An unknown version is an error, not a guess."""
    data = initial_state("LinearFlow", "1").to_dict()
    data["version"] = 999
    with pytest.raises(ValueError, match="checkpoint version 999"):
        RunState.from_dict(data)


def test_two_runs_of_the_same_outcomes_name_tasks_identically() -> None:
    """Task names depend on the run's structure only, not on timing or report order."""
    a, b = initial_state("NestedFlow", "1"), initial_state("NestedFlow", "2")
    _to_middle(a)
    _to_middle(b)
    _to_end(a)
    _to_end(b)
    assert list(a.tasks) == list(b.tasks)
    assert {k: t.parents for k, t in a.tasks.items()} == {k: t.parents for k, t in b.tasks.items()}
