"""What ``runs`` and ``status`` print about runs, steps and tasks the daemon reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from millstream.client.console import format_duration, format_time, table, truncate
from millstream.client.pathspec import Pathspec

STEP_COUNTS = ("pending", "running", "ok", "failed", "cancelled")
MESSAGE_WIDTH = 60


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    """One line per run summary, newest as the daemon sorted them."""
    rows = [
        (r["flow"], r["run_id"], r["status"], r.get("owner", ""),
         format_time(r.get("created_at")),
         format_duration(r.get("created_at"), r.get("finished_at")),
         ",".join(r.get("tags") or []), truncate(r.get("message"), MESSAGE_WIDTH))
        for r in runs
    ]
    return table(("FLOW", "RUN", "STATUS", "OWNER", "STARTED", "DURATION", "TAGS", "MESSAGE"), rows)


def run_report(detail: dict[str, Any]) -> str:
    """A run's summary, its per-step task counts and every failed task with its message."""
    out = [f"{detail['flow']}/{detail['run_id']}  {detail['status']}"]
    out.append(f"  owner     {detail.get('owner', '')}")
    out.append(f"  started   {format_time(detail.get('created_at'))}")
    if detail.get("finished_at") is not None:
        out.append(f"  finished  {format_time(detail.get('finished_at'))}")
    out.append(f"  duration  {format_duration(detail.get('created_at'), detail.get('finished_at'))}")
    if detail.get("tags"):
        out.append(f"  tags      {', '.join(detail['tags'])}")
    if detail.get("params"):
        params = ", ".join(f"{k}={v!r}" for k, v in detail["params"].items())
        out.append(f"  params    {params}")
    if detail.get("message"):
        out.append(f"  message   {detail['message']}")
    steps = detail.get("steps") or {}
    if steps:
        rows = [(name, *(counts.get(k, 0) for k in STEP_COUNTS)) for name, counts in steps.items()]
        out += ["", table(("STEP", *(k.upper() for k in STEP_COUNTS)), rows).rstrip("\n")]
    failed = [t for t in detail.get("tasks") or [] if t.get("status") == "failed"]
    if failed:
        out += ["", "Failed tasks:"]
        for task in failed:
            last = (task.get("attempts") or [{}])[-1]
            exit_code = last.get("exit_code")
            code = f", exit code {exit_code}" if exit_code not in (None, 0) else ""
            out.append(f"  {task['pathspec']} (attempt {last.get('number', 0)}{code})")
            for line in str(last.get("message") or "no message").splitlines():
                out.append(f"      {line}")
    return "\n".join(out) + "\n"


def step_report(detail: dict[str, Any], step: str) -> str:
    """The tasks of one step of a run, with their latest attempt."""
    rows = []
    for task in detail.get("tasks") or []:
        if task.get("step") != step:
            continue
        last = (task.get("attempts") or [{}])[-1]
        rows.append((task["task_id"], task["status"], len(task.get("attempts") or []),
                     format_time(last.get("started_at")),
                     format_duration(last.get("started_at"), last.get("finished_at")),
                     truncate(last.get("message"), MESSAGE_WIDTH)))
    title = f"{detail['flow']}/{detail['run_id']}/{step}\n"
    if not rows:
        return title + "  no tasks yet\n"
    return title + table(("TASK", "STATUS", "ATTEMPTS", "STARTED", "DURATION", "MESSAGE"), rows)


def task_report(detail: dict[str, Any], spec: Pathspec) -> str:
    """Every attempt of one task, with its exit code and message."""
    task = find_task(detail, spec)
    if task is None:
        return f"{spec}: no such task in run {detail['flow']}/{detail['run_id']}\n"
    rows = [(a.get("number"), a.get("status"), format_time(a.get("started_at")),
             format_duration(a.get("started_at"), a.get("finished_at")),
             "" if a.get("exit_code") is None else a["exit_code"], truncate(a.get("message"), MESSAGE_WIDTH))
            for a in task.get("attempts") or []]
    head = f"{task['pathspec']}  {task['status']}\n"
    return head + table(("ATTEMPT", "STATUS", "STARTED", "DURATION", "EXIT", "MESSAGE"), rows)


def find_task(detail: dict[str, Any], spec: Pathspec) -> dict[str, Any] | None:
    """The task of a run detail that a step/task pathspec names."""
    tasks: list[dict[str, Any]] = detail.get("tasks") or []
    for task in tasks:
        if task.get("step") == spec.step and str(task.get("task_id")) == spec.task_id:
            return task
    return None
