"""Compiled state machines executed by moto's interpreter; their Batch jobs run the real bootstrap."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import AioSession

from millstream.client.loader import load_flow
from millstream.config.settings import Settings, load_settings
from millstream.datastore.artifacts import ArtifactStore
from millstream.datastore.records import AttemptKey, read_done
from millstream.datastore.s3 import S3Store
from millstream.deploy.aws import deploy_export, open_deployer
from millstream.deploy.export import build_export
from tests.aws.moto_server import REGION, MotoServer
from tests.deploy.conftest import EXAMPLES
from tests.deploy.moto_sfn import JobLog
from tests.deploy.test_aws import BUCKET, deploy_env

ACCOUNT = "123456789012"
EXECUTION_TIMEOUT_S = 240


@pytest.fixture
def executing_moto(moto_reset: MotoServer) -> Iterator[MotoServer]:
    """moto with the Step Functions interpreter on and Batch without Docker."""
    moto_reset.configure({"batch": {"use_docker": False}, "stepfunctions": {"execute_state_machine": True}})
    yield moto_reset
    moto_reset.configure({"stepfunctions": {"execute_state_machine": False}})


@pytest.fixture
async def batch_queue(executing_moto: MotoServer) -> AsyncIterator[str]:
    """A compute environment and the job queue ``queue-1`` in moto Batch."""
    session = AioSession()
    kwargs = {"region_name": REGION, "endpoint_url": executing_moto.url}
    async with session.create_client("iam", **kwargs) as iam, session.create_client("batch", **kwargs) as batch:
        role = (await iam.create_role(RoleName="batch-service", AssumeRolePolicyDocument="{}"))["Role"]["Arn"]
        env = await batch.create_compute_environment(computeEnvironmentName="millstream-ce", type="UNMANAGED",
                                                     state="ENABLED", serviceRole=role)
        await batch.create_job_queue(jobQueueName="queue-1", state="ENABLED", priority=1,
                                     computeEnvironmentOrder=[{"order": 1,
                                                               "computeEnvironment": env["computeEnvironmentArn"]}])
    yield "queue-1"


def execution_settings(moto: MotoServer, home: Path) -> Settings:
    moto.create_bucket(BUCKET)
    env = deploy_env(moto, home)
    env.update({"MILLSTREAM_STEPFUNCTIONS_PYTHON": sys.executable, "MILLSTREAM_STEPFUNCTIONS_FOREACH_MODE": "inline"})
    return load_settings(env)


async def run_to_end(settings: Settings, flow_file: str | Path, params: dict[str, Any], log: JobLog
                     ) -> tuple[str, str, dict[str, Any]]:
    """Deploy, trigger and wait; (flow name, run id, describe_execution)."""
    flow_cls = load_flow(str(EXAMPLES / flow_file), None)  # an absolute path stays itself
    export = build_export(flow_cls, settings)
    await deploy_export(export, settings)
    async with open_deployer(settings.stepfunctions) as deployer:
        started = await deployer.trigger(export.name, params)
        deadline = time.monotonic() + EXECUTION_TIMEOUT_S
        while True:
            execution = await deployer.sfn.describe_execution(executionArn=started["execution_arn"])
            if execution["status"] != "RUNNING" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if execution["status"] != "SUCCEEDED":
            history = await deployer.sfn.get_execution_history(executionArn=started["execution_arn"])
            failures = [e for e in history["events"] if "Failed" in e["type"] or "TimedOut" in e["type"]]
            kinds = [e["type"] for e in history["events"]]
            pytest.fail(f"execution {execution['status']}: {kinds}\n{json.dumps(failures, default=str)[-3000:]}\n"
                        f"{log.report()}")
    return export.name, started["run_id"], execution


async def done_record(settings: Settings, flow: str, run_id: str, step: str, task: str, attempt: int = 0
                      ) -> dict[str, Any] | None:
    """The done marker of one attempt, read from the S3 datastore."""
    store = S3Store.from_config(dataclasses.asdict(settings.datastore))
    try:
        return await read_done(store, AttemptKey(flow, run_id, step, task, attempt))
    finally:
        await store.close()


async def stored_log(settings: Settings, flow: str, run_id: str, step: str, task: str, stream: str) -> bytes:
    """An attempt 0 log as stored in the S3 datastore."""
    store = S3Store.from_config(dataclasses.asdict(settings.datastore))
    key = AttemptKey(flow, run_id, step, task, 0)
    try:
        return await store.get(key.stdout_key if stream == "stdout" else key.stderr_key)
    finally:
        await store.close()


async def artifact(settings: Settings, flow: str, run_id: str, step: str, task: str, name: str,
                   attempt: int = 0) -> Any:
    """An artifact of a task's successful attempt, read from the S3 datastore."""
    done = await done_record(settings, flow, run_id, step, task, attempt)
    assert done is not None and done["status"] == "ok", done
    store = S3Store.from_config(dataclasses.asdict(settings.datastore))
    try:
        return await ArtifactStore(store, flow).load(done["artifacts"][name]["sha"])
    finally:
        await store.close()


@pytest.mark.timeout(EXECUTION_TIMEOUT_S + 60)
async def test_linear_flow_runs_in_moto(executing_moto: MotoServer, batch_queue: str, local_batch: JobLog,
                                        tmp_path: Path) -> None:
    settings = execution_settings(executing_moto, tmp_path)
    flow, run_id, _ = await run_to_end(settings, "hello.py", {}, local_batch)
    assert [j["parameters"]["step"] for j in local_batch.jobs] == ["start", "greet", "end"]
    assert all(j["parameters"]["run_id"] == run_id and j["parameters"]["task_id"] == "0" for j in local_batch.jobs)
    assert await artifact(settings, flow, run_id, "end", "0", "message") == "hello, world"
    # Each attempt's output is in the datastore too, where the Client API reads logs.
    assert await stored_log(settings, flow, run_id, "end", "0", "stdout") == b"done: hello, world\n"
    assert local_batch.jobs[-1]["stdout"] == "done: hello, world\n"  # and in the container's output


@pytest.mark.timeout(EXECUTION_TIMEOUT_S + 60)
async def test_foreach_flow_runs_in_moto(executing_moto: MotoServer, batch_queue: str, local_batch: JobLog,
                                         tmp_path: Path) -> None:
    settings = execution_settings(executing_moto, tmp_path)
    flow, run_id, _ = await run_to_end(settings, "foreach.py", {"count": "4"}, local_batch)
    by_step: dict[str, list[str]] = {}
    for job in local_batch.jobs:
        by_step.setdefault(job["parameters"]["step"], []).append(job["parameters"]["task_id"])
    assert sorted(by_step["square"]) == ["0", "1", "2", "3"]
    assert by_step["join"] == ["0"] and by_step["end"] == ["0"]
    assert await artifact(settings, flow, run_id, "join", "0", "total") == 0 + 1 + 4 + 9


@pytest.mark.timeout(EXECUTION_TIMEOUT_S + 60)
async def test_switch_flow_takes_the_recorded_branch_in_moto(executing_moto: MotoServer, batch_queue: str,
                                                             local_batch: JobLog, tmp_path: Path) -> None:
    settings = execution_settings(executing_moto, tmp_path)
    flow, run_id, _ = await run_to_end(settings, "switch.py", {"size": "500"}, local_batch)
    assert [j["parameters"]["step"] for j in local_batch.jobs] == ["start", "large", "end"]
    assert await artifact(settings, flow, run_id, "end", "0", "result") == "in chunks (500)"


@pytest.mark.timeout(EXECUTION_TIMEOUT_S + 60)
async def test_branch_flow_runs_its_parallel_branches_in_moto(executing_moto: MotoServer, batch_queue: str,
                                                              local_batch: JobLog, tmp_path: Path) -> None:
    settings = execution_settings(executing_moto, tmp_path)
    flow, run_id, _ = await run_to_end(settings, "branch.py", {}, local_batch)
    steps = [j["parameters"]["step"] for j in local_batch.jobs]
    assert steps[0] == "start" and sorted(steps[1:3]) == ["linear_model", "tree_model"]
    assert steps[3:] == ["pick", "end"]
    assert await artifact(settings, flow, run_id, "pick", "0", "scores") == {"linear": 4.5, "tree": 5.5}


FAILING_FLOW = """
from millstream import FlowSpec, step


class FailingOnSfnFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.broken)

    @step
    def broken(self):
        raise RuntimeError("this step always fails")
        self.next(self.end)

    @step
    def end(self):
        pass
"""


@pytest.mark.timeout(EXECUTION_TIMEOUT_S + 60)
async def test_a_failing_step_fails_the_execution(executing_moto: MotoServer, batch_queue: str,
                                                  local_batch: JobLog, tmp_path: Path) -> None:
    folder = tmp_path / "failing_flow"
    folder.mkdir()
    (folder / "failing_on_sfn.py").write_text(FAILING_FLOW, encoding="utf-8")
    settings = execution_settings(executing_moto, tmp_path)
    with pytest.raises(pytest.fail.Exception, match="execution FAILED"):
        await run_to_end(settings, folder / "failing_on_sfn.py", {}, local_batch)
    assert [(j["parameters"]["step"], j["rc"]) for j in local_batch.jobs] == [("start", 0), ("broken", 1)]
    run_id = local_batch.jobs[0]["parameters"]["run_id"]
    failed = await done_record(settings, "FailingOnSfnFlow", run_id, "broken", "0", 0)
    assert b"RuntimeError: this step always fails" in await stored_log(settings, "FailingOnSfnFlow", run_id,
                                                                       "broken", "0", "stderr")
    assert failed is not None and failed["status"] == "failed"
    assert failed["exception"]["message"] == "this step always fails"
