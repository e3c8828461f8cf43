"""``logs``: a task's stdout or stderr from the daemon, whole or followed live."""

from __future__ import annotations

from typing import BinaryIO

from millstream.client.http import DaemonClient, api_path
from millstream.client.pathspec import Pathspec, PathspecError


def task_ids(client: DaemonClient, spec: Pathspec) -> list[str]:
    """The task ids a ``Flow/run/step[/task]`` pathspec names, in the daemon's order."""
    run_id, step = _run_and_step(spec)
    if spec.task_id is not None:
        return [spec.task_id]
    detail = client.request("GET", api_path("runs", spec.flow, run_id))[1]
    found = [str(t["task_id"]) for t in detail.get("tasks") or [] if t.get("step") == step]
    if not found:
        raise PathspecError(f"run {spec.flow}/{run_id} has no tasks of step {step!r}")
    return found


def write_logs(client: DaemonClient, spec: Pathspec, out: BinaryIO, *, stream: str = "stdout",
               attempt: int | None = None, follow: bool = False) -> None:
    """Copy the log of every task ``spec`` names to ``out``, with a header when there are several."""
    run_id, step = _run_and_step(spec)
    ids = task_ids(client, spec)
    for task_id in ids:
        if len(ids) > 1:
            out.write(f"==> {spec.flow}/{run_id}/{step}/{task_id} <==\n".encode())
        path = api_path("runs", spec.flow, run_id, "logs", step, task_id,
                        stream=stream, attempt=attempt, offset=0, follow=1 if follow else None)
        for chunk in client.stream_bytes(path):
            out.write(chunk)
            out.flush()


def _run_and_step(spec: Pathspec) -> tuple[str, str]:
    if spec.run_id is None or spec.step is None:
        raise PathspecError(f"logs needs FLOW/RUN/STEP[/TASK], got {spec}")
    return spec.run_id, spec.step
