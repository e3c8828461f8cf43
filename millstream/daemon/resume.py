"""Resume: a new run that clones the successful tasks of an earlier one.

Pure functions, like the scheduler. :func:`plan_resume` decides, from the origin run's
graph and state and the new graph, what may be cloned; the driver then asks
:func:`clone_source` for every task that becomes ready and, instead of launching it,
records it with :func:`task_cloned`. Nothing is copied: the run's clone index
(``_run/clones.json``, one write per batch) maps each cloned task to the origin's
attempt, and the tasks that follow read their inputs from there.

The rules are Metaflow's:

- ``resume STEP``: STEP and every step after it run again; every successful task of
  the other steps is cloned.
- ``resume`` alone: every successful task of the origin is cloned, so what failed and
  what comes after it runs again (successful splits of a failed foreach are kept).
- A task is cloned only if its own inputs were cloned too, so nothing mixes old and new
  upstream results.
- A cloned step must be the same in the new code (type and transitions); otherwise the
  resume is refused naming the steps that changed.
"""

from __future__ import annotations

from typing import Any

from millstream.daemon import scheduler as sch
from millstream.errors import SchedulerError


def _shape(node: dict[str, Any]) -> tuple[Any, ...]:
    return (
        node["type"],
        tuple(node["out"]),
        node.get("foreach_var"),
        node.get("condition"),
        tuple(sorted((node.get("cases") or {}).items())),
        bool(node.get("is_join")),
    )


def _descendants(graph: dict[str, Any], step: str) -> set[str]:
    seen: set[str] = set()
    todo = [step]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph["steps"][name]["out"])
    return seen


def plan_resume(
    origin_graph: dict[str, Any],
    origin_state: dict[str, Any],
    new_graph: dict[str, Any],
    *,
    origin_run_id: str,
    step: str | None,
) -> dict[str, Any]:
    """The plan stored in the new run's state; raises SchedulerError with the reason."""
    steps = new_graph["steps"]
    if step is not None and step not in steps:
        raise SchedulerError(f"cannot resume from step {step!r}: the flow has no such step (steps: {', '.join(steps)})")
    rerun = _descendants(new_graph, step) if step else set()
    tasks: dict[str, Any] = {}
    for key, task in origin_state.get("tasks", {}).items():
        if task["status"] != sch.OK or task["step"] in rerun:
            continue
        ok = [a for a in task["attempts"] if a["status"] == sch.OK]
        if not ok:
            continue
        # A task the origin itself cloned points at the run that really ran it.
        handle = ok[0].get("handle") or {}
        run_id, attempt = (
            (handle["origin_run_id"], handle["origin_attempt"])
            if handle.get("cloned_from")
            else (origin_run_id, ok[0]["number"])
        )
        tasks[key] = {"run_id": run_id, "attempt": attempt, "outcome": task.get("outcome"), "parents": task["parents"]}
    cloned_steps = {t.split("/", 1)[0] for t in tasks}
    changed = []
    for name in sorted(cloned_steps):
        old = origin_graph["steps"].get(name)
        new = steps.get(name)
        if new is None:
            changed.append(f"{name} (removed)")
        elif old is None or _shape(old) != _shape(new):
            changed.append(f"{name} (now {new['type']} -> {', '.join(new['out']) or 'nothing'})")
    if changed:
        raise SchedulerError(
            f"cannot resume run {origin_run_id}: steps it would reuse have changed: {'; '.join(changed)}. "
            "Resume from a step before them (resume STEP) or start a new run."
        )
    return {"run_id": origin_run_id, "step": step, "rerun_steps": sorted(rerun), "tasks": tasks}


def clone_source(state: sch.RunState, task: sch.Task) -> int | None:
    """The origin attempt to clone for a ready task, or None if it must run."""
    plan = state.origin
    if not plan or task.attempts:
        return None
    origin = plan["tasks"].get(task.key)
    if origin is None or origin["parents"] != task.parents:
        return None
    for step, task_id in task.parents:
        parent = state.tasks.get(sch.task_key(step, task_id))
        if parent is None or not is_cloned(parent):
            return None
    return int(origin["attempt"])


def is_cloned(task: sch.Task) -> bool:
    """True when a task was cloned from the origin run rather than run."""
    return bool(task.attempts) and bool((task.attempts[-1].handle or {}).get("cloned_from"))


def clone_ref(state: sch.RunState, task: sch.Task) -> tuple[str, int] | None:
    """``(origin run id, origin attempt)`` of a cloned task, or None if it ran here."""
    if not is_cloned(task):
        return None
    handle = task.attempts[-1].handle or {}
    return str(handle["origin_run_id"]), int(handle["origin_attempt"])


def task_cloned(graph: dict[str, Any], state: sch.RunState, key: str, origin_attempt: int, now: float) -> sch.Decisions:
    """Record a task as cloned and create what follows it."""
    task = state.tasks[key]
    plan = state.origin or {}
    origin = plan["tasks"][key]
    pathspec = f"{state.flow}/{origin['run_id']}/{task.step}/{task.task_id}/{origin_attempt}"
    handle = {"cloned_from": pathspec, "origin_run_id": origin["run_id"], "origin_attempt": origin_attempt}
    task.attempts.append(
        sch.Attempt(number=0, status=sch.OK, handle=handle, started_at=now, finished_at=now, exit_code=0)
    )
    task.status = sch.OK
    task.outcome = origin["outcome"]
    return sch.expand(graph, state, task)
