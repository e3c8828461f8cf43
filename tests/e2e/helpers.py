"""Reading a finished run back from the datastore, for the end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from millstream.datastore.artifacts import deserialize
from tests.conftest import Daemon

FLOWS = Path(__file__).parent / "flows"


def run_flow(d: Daemon, flow_file: Path, *args: str, timeout_s: float = 120) -> tuple[str, Any]:
    """Run a flow through the daemon with ``--run-id-file``; returns (run_id, completed process)."""
    id_file = d.root / f"run-id-{flow_file.stem}-{len(list(d.root.glob('run-id-*')))}"
    proc = d.run_flow(flow_file, "run", "--run-id-file", str(id_file), *args, timeout_s=timeout_s)
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    return run_id, proc


def ok_attempt(task: dict[str, Any]) -> int:
    """The number of the attempt of a task (from GET /v1/runs/...) that succeeded."""
    oks = [a["number"] for a in task["attempts"] if a["status"] == "ok"]
    assert len(oks) == 1, task
    return oks[0]


def done_marker(d: Daemon, flow: str, run_id: str, step: str, task_id: str, attempt: int) -> dict[str, Any] | None:
    """An attempt's done marker as stored, or None."""
    path = d.datastore / flow / run_id / step / task_id / str(attempt) / "done.json"
    return json.loads(path.read_text()) if path.exists() else None


def artifact(d: Daemon, flow: str, run_id: str, step: str, name: str, task_id: str = "0") -> Any:
    """An artifact of a task's successful attempt, loaded from the datastore."""
    state = d.run_state(flow, run_id)
    task = next(t for t in state["tasks"] if t["step"] == step and t["task_id"] == task_id)
    handle = task["attempts"][ok_attempt(task)]["handle"] or {}
    if handle.get("cloned_from"):  # cloned by a resume: the origin's attempt holds the data
        run_id, attempt = handle["origin_run_id"], handle["origin_attempt"]
    else:
        attempt = ok_attempt(task)
    done = done_marker(d, flow, run_id, step, task_id, attempt)
    assert done is not None
    sha = done["artifacts"][name]["sha"]
    return deserialize((d.datastore / flow / "data" / sha[:2] / sha).read_bytes())
