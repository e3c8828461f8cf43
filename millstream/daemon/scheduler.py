"""The pure scheduler: a run's graph and state in, decisions out.

Nothing here does I/O or reads a clock: ``now`` is an argument. The async driver
(:mod:`millstream.daemon.driver`) launches what :func:`ready_tasks` names and feeds
every attempt's outcome back through :func:`attempt_finished`.

Tasks are named deterministically from their place in the run, so a restarted
daemon derives the same names and finds the same datastore records:

- a step outside any foreach has task ``0``;
- inside foreach splits, the split indexes joined by ``-`` (``3``, ``3-1``);
- a step reached again through a switch loop gets ``.N`` appended (``0.1``).

A task that fails for good fails the run: running attempts are cancelled (killed)
and the run ends ``failed`` once none is left, as Metaflow's local runtime does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from millstream.task.spec import EXIT_INFRA_FAILURE, EXIT_NO_RETRY

CHECKPOINT_VERSION = 1
# Lost processes and datastore failures are retried even without @retry.
INFRA_RETRIES = 2
MAX_ATTEMPTS = 21

PENDING, RUNNING, OK, FAILED, CANCELLED = "pending", "running", "ok", "failed", "cancelled"


def task_key(step: str, task_id: str) -> str:
    """``step/task_id``: a task's name within its run."""
    return f"{step}/{task_id}"


def make_task_id(index: tuple[int, ...] | list[int], visit: int = 0) -> str:
    """The deterministic task id of a step's task (see the module docstring)."""
    base = "-".join(str(i) for i in index) if index else "0"
    return f"{base}.{visit}" if visit else base


@dataclass
class Attempt:
    """One try at a task."""

    number: int
    status: str = RUNNING
    handle: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    message: str | None = None
    kind: str | None = None  # why it failed: "user" (the step raised) or "infra"


@dataclass
class Task:
    """One execution of a step at one place in the foreach structure."""

    step: str
    task_id: str
    index: list[int]
    visit: int = 0
    parents: list[list[str]] = field(default_factory=list)  # [step, task_id]
    split_index: int | None = None
    status: str = PENDING
    attempts: list[Attempt] = field(default_factory=list)
    not_before: float = 0.0
    outcome: dict[str, Any] | None = None  # next / foreach / switch from the done marker

    @property
    def key(self) -> str:
        """``step/task_id``."""
        return task_key(self.step, self.task_id)

    @property
    def ok_attempt(self) -> int | None:
        """The number of the attempt that succeeded."""
        for a in self.attempts:
            if a.status == OK:
                return a.number
        return None


@dataclass
class RunState:
    """Everything the scheduler knows about a run; checkpointed as JSON."""

    flow: str
    run_id: str
    max_num_splits: int = 100
    status: str = RUNNING
    message: str | None = None
    tasks: dict[str, Task] = field(default_factory=dict)
    arrivals: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    origin: dict[str, Any] | None = None  # a resume's plan (see millstream.daemon.resume)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for checkpoints (hand-rolled: ``asdict`` deep-copies and is 10x slower)."""
        tasks = {}
        for key, t in self.tasks.items():
            d = dict(t.__dict__)
            d["attempts"] = [dict(a.__dict__) for a in t.attempts]
            tasks[key] = d
        return {
            "version": CHECKPOINT_VERSION,
            "flow": self.flow,
            "run_id": self.run_id,
            "max_num_splits": self.max_num_splits,
            "status": self.status,
            "message": self.message,
            "tasks": tasks,
            "arrivals": {k: dict(v) for k, v in self.arrivals.items()},
            "origin": self.origin,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        version = data.pop("version", None)
        if version != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {version!r} is not {CHECKPOINT_VERSION}")
        tasks = {}
        for key, t in data.pop("tasks").items():
            # Not t.pop("attempts"): that would empty the caller's checkpoint dict.
            fields = {k: v for k, v in t.items() if k != "attempts"}
            tasks[key] = Task(**fields, attempts=[Attempt(**a) for a in t["attempts"]])
        return cls(**data, tasks=tasks)

    @property
    def finished(self) -> bool:
        """True once the run has an end state."""
        return self.status in (OK, FAILED, CANCELLED)


@dataclass
class Decisions:
    """What the driver must do after a state change."""

    cancel: list[tuple[str, int]] = field(default_factory=list)  # (task key, attempt)
    new_tasks: list[str] = field(default_factory=list)
    finished: str | None = None  # the run's end status, once reached


def initial_state(flow: str, run_id: str, *, max_num_splits: int = 100) -> RunState:
    """A new run: one pending ``start`` task."""
    state = RunState(flow=flow, run_id=run_id, max_num_splits=max_num_splits)
    start = Task(step="start", task_id=make_task_id(()), index=[])
    state.tasks[start.key] = start
    return state


def ready_tasks(state: RunState, now: float) -> list[Task]:
    """Tasks whose next attempt may start now, in creation order."""
    if state.status != RUNNING:
        return []
    return [t for t in state.tasks.values() if t.status == PENDING and t.not_before <= now]


def next_wakeup(state: RunState) -> float | None:
    """The earliest time a retry waiting for ``minutes_between_retries`` becomes ready."""
    if state.status != RUNNING:
        return None  # a failing or cancelling run starts nothing more (see ready_tasks)
    times = [t.not_before for t in state.tasks.values() if t.status == PENDING and t.not_before > 0]
    return min(times) if times else None


def attempt_started(state: RunState, key: str, handle: dict[str, Any] | None, now: float) -> Attempt:
    """Record that the next attempt of a task was launched."""
    task = state.tasks[key]
    attempt = Attempt(number=len(task.attempts), handle=handle, started_at=now)
    task.attempts.append(attempt)
    task.status = RUNNING
    return attempt


def _decorator(graph: dict[str, Any], step: str, name: str) -> dict[str, Any] | None:
    for d in graph["steps"][step].get("decorators", []):
        if d["name"] == name:
            return dict(d["attributes"])
    return None


def max_user_retries(graph: dict[str, Any], step: str) -> int:
    """How many times @retry lets a failing step run again."""
    retry = _decorator(graph, step, "retry")
    return int(retry["times"]) if retry else 0


def _running(state: RunState) -> list[tuple[str, int]]:
    return [(t.key, a.number) for t in state.tasks.values() for a in t.attempts if a.status == RUNNING]


def settle(state: RunState, decisions: Decisions | None = None) -> Decisions:
    """End the run if nothing is left to do: succeeded, or failed/cancelled once idle."""
    decisions = decisions or Decisions()
    if state.status == RUNNING:
        # `end` is outside any foreach and cannot be looped to, so its one task is end/0;
        # checking it first keeps this O(1) until the run is nearly done.
        end = state.tasks.get(task_key("end", make_task_id(())))
        if end is None or end.status != OK:
            return decisions
        active = [t for t in state.tasks.values() if t.status in (PENDING, RUNNING)]
        if not active:
            state.status = OK
            decisions.finished = OK
    elif state.status in ("failing", "cancelling") and not _running(state):
        for t in state.tasks.values():
            if t.status == PENDING:
                t.status = CANCELLED
        state.status = FAILED if state.status == "failing" else CANCELLED
        decisions.finished = state.status
    return decisions


def _fail_run(state: RunState, message: str, decisions: Decisions) -> None:
    if state.status != RUNNING:
        return
    state.status = "failing"
    state.message = message
    decisions.cancel.extend(_running(state))


def attempt_finished(
    graph: dict[str, Any],
    state: RunState,
    key: str,
    number: int,
    *,
    exit_code: int,
    done: dict[str, Any] | None,
    now: float,
    message: str | None = None,
    kind: str | None = None,
) -> Decisions:
    """Feed back an attempt's end: its exit code and its done marker (None if absent).

    ``kind`` ("user" or "infra"), when the backend knows better than the done marker
    (a Batch job killed for its memory is the step's fault), decides the retry policy.
    """
    decisions = Decisions()
    task = state.tasks[key]
    attempt = task.attempts[number]
    if attempt.status != RUNNING:
        return decisions  # a duplicate report (e.g. after recovery)
    attempt.finished_at = now
    attempt.exit_code = exit_code
    if done is not None and done.get("status") == "ok":
        attempt.status = OK
        task.status = OK
        task.outcome = {k: done[k] for k in ("next", "foreach", "switch") if k in done}
        if state.status == RUNNING:
            _expand(graph, state, task, decisions)
        return settle(state, decisions)

    if done is not None and done.get("exception"):
        exc = done["exception"]
        message = message or f"{exc['type']}: {exc['message']}"
    attempt.message = message or f"attempt exited with code {exit_code} and no done marker"
    if state.status in ("cancelling", "failing"):
        attempt.status = CANCELLED
        task.status = CANCELLED
        return settle(state, decisions)
    attempt.status = FAILED
    attempt.kind = kind or ("infra" if done is None or exit_code == EXIT_INFRA_FAILURE else "user")
    if exit_code != EXIT_NO_RETRY and len(task.attempts) < MAX_ATTEMPTS:
        failures = [a.kind for a in task.attempts if a.status == FAILED]
        limit = max_user_retries(graph, task.step)
        if attempt.kind == "user" and failures.count("user") <= limit:
            retry = _decorator(graph, task.step, "retry")
            task.status = PENDING
            task.not_before = now + 60.0 * float(retry["minutes_between_retries"] if retry else 0)
            return decisions
        if attempt.kind == "infra" and failures.count("infra") <= max(limit, INFRA_RETRIES):
            task.status = PENDING
            task.not_before = now
            return decisions
    task.status = FAILED
    _fail_run(state, f"step {task.step} (task {task.key}) failed: {attempt.message}", decisions)
    return settle(state, decisions)


def cancel_run(state: RunState, message: str = "cancelled") -> Decisions:
    """Stop a run: kill what runs, start nothing more."""
    decisions = Decisions()
    if state.status != RUNNING:
        return decisions
    state.status = "cancelling"
    state.message = message
    decisions.cancel.extend(_running(state))
    return settle(state, decisions)


def expand(graph: dict[str, Any], state: RunState, task: Task) -> Decisions:
    """Create the tasks that follow a task which just succeeded (or was cloned)."""
    decisions = Decisions()
    if state.status == RUNNING:
        _expand(graph, state, task, decisions)
    return settle(state, decisions)


def _add_task(
    state: RunState,
    step: str,
    index: list[int],
    parents: list[list[str]],
    split_index: int | None,
    decisions: Decisions,
) -> Task:
    visit = 0
    while task_key(step, make_task_id(index, visit)) in state.tasks:
        visit += 1
    task = Task(
        step=step,
        task_id=make_task_id(index, visit),
        index=list(index),
        visit=visit,
        parents=parents,
        split_index=split_index,
    )
    state.tasks[task.key] = task
    decisions.new_tasks.append(task.key)
    return task


def _foreach_task(state: RunState, step: str, index: list[int]) -> Task | None:
    # The latest successful visit of the foreach step at this index (visits: switch loops).
    found = None
    visit = 0
    while (t := state.tasks.get(task_key(step, make_task_id(index, visit)))) is not None:
        if t.status == OK:
            found = t
        visit += 1
    return found


def _expand(graph: dict[str, Any], state: RunState, task: Task, decisions: Decisions) -> None:
    steps = graph["steps"]
    node = steps[task.step]
    outcome = task.outcome or {}
    me = [task.step, task.task_id]
    for target in outcome.get("next", []):
        child = steps[target]
        if child["is_join"]:
            _arrive(graph, state, task, target, decisions)
        elif node["type"] == "foreach":
            n = int(outcome["foreach"]["num_splits"])
            if n > state.max_num_splits:
                _fail_run(
                    state,
                    f"foreach in step {task.step} has {n} splits, more than --max-num-splits "
                    f"{state.max_num_splits}; raise --max-num-splits or split the work",
                    decisions,
                )
                return
            if n == 0:
                _fail_run(state, f"foreach in step {task.step} over self.{node['foreach_var']} has no items", decisions)
                return
            for i in range(n):
                _add_task(state, target, [*task.index, i], [me], i, decisions)
        else:
            _add_task(state, target, task.index, [me], None, decisions)


def _arrive(graph: dict[str, Any], state: RunState, task: Task, join: str, decisions: Decisions) -> None:
    steps = graph["steps"]
    split = steps[join]["closes"]
    split_node = steps[split]
    depth = len(steps[join]["foreach_stack"])
    join_index = task.index[:depth]
    if split_node["type"] == "foreach":
        slot = str(task.index[-1])
        owner = _foreach_task(state, split, join_index)
        expected = int(owner.outcome["foreach"]["num_splits"]) if owner and owner.outcome else -1
    else:
        branch = next((s[2] for s in reversed(steps[task.step]["split_stack"]) if s[1] == split), task.step)
        slot = branch
        expected = len(split_node["out"])
    akey = f"{join}/{make_task_id(join_index)}"
    slots = state.arrivals.setdefault(akey, {})
    slots[slot] = [task.step, task.task_id]
    if len(slots) == expected:
        order = [str(i) for i in range(expected)] if split_node["type"] == "foreach" else split_node["out"]
        parents = [slots[s] for s in order]
        del state.arrivals[akey]
        _add_task(state, join, join_index, parents, None, decisions)
