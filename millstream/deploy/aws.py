"""The AWS side of the export: Step Functions, EventBridge and Batch through aiobotocore.

The only module of the package that imports botocore; the daemon never imports it.
Every ``ClientError`` becomes a :class:`~millstream.errors.DeployError` naming the
call and AWS's error code, in :func:`_aws` alone.

``deploy`` is idempotent: job definitions are looked up by their (hash) name and
registered only when missing; the state machine is created, or updated in place when
one of that name exists (executions already running finish on the old definition);
the EventBridge rule is put (an upsert) with the state machine as its one target, or
removed when the flow no longer has ``@schedule``. ``delete`` removes the rule and
the state machine and leaves job definitions, which other flows may share.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from millstream.config.settings import Settings, StepFunctionsSettings
from millstream.deploy.export import Export
from millstream.errors import DeployError

T = TypeVar("T")
TARGET_ID = "millstream-state-machine"
EXECUTION_STATUSES = ("RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED", "PENDING_REDRIVE")


async def _aws(what: str, call: Awaitable[T]) -> T:
    """Await an AWS call; its ClientError as a DeployError naming ``what`` and the code."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return await call
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise DeployError(f"{what}: {error.get('Code', 'error')}: {error.get('Message', exc)}") from None
    except BotoCoreError as exc:
        raise DeployError(f"{what}: {exc}") from None


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class Deployer:
    """Step Functions, EventBridge and Batch clients for one configuration."""

    def __init__(self, settings: StepFunctionsSettings, clients: dict[str, Any]) -> None:
        self.settings = settings
        self.sfn = clients["stepfunctions"]
        self.events = clients["events"]
        self.batch = clients["batch"]

    # ----------------------------------------------------------------- lookups
    async def state_machine_arn(self, name: str) -> str | None:
        """The ARN of the state machine called ``name``, or None."""
        paginator = self.sfn.get_paginator("list_state_machines")
        async for page in paginator.paginate():
            for machine in page["stateMachines"]:
                if machine["name"] == name:
                    return str(machine["stateMachineArn"])
        return None

    async def _require(self, name: str) -> str:
        arn = await _aws("ListStateMachines", self.state_machine_arn(name))
        if arn is None:
            raise DeployError(f"no state machine {name!r}: deploy it first with step-functions create")
        return arn

    # ----------------------------------------------------------------- deploy
    async def ensure_job_definitions(self, definitions: dict[str, dict[str, Any]]) -> list[str]:
        """Register each job definition not yet active; the names registered now."""
        registered = []
        for name, props in sorted(definitions.items()):
            found = await _aws("DescribeJobDefinitions", self.batch.describe_job_definitions(
                jobDefinitionName=name, status="ACTIVE"))
            if found.get("jobDefinitions"):
                continue
            await _aws(f"RegisterJobDefinition {name}", self.batch.register_job_definition(
                jobDefinitionName=name, type="container", containerProperties=props,
                tags={"millstream": "stepfunctions"}))
            registered.append(name)
        return registered

    async def deploy(self, export: Export) -> dict[str, Any]:
        """Create or update everything ``export`` needs; what was done, for the report."""
        role = self.settings.role_arn
        if not role:
            raise DeployError("set stepfunctions.role_arn: the IAM role the state machine runs as")
        registered = await self.ensure_job_definitions(export.compiled.job_definitions)
        definition = json.dumps(export.compiled.definition)
        arn = await _aws("ListStateMachines", self.state_machine_arn(export.name))
        if arn is None:
            answer = await _aws(f"CreateStateMachine {export.name}", self.sfn.create_state_machine(
                name=export.name, definition=definition, roleArn=role, type="STANDARD",
                tags=[{"key": "millstream", "value": "flow"}]))
            arn, action = str(answer["stateMachineArn"]), "created"
        else:
            await _aws(f"UpdateStateMachine {export.name}", self.sfn.update_state_machine(
                stateMachineArn=arn, definition=definition, roleArn=role))
            action = "updated"
        if export.schedule:
            await self.put_schedule(export.name, export.schedule, arn)
        else:
            await self.remove_schedule(export.name)
        return {"state_machine_arn": arn, "action": action, "job_definitions_registered": registered,
                "schedule": export.schedule}

    async def put_schedule(self, name: str, expression: str, state_machine_arn: str) -> None:
        """The EventBridge rule ``name`` starting the state machine on ``expression``."""
        role = self.settings.events_role_arn or self.settings.role_arn
        await _aws(f"PutRule {name}", self.events.put_rule(
            Name=name, ScheduleExpression=expression, State="ENABLED",
            Description=f"millstream: run {name} on Step Functions"))
        answer = await _aws(f"PutTargets {name}", self.events.put_targets(Rule=name, Targets=[{
            "Id": TARGET_ID, "Arn": state_machine_arn, "RoleArn": role,
            "Input": json.dumps({"Parameters": {}})}]))
        if answer.get("FailedEntryCount"):
            raise DeployError(f"PutTargets {name}: {answer.get('FailedEntries')}")

    async def remove_schedule(self, name: str) -> bool:
        """Remove the rule ``name`` and its target; False if there was none."""
        from botocore.exceptions import ClientError

        try:
            await self.events.describe_rule(Name=name)
        except ClientError as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                return False
            raise DeployError(f"DescribeRule {name}: {exc}") from None
        await _aws(f"RemoveTargets {name}", self.events.remove_targets(Rule=name, Ids=[TARGET_ID]))
        await _aws(f"DeleteRule {name}", self.events.delete_rule(Name=name))
        return True

    # ----------------------------------------------------------------- runs
    async def trigger(self, name: str, parameters: dict[str, Any]) -> dict[str, str]:
        """Start an execution with ``parameters`` as its input; its ARN and run id."""
        arn = await self._require(name)
        execution = uuid.uuid4().hex
        answer = await _aws(f"StartExecution {name}", self.sfn.start_execution(
            stateMachineArn=arn, name=execution, input=json.dumps({"Parameters": parameters})))
        return {"execution_arn": str(answer["executionArn"]), "run_id": f"sfn-{execution}"}

    async def list_runs(self, name: str, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Executions of the state machine, newest first, at most ``limit``."""
        if status is not None and status not in EXECUTION_STATUSES:
            raise DeployError(f"unknown execution status {status!r}; known: {', '.join(EXECUTION_STATUSES)}")
        arn = await self._require(name)
        kwargs: dict[str, Any] = {"stateMachineArn": arn}
        if status:
            kwargs["statusFilter"] = status
        runs: list[dict[str, Any]] = []
        paginator = self.sfn.get_paginator("list_executions")
        async for page in paginator.paginate(**kwargs):
            for e in page["executions"]:
                runs.append({"run_id": f"sfn-{e['name']}", "status": e["status"], "started": e.get("startDate"),
                             "stopped": e.get("stopDate"), "execution_arn": e["executionArn"]})
                if len(runs) >= limit:
                    return runs
        return runs

    async def delete(self, name: str) -> dict[str, Any]:
        """Remove the rule and the state machine ``name``."""
        arn = await self._require(name)
        rule = await self.remove_schedule(name)
        await _aws(f"DeleteStateMachine {name}", self.sfn.delete_state_machine(stateMachineArn=arn))
        return {"state_machine_arn": arn, "rule_deleted": rule}


@asynccontextmanager
async def open_deployer(settings: StepFunctionsSettings, session: Any = None) -> AsyncIterator[Deployer]:
    """A Deployer with its three clients, closed on exit."""
    from aiobotocore.session import AioSession

    session = session or AioSession()
    kwargs: dict[str, Any] = {}
    if settings.region:
        kwargs["region_name"] = settings.region
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    async with AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(session.create_client(name, **kwargs))
                   for name in ("stepfunctions", "events", "batch")}
        yield Deployer(settings, clients)


async def deploy_export(export: Export, settings: Settings, session: Any = None) -> dict[str, Any]:
    """Upload the code package to the datastore, then create or update the deployment."""
    import dataclasses

    from millstream.datastore.package import store_package
    from millstream.datastore.s3 import S3Store

    store = S3Store.from_config(dataclasses.asdict(settings.datastore))
    try:
        uploaded = await store_package(store, export.package_sha, export.package)
    finally:
        await store.close()
    async with open_deployer(settings.stepfunctions, session) as deployer:
        report = await deployer.deploy(export)
    return {**report, "package": export.package_sha, "package_uploaded": uploaded}
