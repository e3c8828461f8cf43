"""The Batch backend against moto's Batch (simple mode, jobs held and driven by the test)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import AioSession

from millstream.compute.base import LaunchRequest
from millstream.compute.batch import BOOTSTRAP_COMMAND, BatchBackend, attempt_job_name, job_name
from millstream.compute.batch_watch import CANCEL_REASON, JobPoller
from millstream.config.settings import BatchSettings
from millstream.datastore.s3 import S3Store
from millstream.sandbox import ACCOUNT, LOG_GROUP, SandboxConfig
from millstream.task.spec import TaskSpec
from tests.aws.moto_server import REGION, MotoServer

DATASTORE = {"type": "s3", "bucket": "millstream-test", "prefix": "ms"}


def spec(task_id: str = "0", *, step: str = "train", attempt: int = 0, split: int | None = None) -> TaskSpec:
    """A task spec as the engine would build it."""
    return TaskSpec(flow="BatchFlow", run_id="7", step=step, task_id=task_id, attempt=attempt,
                    package_dir="/state/packages/" + "a" * 64, module_file="flow.py", class_name="BatchFlow",
                    datastore=DATASTORE, params={}, node={"name": step}, split_index=split, username="ann")


def request(tmp_path: Path, s: TaskSpec, **kwargs: Any) -> LaunchRequest:
    """A launch request of a @batch step."""
    kwargs.setdefault("batch", {"cpu": 1, "memory": 2048, "gpu": 0})
    base = tmp_path / "logs" / s.step / s.task_id
    return LaunchRequest(spec=s, stdout_path=str(base / f"{s.attempt}.stdout"),
                         stderr_path=str(base / f"{s.attempt}.stderr"), python="python", package="a" * 64,
                         **kwargs)


def job(job_id: str) -> Any:
    """moto's model of a job (the test plays the compute environment)."""
    from moto.batch.models import batch_backends

    return batch_backends[ACCOUNT][REGION]._jobs[job_id]


def drive(job_id: str, status: str, *, exit_code: int | None = None, reason: str | None = None,
          lines: tuple[str, ...] = ()) -> None:
    """Move a held job along as Batch would, writing log lines to its stream."""
    j = job(job_id)
    if status == "RUNNING" and j.log_stream_name is None:
        import datetime

        j.job_started_at = datetime.datetime.now()
        j.log_stream_name = j._stream_name
        j._start_attempt()
        j._log_backend.ensure_log_group(LOG_GROUP)
        j._log_backend.ensure_log_stream(LOG_GROUP, j.log_stream_name)
    if lines:
        import time

        now = int(time.time() * 1000)
        j._log_backend.put_log_events(LOG_GROUP, j.log_stream_name,
                                      [{"timestamp": now + i, "message": m} for i, m in enumerate(lines)])
    if status in ("SUCCEEDED", "FAILED"):
        j.exit_code = exit_code
        j.job_stopped_reason = reason
        j._mark_stopped(success=status == "SUCCEEDED")
    else:
        j.status = status


@pytest.fixture
async def make_backend(batch_sandbox: SandboxConfig, moto: MotoServer, aws_session: AioSession,
                       bucket: str) -> AsyncIterator[Callable[..., BatchBackend]]:
    """Batch backends on the sandbox queue (each one plays one daemon), closed afterwards."""
    made: list[tuple[BatchBackend, S3Store]] = []

    def make(**settings: Any) -> BatchBackend:
        settings.setdefault("queue", batch_sandbox.queue)
        settings.setdefault("image", "millstream-task:test")
        settings.setdefault("endpoint_url", moto.url)
        settings.setdefault("region", REGION)
        settings.setdefault("poll_interval_s", 0.05)
        settings.setdefault("max_poll_interval_s", 0.2)
        settings.setdefault("submit_rate", 1000.0)
        settings.setdefault("log_rate", 1000.0)
        settings.setdefault("array_window_s", 2.0)
        store = S3Store(bucket, "ms", endpoint_url=moto.url, session=aws_session)
        backend = BatchBackend(BatchSettings(**settings), store=store,
                               datastore_config=dict(DATASTORE, endpoint_url=moto.url), session=aws_session)
        made.append((backend, store))
        return backend

    yield make
    for backend, store in made:
        await backend.close()
        await store.close()


def capture_submits(client: Any) -> list[dict[str, Any]]:
    """Every SubmitJob request the client sends, as botocore builds it."""
    sent: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(json.loads(json.dumps(params)))

    client.meta.events.register("provide-client-params.batch.SubmitJob", record)
    return sent


def test_job_names_are_deterministic_and_valid() -> None:
    assert attempt_job_name(spec("3-1", attempt=2)) == "ms-BatchFlow-7-train-3-1-2"
    assert attempt_job_name(spec("3-1", attempt=2)) == attempt_job_name(spec("3-1", attempt=2))
    # A dot (a switch loop's visit) is not allowed: replaced, and a hash keeps it unique.
    dotted = attempt_job_name(spec("0.1"))
    assert dotted.startswith("ms-BatchFlow-7-train-0_1-0-") and dotted != attempt_job_name(spec("0_1"))
    long = job_name("ms", "F" * 100, "1", "s" * 80, "0", 0)
    assert len(long) == 128 and long == job_name("ms", "F" * 100, "1", "s" * 80, "0", 0)
    assert long != job_name("ms", "F" * 100, "1", "s" * 80, "1", 0)
    assert all(c.isalnum() or c in "-_" for c in long + dotted)


async def test_submit_sends_the_whole_request(make_backend: Callable[..., BatchBackend], tmp_path: Path,
                                              moto: MotoServer) -> None:
    backend = make_backend(job_role="arn:aws:iam::123456789012:role/task")
    sent = capture_submits(await backend._client("batch"))
    r = request(tmp_path, spec("0"), batch={"cpu": 2, "memory": 3000, "gpu": 1, "queue": None,
                                            "aws_batch_tags": {"team": "ml"}},
                cpu=4, memory_mb=1000, timeout_s=30)
    handle = await backend.launch(r)
    assert handle["backend"] == "batch" and handle["stdout"] == r.stdout_path
    [params] = sent
    definition = params.pop("jobDefinition")
    env = {e["name"]: e["value"] for e in params["containerOverrides"].pop("environment")}
    assert params == {
        "jobName": "ms-BatchFlow-7-train-0-0",
        "jobQueue": backend.settings.queue,
        "containerOverrides": {
            "command": BOOTSTRAP_COMMAND,
            # The larger of @batch and @resources, as in Metaflow.
            "resourceRequirements": [{"type": "VCPU", "value": "4"}, {"type": "MEMORY", "value": "3000"},
                                     {"type": "GPU", "value": "1"}],
        },
        "retryStrategy": {"attempts": 1},
        # AWS refuses less than 60 s; the engine's own timer and the task's SIGALRM keep 30 s.
        "timeout": {"attemptDurationSeconds": 60},
        "tags": {"millstream:flow": "BatchFlow", "millstream:run_id": "7", "millstream:step": "train",
                 "millstream:attempt": "0", "millstream:user": "ann", "millstream:task": "0", "team": "ml"},
        "propagateTags": True,
    }
    assert env == {
        "MILLSTREAM_DATASTORE": json.dumps(dict(DATASTORE, endpoint_url=moto.url), sort_keys=True),
        "MILLSTREAM_CODE_PACKAGE": "a" * 64,
        "MILLSTREAM_SPEC_KEY": "BatchFlow/7/_run/batch/ms-BatchFlow-7-train-0-0.json",
        "PYTHONUNBUFFERED": "1",
    }
    described = job(handle["job_id"]).describe()
    assert described["jobDefinition"] == definition
    assert definition.split("/")[-1].startswith("millstream-")
    # The spec the container will run is in the datastore under that key.
    stored = json.loads(await backend.store.get("BatchFlow/7/_run/batch/ms-BatchFlow-7-train-0-0.json"))
    assert stored == [spec("0").to_dict()]


async def test_job_definition_is_registered_once_and_found_by_others(
        make_backend: Callable[..., BatchBackend], tmp_path: Path) -> None:
    first, second = make_backend(), make_backend()
    for i in range(3):
        await first.launch(request(tmp_path, spec(str(i))))
    assert first.calls["register_job_definition"] == 1
    assert first.calls["describe_job_definitions"] == 1  # cached after the first lookup
    await second.launch(request(tmp_path, spec("9")))
    assert "register_job_definition" not in second.calls  # a second daemon finds it
    arns = {job(j).job_definition.arn for j in _job_ids()}
    assert len(arns) == 1
    # Other container properties: another definition.
    await second.launch(request(tmp_path, spec("10"), batch={"image": "other:1", "memory": 100}))
    assert second.calls["register_job_definition"] == 1
    assert len({job(j).job_definition.arn for j in _job_ids()}) == 2


def _job_ids() -> list[str]:
    from moto.batch.models import batch_backends

    return list(batch_backends[ACCOUNT][REGION]._jobs)


@pytest.mark.parametrize(
    ("status", "exit_code", "reason", "expected_code", "kind", "words"),
    [
        ("SUCCEEDED", 0, None, 0, None, None),
        ("FAILED", 1, "Essential container in task exited", 1, None, "exited with code 1"),
        ("FAILED", 3, "Essential container in task exited", 3, None, "exited with code 3"),
        ("FAILED", 137, "OutOfMemoryError: Container killed due to memory usage", 1, "user", "out of memory"),
        ("FAILED", None, "Host EC2 (instance i-0abc) terminated.", 2, "infra", "spot reclaim or a host failure"),
        ("FAILED", None, "Your Spot Instance was reclaimed (terminated)", 2, "infra", "spot capacity was reclaimed"),
        ("FAILED", None, "CannotPullContainerError: pull access denied", 2, "infra", "could not start"),
        ("FAILED", None, "Job attempt duration exceeded timeout", 1, "user", "timed out"),
        ("FAILED", None, CANCEL_REASON, 1, "user", "terminated"),
        ("FAILED", None, None, 2, "infra", "without an exit code"),
    ],
)
def test_status_maps_to_an_attempt_outcome(status: str, exit_code: int | None, reason: str | None,
                                           expected_code: int, kind: str | None, words: str | None) -> None:
    from millstream.compute.batch_watch import job_end

    described: dict[str, Any] = {"jobId": "j", "status": status, "container": {"memory": 2048}}
    if exit_code is not None:
        described["container"]["exitCode"] = exit_code
    if reason:
        described["statusReason"] = reason
    end = job_end(described)
    assert end is not None and end.exit_code == expected_code
    if words is None:
        assert end.reason is None
    else:
        assert end.reason is not None and words in end.reason.message and end.reason.kind == kind
    for running in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING"):
        assert job_end({"jobId": "j", "status": running}) is None


async def test_one_poller_describes_at_most_100_jobs_per_call(make_backend: Callable[..., BatchBackend],
                                                              tmp_path: Path) -> None:
    backend = make_backend()
    client = await backend._client("batch")
    definition = await backend.job_definition({})
    ids = [(await client.submit_job(jobName=f"j{i}", jobQueue=backend.settings.queue,
                                    jobDefinition=definition))["jobId"] for i in range(250)]
    sizes: list[int] = []

    async def describe(chunk: list[str]) -> list[dict[str, Any]]:
        sizes.append(len(chunk))
        return await backend._describe(chunk)

    poller = JobPoller(describe, interval_s=0.05, max_interval_s=0.2)
    stop = asyncio.Event()
    runner = asyncio.create_task(poller.run(stop))
    waiters = [asyncio.create_task(poller.until_done(i)) for i in ids]
    await asyncio.sleep(0.3)
    assert sizes[:3] == [100, 100, 50] and max(sizes) <= 100
    for i, job_id in enumerate(ids):
        drive(job_id, "SUCCEEDED" if i % 2 else "FAILED", exit_code=0 if i % 2 else 1)
    done = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert [d["status"] for d in done] == ["FAILED" if i % 2 == 0 else "SUCCEEDED" for i in range(250)]
    assert poller.watched == 0
    calls = len(sizes)
    await asyncio.sleep(0.3)
    assert len(sizes) == calls  # nothing watched: no call
    stop.set()
    await runner


async def test_interval_grows_while_nothing_changes_and_falls_back(make_backend: Callable[..., BatchBackend],
                                                                   tmp_path: Path) -> None:
    backend = make_backend(poll_interval_s=0.02, max_poll_interval_s=0.5)
    handle = await backend.launch(request(tmp_path, spec("0")))
    waiter = asyncio.create_task(backend.wait(handle))
    await asyncio.sleep(1.0)
    calls_idle = backend.calls["describe_jobs"]
    assert backend.poller.current_interval_s > 0.2  # grown from 0.02 s
    assert calls_idle < 1.0 / 0.02 / 2  # far fewer calls than a fixed 20 ms interval makes
    drive(handle["job_id"], "SUCCEEDED", exit_code=0)
    assert await asyncio.wait_for(waiter, 5) == 0


async def test_wait_follows_cloudwatch_logs_into_the_attempt_file(make_backend: Callable[..., BatchBackend],
                                                                  tmp_path: Path) -> None:
    backend = make_backend()
    r = request(tmp_path, spec("0"))
    handle = await backend.launch(r)
    waiter = asyncio.create_task(backend.wait(handle))
    drive(handle["job_id"], "RUNNING", lines=("first", "second"))
    out = Path(r.stdout_path)
    for _ in range(200):
        if out.is_file() and out.read_text() == "first\nsecond\n":
            break
        await asyncio.sleep(0.02)
    assert out.read_text() == "first\nsecond\n"  # while the job runs
    drive(handle["job_id"], "RUNNING", lines=("third",))
    drive(handle["job_id"], "FAILED", exit_code=1, reason="Essential container in task exited")
    assert await asyncio.wait_for(waiter, 5) == 1
    assert out.read_text() == "first\nsecond\nthird\n"  # drained before wait returns
    reason = backend.exit_reason(handle)
    assert reason is not None and "exited with code 1" in reason.message


async def test_a_restarted_daemon_reattaches_and_never_resubmits(make_backend: Callable[..., BatchBackend],
                                                                 tmp_path: Path) -> None:
    first = make_backend()
    r = request(tmp_path, spec("0"))
    handle = await first.launch(r)
    await first.close()
    second = make_backend()
    assert await second.reattach(handle)
    waiter = asyncio.create_task(second.wait(handle))
    # The daemon died between SubmitJob and its checkpoint: launching the same attempt
    # again finds the job by its name instead of submitting it twice.
    again = await second.launch(r)
    assert again["job_id"] == handle["job_id"]
    assert "submit_job" not in second.calls and second.calls["list_jobs"] == 1
    drive(handle["job_id"], "SUCCEEDED", exit_code=0)
    assert await asyncio.wait_for(waiter, 5) == 0
    assert len(_job_ids()) == 1
    assert not await second.reattach({"backend": "batch", "job_id": "no-such-job"})


async def test_cancel_calls_terminate_job(make_backend: Callable[..., BatchBackend], tmp_path: Path) -> None:
    backend = make_backend()
    handle = await backend.launch(request(tmp_path, spec("0")))
    await backend.cancel(handle, grace_s=5)
    assert backend.calls["terminate_job"] == 1
    assert job(handle["job_id"]).stop and job(handle["job_id"]).job_stopped_reason == CANCEL_REASON


async def test_foreach_splits_become_one_array_job(make_backend: Callable[..., BatchBackend],
                                                   tmp_path: Path) -> None:
    backend = make_backend()
    sent = capture_submits(await backend._client("batch"))
    requests = [request(tmp_path, spec(str(i), split=i), array_key="BatchFlow/7/train/start/0", array_size=5)
                for i in (3, 0, 4, 1, 2)]
    handles = await asyncio.gather(*(backend.launch(r) for r in requests))
    [params] = sent
    assert params["arrayProperties"] == {"size": 5}
    assert "millstream:task" not in params["tags"]
    parent = handles[0]["parent_job_id"]
    # Child i runs split i: AWS_BATCH_JOB_ARRAY_INDEX is the split index.
    assert {r.spec.split_index: h["job_id"] for r, h in zip(requests, handles, strict=True)} == {
        i: f"{parent}:{i}" for i in range(5)}
    key = {e["name"]: e["value"] for e in params["containerOverrides"]["environment"]}["MILLSTREAM_SPEC_KEY"]
    stored = json.loads(await backend.store.get(key))
    assert [s["split_index"] for s in stored] == [0, 1, 2, 3, 4]
    # Each child is watched as its own task.
    waiters = [asyncio.create_task(backend.wait(h)) for h in handles]
    for i in range(5):
        drive(f"{parent}:{i}", "SUCCEEDED" if i != 2 else "FAILED", exit_code=0 if i != 2 else 1)
    codes = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert dict(zip((r.spec.split_index for r in requests), codes, strict=True)) == {0: 0, 1: 0, 2: 1, 3: 0, 4: 0}


async def test_a_restarted_daemon_adopts_array_children_its_checkpoint_missed(
        make_backend: Callable[..., BatchBackend], tmp_path: Path) -> None:
    first = make_backend()
    key = "BatchFlow/7/train/start/0"
    handles = await asyncio.gather(*(first.launch(request(tmp_path, spec(str(i), split=i), array_key=key,
                                                          array_size=5)) for i in range(5)))
    await first.close()
    # The checkpoint held splits 0 and 1 only: the new daemon launches 2..4 as a group of 3.
    second = make_backend()
    again = await asyncio.gather(*(second.launch(request(tmp_path, spec(str(i), split=i), array_key=key,
                                                         array_size=3)) for i in (2, 3, 4)))
    assert [h["job_id"] for h in again] == [h["job_id"] for h in handles[2:]]
    assert "submit_job" not in second.calls
    assert second.calls["list_jobs"] == 3  # one per adopted attempt; the job spec listing is one LIST
    assert len([j for j in _job_ids() if ":" not in j]) == 1
