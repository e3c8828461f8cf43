"""Resume a run whose origin ran partly on Batch: clones keep pointing at the Batch
jobs' artifacts in S3, nothing cloned is submitted again, and a resumed Batch step is
one new array job running the fixed code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from millstream.datastore import layout
from millstream.datastore.artifacts import deserialize
from millstream.sandbox import ComputeEnvironment
from tests.aws.moto_server import MotoServer
from tests.aws.test_batch_e2e import FLOWS, batch_daemon, read, submitted_jobs  # noqa: F401  (fixture)
from tests.conftest import Daemon
from tests.e2e.helpers import ok_attempt

FLOW = "BatchResumableFlow"


def launch(d: Daemon, flow_file: Path, command: str, *args: str) -> tuple[str, int, str]:
    """``python FLOW command --run-id-file ... ARGS``: (run id, exit code, output)."""
    id_file = d.root / f"run-id-{len(list(d.root.glob('run-id-*')))}"
    proc = d.run_flow(flow_file, command, "--run-id-file", str(id_file), *args, timeout_s=300)
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    return run_id, proc.returncode, proc.stdout + proc.stderr


def tasks(d: Daemon, run_id: str) -> dict[str, dict[str, Any]]:
    """step/task -> the task as the daemon reports it."""
    return {f"{t['step']}/{t['task_id']}": t for t in d.run_state(FLOW, run_id)["tasks"]}


def cloned_from(task: dict[str, Any]) -> str | None:
    """The origin pathspec a task was cloned from, None if it ran."""
    return (task["attempts"][-1]["handle"] or {}).get("cloned_from") if task["attempts"] else None


def artifact(moto: MotoServer, bucket: str, d: Daemon, run_id: str, step: str, name: str,
             task_id: str = "0") -> Any:
    """An artifact of a task's successful attempt, following a clone to its origin."""
    task = tasks(d, run_id)[f"{step}/{task_id}"]
    attempt = ok_attempt(task)
    handle = task["attempts"][attempt]["handle"] or {}
    if handle.get("cloned_from"):
        run_id, attempt = handle["origin_run_id"], handle["origin_attempt"]
    done = json.loads(read(moto, bucket, layout.done_key(FLOW, run_id, step, task_id, attempt)))
    return deserialize(read(moto, bucket, layout.artifact_key(FLOW, done["artifacts"][name]["sha"])))


def array_parents() -> list[Any]:
    """The array jobs moto's Batch has been given."""
    return [j for j in submitted_jobs() if "size" in j.array_properties]


def edit(flow_file: Path, old: str, new: str) -> None:
    """Change the flow's code, as the user fixing it does."""
    text = flow_file.read_text()
    assert old in text
    flow_file.write_text(text.replace(old, new))


@pytest.mark.timeout(600)
def test_resume_of_a_run_that_ran_partly_on_batch(batch_daemon: Daemon, moto: MotoServer, bucket: str,
                                                  compute_env: ComputeEnvironment, tmp_path: Path) -> None:
    width = 4
    flow_file = tmp_path / "flow" / "batch_resumable_flow.py"
    flow_file.parent.mkdir()
    shutil.copy(FLOWS / "batch_resumable_flow.py", flow_file)

    origin, code, out = launch(batch_daemon, flow_file, "run", "--width", str(width))
    assert code != 0 and "the join is broken" in out, out
    origin_tasks = tasks(batch_daemon, origin)
    assert origin_tasks["join/0"]["status"] == "failed"
    origin_jobs = [origin_tasks[f"square/{i}"]["attempts"][0]["handle"]["job_id"] for i in range(width)]
    assert len(array_parents()) == 1 and len(compute_env.started) == width

    # The join is fixed: resume clones start and every split that ran on Batch, submits nothing.
    edit(flow_file, "BROKEN = True", "BROKEN = False")
    fixed, code, out = launch(batch_daemon, flow_file, "resume")
    assert code == 0, out + batch_daemon.logs[-1].read_text()[-4000:]
    resumed = tasks(batch_daemon, fixed)
    assert {k for k, t in resumed.items() if cloned_from(t)} == {"start/0"} | {f"square/{i}" for i in range(width)}
    assert {k for k, t in resumed.items() if not cloned_from(t)} == {"join/0", "end/0"}
    assert cloned_from(resumed["square/2"]) == f"{FLOW}/{origin}/square/2/0"
    assert len(array_parents()) == 1 and len(compute_env.started) == width
    assert artifact(moto, bucket, batch_daemon, fixed, "join", "values") == [i * i for i in range(width)]
    # The join read the artifacts the origin's Batch jobs wrote to S3.
    assert artifact(moto, bucket, batch_daemon, fixed, "join", "jobs") == origin_jobs
    assert artifact(moto, bucket, batch_daemon, fixed, "join", "split_runs") == [origin] * width
    assert artifact(moto, bucket, batch_daemon, fixed, "end", "origin_seen") == origin

    # Resuming at the Batch step runs it again with the new code, as one new array job.
    edit(flow_file, "OFFSET = 0", "OFFSET = 100")
    again, code, out = launch(batch_daemon, flow_file, "resume", "square", "--origin-run-id", origin)
    assert code == 0, out + batch_daemon.logs[-1].read_text()[-4000:]
    rerun = tasks(batch_daemon, again)
    assert {k for k, t in rerun.items() if cloned_from(t)} == {"start/0"}
    parents = array_parents()
    assert len(parents) == 2 and parents[-1].array_properties["size"] == width
    assert len(compute_env.started) == 2 * width
    assert artifact(moto, bucket, batch_daemon, again, "join", "values") == [i * i + 100 for i in range(width)]
    assert artifact(moto, bucket, batch_daemon, again, "join", "split_runs") == [again] * width
    new_jobs = artifact(moto, bucket, batch_daemon, again, "join", "jobs")
    assert {j.split(":")[0] for j in new_jobs} == {parents[-1].job_id}
