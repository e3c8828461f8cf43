"""The deployment against moto: state machine, job definitions, EventBridge rule, runs, delete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import AioSession

from millstream.client.loader import load_flow
from millstream.config.settings import Settings, load_settings
from millstream.deploy.aws import TARGET_ID, deploy_export, open_deployer
from millstream.deploy.export import build_export
from millstream.errors import DeployError
from tests.aws.moto_server import REGION, MotoServer

BUCKET = "ms-deploy"
ROLE = "arn:aws:iam::123456789012:role/sfn-role"
EVENTS_ROLE = "arn:aws:iam::123456789012:role/events-role"

FLOW = '''
from millstream import FlowSpec, Parameter, retry, schedule, step


@schedule({schedule})
class DeployFlow(FlowSpec):
    """A flow deployed to Step Functions."""

    size = Parameter("size", default=3)

    @step
    def start(self):
        self.items = list(range(self.size))
        self.next(self.body, foreach="items")

    @retry(times=2)
    @step
    def body(self):
        self.square = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.square for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        print(self.total)


if __name__ == "__main__":
    DeployFlow()
'''


def write_flow(folder: Path, schedule: str | None, stem: str) -> Path:
    """The flow file, with ``@schedule(<schedule>)`` or without a schedule."""
    text = FLOW.format(schedule=schedule or "")
    if schedule is None:
        text = text.replace("@schedule()\n", "")
    path = folder / f"{stem}.py"  # one module name per test: the loader keeps modules
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def deploy_env(moto: MotoServer, home: Path) -> dict[str, str]:
    """Settings environment: S3 datastore and Step Functions both on moto."""
    return {
        "HOME": str(home), "MILLSTREAM_CONFIG": str(home / "none.toml"),
        "MILLSTREAM_DATASTORE_TYPE": "s3", "MILLSTREAM_DATASTORE_BUCKET": BUCKET,
        "MILLSTREAM_DATASTORE_PREFIX": "ms", "MILLSTREAM_DATASTORE_ENDPOINT_URL": moto.url,
        "MILLSTREAM_DATASTORE_REGION": REGION,
        "MILLSTREAM_STEPFUNCTIONS_ENDPOINT_URL": moto.url, "MILLSTREAM_STEPFUNCTIONS_REGION": REGION,
        "MILLSTREAM_STEPFUNCTIONS_ROLE_ARN": ROLE, "MILLSTREAM_STEPFUNCTIONS_EVENTS_ROLE_ARN": EVENTS_ROLE,
        "MILLSTREAM_STEPFUNCTIONS_JOB_QUEUE": "queue-1", "MILLSTREAM_STEPFUNCTIONS_IMAGE": "millstream:1",
    }


@pytest.fixture
def settings(moto_reset: MotoServer, tmp_path: Path) -> Settings:
    moto_reset.create_bucket(BUCKET)
    return load_settings(deploy_env(moto_reset, tmp_path))


@pytest.fixture
async def aws(moto_reset: MotoServer) -> AsyncIterator[dict[str, Any]]:
    """Raw clients straight to moto, for the assertions."""
    session = AioSession()
    clients: dict[str, Any] = {}
    names = ("stepfunctions", "events", "batch", "s3")
    managers = [session.create_client(n, region_name=REGION, endpoint_url=moto_reset.url) for n in names]
    for name, manager in zip(names, managers, strict=True):
        clients[name] = await manager.__aenter__()
    yield clients
    for manager in managers:
        await manager.__aexit__(None, None, None)


async def test_create_update_schedule_trigger_list_delete(settings: Settings, aws: dict[str, Any],
                                                          tmp_path: Path) -> None:
    path = write_flow(tmp_path, "cron='0 9 * * 1-5', timezone='Asia/Tokyo'", "deploy_scheduled")
    export = build_export(load_flow(str(path), None), settings)
    assert export.schedule == "cron(0 0 ? * MON,TUE,WED,THU,FRI *)"

    report = await deploy_export(export, settings)
    assert report["action"] == "created" and report["package_uploaded"] is True
    assert sorted(report["job_definitions_registered"]) == sorted(export.compiled.job_definitions)
    arn = report["state_machine_arn"]
    machine = await aws["stepfunctions"].describe_state_machine(stateMachineArn=arn)
    assert json.loads(machine["definition"]) == export.compiled.definition
    assert machine["roleArn"] == ROLE and machine["name"] == "DeployFlow"
    # The job definitions exist under their hash names, with the bootstrap command.
    for name in export.compiled.job_definitions:
        found = (await aws["batch"].describe_job_definitions(jobDefinitionName=name))["jobDefinitions"]
        assert len(found) == 1
        assert found[0]["containerProperties"]["command"][:3] == ["python3", "-m", "millstream.deploy.bootstrap"]
        env = {e["name"]: e["value"] for e in found[0]["containerProperties"]["environment"]}
        assert env["MILLSTREAM_DATASTORE_BUCKET"] == BUCKET and env["MILLSTREAM_DATASTORE_PREFIX"] == "ms"
    # The code package is where the bootstrap fetches it.
    head = await aws["s3"].head_object(Bucket=BUCKET, Key=f"ms/packages/{export.package_sha}.tar.gz")
    assert head["ContentLength"] == len(export.package)
    # EventBridge: the rule and its one target, the state machine.
    rule = await aws["events"].describe_rule(Name="DeployFlow")
    assert rule["ScheduleExpression"] == "cron(0 0 ? * MON,TUE,WED,THU,FRI *)" and rule["State"] == "ENABLED"
    targets = (await aws["events"].list_targets_by_rule(Rule="DeployFlow"))["Targets"]
    assert [(t["Id"], t["Arn"], t["RoleArn"]) for t in targets] == [(TARGET_ID, arn, EVENTS_ROLE)]
    assert json.loads(targets[0]["Input"]) == {"Parameters": {}}

    # Deploying again updates in place and registers nothing new.
    again = await deploy_export(build_export(load_flow(str(path), None), settings), settings)
    assert again["action"] == "updated" and again["state_machine_arn"] == arn
    assert again["job_definitions_registered"] == [] and again["package_uploaded"] is False

    async with open_deployer(settings.stepfunctions) as deployer:
        started = await deployer.trigger("DeployFlow", {"size": "5"})
        runs = await deployer.list_runs("DeployFlow")
    assert started["run_id"].startswith("sfn-")
    assert [r["run_id"] for r in runs] == [started["run_id"]]
    execution = await aws["stepfunctions"].describe_execution(executionArn=started["execution_arn"])
    assert json.loads(execution["input"]) == {"Parameters": {"size": "5"}}

    # Without @schedule, a deployment removes the rule.
    (tmp_path / "v2").mkdir()
    path = write_flow(tmp_path / "v2", None, "deploy_unscheduled")
    report = await deploy_export(build_export(load_flow(str(path), None), settings), settings)
    assert report["schedule"] is None
    rules = (await aws["events"].list_rules())["Rules"]
    assert rules == []

    async with open_deployer(settings.stepfunctions) as deployer:
        deleted = await deployer.delete("DeployFlow")
        assert deleted == {"state_machine_arn": arn, "rule_deleted": False}
        with pytest.raises(DeployError, match="no state machine 'DeployFlow'"):
            await deployer.trigger("DeployFlow", {})
    machines = (await aws["stepfunctions"].list_state_machines())["stateMachines"]
    assert machines == []


async def test_deploy_errors_name_the_setting(moto_reset: MotoServer, tmp_path: Path) -> None:
    path = write_flow(tmp_path, None, "deploy_errors")
    flow_cls = load_flow(str(path), None)
    local = load_settings({"HOME": str(tmp_path), "MILLSTREAM_CONFIG": str(tmp_path / "none.toml")})
    with pytest.raises(DeployError, match="need an S3 datastore"):
        build_export(flow_cls, local)
    moto_reset.create_bucket(BUCKET)
    no_queue = load_settings({**deploy_env(moto_reset, tmp_path), "MILLSTREAM_STEPFUNCTIONS_JOB_QUEUE": ""})
    with pytest.raises(DeployError, match=r"set stepfunctions\.job_queue"):
        build_export(flow_cls, no_queue)
    no_role = load_settings({**deploy_env(moto_reset, tmp_path), "MILLSTREAM_STEPFUNCTIONS_ROLE_ARN": ""})
    with pytest.raises(DeployError, match=r"set stepfunctions\.role_arn"):
        await deploy_export(build_export(flow_cls, no_role), no_role)


def test_cli_create_trigger_list_delete(moto_reset: MotoServer, tmp_path: Path) -> None:
    moto_reset.create_bucket(BUCKET)
    path = write_flow(tmp_path, "daily=True", "deploy_cli")
    env = {**os.environ, **deploy_env(moto_reset, tmp_path)}

    def flow_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(path), "step-functions", *args], env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    shown = flow_cli("create", "--only-json")
    assert shown.returncode == 0, shown.stderr
    definition = json.loads(shown.stdout)
    assert definition["States"]["start"]["Parameters"]["Parameters"]["flow_class"] == "DeployFlow"

    created = subprocess.run([sys.executable, "-m", "millstream", "step-functions", "create", str(path)],
                             env=env, capture_output=True, text=True, timeout=120, check=False)
    assert created.returncode == 0, created.stderr
    assert "State machine DeployFlow created" in created.stdout
    assert "Schedule: cron(0 0 * * ? *)" in created.stdout

    run_id_file = tmp_path / "run-id"
    triggered = flow_cli("trigger", "--size", "7", "--run-id-file", str(run_id_file))
    assert triggered.returncode == 0, triggered.stderr
    run_id = run_id_file.read_text()
    assert f"Run DeployFlow/{run_id} started" in triggered.stdout
    listed = flow_cli("list-runs")
    assert listed.returncode == 0 and run_id in listed.stdout and "RUNNING" in listed.stdout
    deleted = flow_cli("delete")
    assert deleted.returncode == 0 and "and its schedule deleted" in deleted.stdout
    missing = flow_cli("list-runs")
    assert missing.returncode == 1 and "no state machine 'DeployFlow'" in missing.stderr
