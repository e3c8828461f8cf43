"""Resume a run whose origin ran partly on Batch: clones keep pointing at the Batch
jobs' artifacts in S3, nothing cloned is submitted again, and a resumed Batch step is
one new array job running the fixed code."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from millstream.sandbox import ComputeEnvironment
from tests.aws.test_batch_e2e import FLOWS, submitted_jobs
from tests.conftest import Daemon
from tests.e2e.helpers import artifact, clone_origins, run_flow

FLOW = "BatchResumableFlow"


def launch(d: Daemon, flow_file: Path, command: str, *args: str) -> tuple[str, int, str]:
    """``python FLOW COMMAND ARGS``: (run id, exit code, output)."""
    run_id, proc = run_flow(d, flow_file, *args, command=command, timeout_s=300)
    return run_id, proc.returncode, proc.stdout + proc.stderr


def array_parents() -> list[Any]:
    """The array jobs moto's Batch has been given."""
    return [j for j in submitted_jobs() if "size" in j.array_properties]


def edit(flow_file: Path, old: str, new: str) -> None:
    """Change the flow's code, as the user fixing it does."""
    text = flow_file.read_text()
    assert old in text
    flow_file.write_text(text.replace(old, new))


@pytest.mark.timeout(600)
def test_resume_of_a_run_that_ran_partly_on_batch(batch_daemon: Daemon,
                                                  compute_env: ComputeEnvironment, tmp_path: Path) -> None:
    width = 4
    flow_file = tmp_path / "flow" / "batch_resumable_flow.py"
    flow_file.parent.mkdir()
    shutil.copy(FLOWS / "batch_resumable_flow.py", flow_file)

    origin, code, out = launch(batch_daemon, flow_file, "run", "--width", str(width))
    assert code != 0 and "the join is broken" in out, out
    origin_tasks = {f"{t['step']}/{t['task_id']}": t for t in batch_daemon.run_state(FLOW, origin)["tasks"]}
    assert origin_tasks["join/0"]["status"] == "failed"
    origin_jobs = [origin_tasks[f"square/{i}"]["attempts"][0]["handle"]["job_id"] for i in range(width)]
    assert len(array_parents()) == 1 and len(compute_env.started) == width

    # The join is fixed: resume clones start and every split that ran on Batch, submits nothing.
    edit(flow_file, "BROKEN = True", "BROKEN = False")
    fixed, code, out = launch(batch_daemon, flow_file, "resume")
    assert code == 0, out + batch_daemon.logs[-1].read_text()[-4000:]
    resumed = clone_origins(batch_daemon, FLOW, fixed)
    assert {k for k, v in resumed.items() if v} == {"start/0"} | {f"square/{i}" for i in range(width)}
    assert {k for k, v in resumed.items() if not v} == {"join/0", "end/0"}
    assert resumed["square/2"] == f"{FLOW}/{origin}/square/2/0"
    assert len(array_parents()) == 1 and len(compute_env.started) == width
    assert artifact(batch_daemon, FLOW, fixed, "join", "values") == [i * i for i in range(width)]
    # The join read the artifacts the origin's Batch jobs wrote to S3.
    assert artifact(batch_daemon, FLOW, fixed, "join", "jobs") == origin_jobs
    assert artifact(batch_daemon, FLOW, fixed, "join", "split_runs") == [origin] * width
    assert artifact(batch_daemon, FLOW, fixed, "end", "origin_seen") == origin

    # Resuming at the Batch step runs it again with the new code, as one new array job.
    edit(flow_file, "OFFSET = 0", "OFFSET = 100")
    again, code, out = launch(batch_daemon, flow_file, "resume", "square", "--origin-run-id", origin)
    assert code == 0, out + batch_daemon.logs[-1].read_text()[-4000:]
    assert {k for k, v in clone_origins(batch_daemon, FLOW, again).items() if v} == {"start/0"}
    parents = array_parents()
    assert len(parents) == 2 and parents[-1].array_properties["size"] == width
    assert len(compute_env.started) == 2 * width
    assert artifact(batch_daemon, FLOW, again, "join", "values") == [i * i + 100 for i in range(width)]
    assert artifact(batch_daemon, FLOW, again, "join", "split_runs") == [again] * width
    new_jobs = artifact(batch_daemon, FLOW, again, "join", "jobs")
    assert {j.split(":")[0] for j in new_jobs} == {parents[-1].job_id}
