"""Flows with @batch steps, end to end: a real daemon, the moto sandbox, real task processes.

The daemon is a subprocess using the S3 datastore on the test's moto server; its Batch
jobs are picked up by the sandbox's emulated compute environment in this process, which
runs each job's bootstrap (code package from S3, task runner, artifacts to S3) and
writes the output to CloudWatch Logs, where the daemon tails it.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from millstream.datastore import layout
from millstream.datastore.artifacts import deserialize
from millstream.datastore.s3 import S3Store
from millstream.sandbox import ComputeEnvironment
from tests.aws.moto_server import MotoServer
from tests.conftest import Daemon, wait_until
from tests.e2e.helpers import ok_attempt, run_flow

FLOWS = Path(__file__).parent / "flows"


def read(moto: MotoServer, bucket: str, key: str) -> bytes:
    """One object of the run's datastore."""
    async def get() -> bytes:
        async with S3Store(bucket, "ms", endpoint_url=moto.url) as store:
            return await store.get(key)

    return asyncio.run(get())


def artifact(moto: MotoServer, bucket: str, d: Daemon, flow: str, run_id: str, step: str, name: str,
             task_id: str = "0") -> Any:
    """An artifact of a task's successful attempt, read from S3."""
    task = next(t for t in d.run_state(flow, run_id)["tasks"] if t["step"] == step and t["task_id"] == task_id)
    done = json.loads(read(moto, bucket, layout.done_key(flow, run_id, step, task_id, ok_attempt(task))))
    return deserialize(read(moto, bucket, layout.artifact_key(flow, done["artifacts"][name]["sha"])))


def submitted_jobs() -> list[Any]:
    """Every job moto's Batch has, array children included."""
    from moto.batch.models import batch_backends

    from millstream.sandbox import ACCOUNT, REGION

    return list(batch_backends[ACCOUNT][REGION]._jobs.values())


@pytest.mark.timeout(300)
def test_hybrid_run_with_a_foreach_as_one_array_job(batch_daemon: Daemon, moto: MotoServer, bucket: str,
                                                    compute_env: ComputeEnvironment) -> None:
    width = 6
    run_id, proc = run_flow(batch_daemon, FLOWS / "hybrid_flow.py", "--width", str(width), timeout_s=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + batch_daemon.logs[-1].read_text()[-4000:]
    assert f"total {sum(i * i for i in range(width))}" in proc.stdout
    flow = "HybridFlow"
    assert artifact(moto, bucket, batch_daemon, flow, run_id, "join", "values") == [i * i for i in range(width)]
    # start and join ran locally, every split on Batch as child i of one array job.
    assert artifact(moto, bucket, batch_daemon, flow, run_id, "start", "start_job") is None
    assert artifact(moto, bucket, batch_daemon, flow, run_id, "join", "join_job") is None
    jobs = artifact(moto, bucket, batch_daemon, flow, run_id, "join", "jobs")
    parents = {j.split(":")[0] for j in jobs}
    assert len(parents) == 1
    parent = next(iter(parents))
    assert jobs == [f"{parent}:{i}" for i in range(width)]
    assert artifact(moto, bucket, batch_daemon, flow, run_id, "join", "indexes") == [str(i) for i in range(width)]
    parents_in_moto = [j for j in submitted_jobs() if "size" in j.array_properties]
    assert len(parents_in_moto) == 1 and parents_in_moto[0].array_properties["size"] == width
    assert len(submitted_jobs()) == width + 1
    # The split's output came through CloudWatch into the datastore's log of the attempt.
    log = read(moto, bucket, layout.stdout_key(flow, run_id, "square", "4", 0)).decode()
    assert f"squaring 4 on {jobs[4]}" in log


def test_a_batch_step_retried_and_an_out_of_memory_kill(batch_daemon: Daemon, moto: MotoServer, bucket: str,
                                                        compute_env: ComputeEnvironment) -> None:
    run_id, proc = run_flow(batch_daemon, FLOWS / "batch_retry_flow.py", "--hog_mb", "600", timeout_s=300)
    assert proc.returncode != 0, proc.stdout
    state = batch_daemon.run_state("BatchRetryFlow", run_id)
    flaky = next(t for t in state["tasks"] if t["step"] == "flaky")
    assert [a["status"] for a in flaky["attempts"]] == ["failed", "failed", "ok"]
    assert "attempt 0 fails on purpose" in flaky["attempts"][0]["message"]
    assert len({a["handle"]["job_id"] for a in flaky["attempts"]}) == 3  # one job per attempt
    assert artifact(moto, bucket, batch_daemon, "BatchRetryFlow", run_id, "flaky", "attempt_seen") == 2
    hog = next(t for t in state["tasks"] if t["step"] == "hog")
    assert hog["status"] == "failed"
    assert "out of memory" in hog["attempts"][0]["message"], hog
    assert "OutOfMemoryError" in hog["attempts"][0]["message"]
    assert len(hog["attempts"]) == 1  # the step's fault: no infrastructure retry without @retry


def test_batch_needs_the_s3_datastore(daemon: Daemon) -> None:
    run_id, proc = run_flow(daemon, FLOWS / "hybrid_flow.py", timeout_s=60)
    assert proc.returncode != 0
    assert "needs the S3 datastore" in proc.stdout + proc.stderr
    assert not run_id


def test_cancel_terminates_the_jobs(batch_daemon: Daemon, compute_env: ComputeEnvironment) -> None:
    import subprocess
    import sys

    compute_env.paused.set()  # the jobs wait in the queue: cancel finds them there
    client = subprocess.Popen([sys.executable, str(FLOWS / "hybrid_flow.py"), "run", "--width", "3"],
                              env=batch_daemon.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: sum(1 for j in submitted_jobs() if ":" in j.job_id) == 3, 60, 0.1)
        status, runs = batch_daemon.request("GET", "/v1/runs")
        run_id = runs["runs"][0]["run_id"]
        status, body = batch_daemon.request("POST", f"/v1/runs/HybridFlow/{run_id}/cancel")
        assert status in (200, 202), body
        wait_until(lambda: all(j.stop for j in submitted_jobs() if ":" in j.job_id), 30, 0.1)
        compute_env.paused.clear()
        wait_until(lambda: batch_daemon.run_state("HybridFlow", run_id)["status"] == "cancelled", 60, 0.1)
    finally:
        client.kill()
        client.communicate(timeout=30)
    children = [j for j in submitted_jobs() if ":" in j.job_id]
    assert all(j.job_stopped_reason == "millstream: cancelled" for j in children)


def test_daemon_killed_while_jobs_run_resubmits_nothing(batch_daemon: Daemon, moto: MotoServer, bucket: str,
                                                         compute_env: ComputeEnvironment) -> None:
    import subprocess
    import sys

    client = subprocess.Popen([sys.executable, str(FLOWS / "hybrid_flow.py"), "run", "--width", "6"],
                              env=batch_daemon.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: len(compute_env.started) >= 1, 90, 0.05)
        assert batch_daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        batch_daemon.start()
        out, _ = client.communicate(timeout=240)
    finally:
        client.kill()
    assert client.returncode == 0, out + batch_daemon.logs[-1].read_text()[-4000:]
    names = [j.job_name for j in submitted_jobs() if ":" not in j.job_id]
    assert len(names) == len(set(names)) == 1  # one array job, submitted once
    assert len(compute_env.started) == 6


def test_logs_are_followed_live_while_the_job_runs(batch_daemon: Daemon, tmp_path: Path,
                                                   compute_env: ComputeEnvironment) -> None:
    import subprocess
    import sys

    release = tmp_path / "release"
    client = subprocess.Popen([sys.executable, str(FLOWS / "talking_flow.py"), "run", "--release", str(release)],
                              env=batch_daemon.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    follower = None
    try:
        wait_until(lambda: any(":" not in j.job_id and j.status == "RUNNING" for j in submitted_jobs()), 90, 0.05)
        run_id = batch_daemon.request("GET", "/v1/runs")[1]["runs"][0]["run_id"]
        follower = subprocess.Popen([sys.executable, "-m", "millstream", "logs", f"TalkingFlow/{run_id}/talk/0",
                                     "--follow"], env=batch_daemon.env, stdout=subprocess.PIPE, text=True)
        assert follower.stdout is not None
        assert follower.stdout.readline().strip() == "first line"
        [talking] = [j for j in submitted_jobs() if j.status == "RUNNING"]
        assert not release.exists()  # the job is still running: the line came live
        release.touch()
        rest, _ = follower.communicate(timeout=90)
        # (The task runner's own S3 client may add an aiohttp warning after it.)
        assert rest.strip().splitlines()[0] == "second line"
        assert follower.returncode == 0
        out, _ = client.communicate(timeout=90)
        assert client.returncode == 0, out
        assert talking.status == "SUCCEEDED"
    finally:
        for proc in (client, follower):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
