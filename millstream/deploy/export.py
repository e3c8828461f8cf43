"""From a flow class and the settings to everything a deployment sends to AWS.

Pure apart from reading the flow's directory for its code package: the definition,
the job definitions, the EventBridge schedule and the package's bytes. ``--only-json``
stops here; :mod:`millstream.deploy.aws` sends the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from millstream.config.settings import DatastoreSettings, Settings
from millstream.deploy.awscron import to_aws_cron
from millstream.deploy.batchjob import ContainerDefaults
from millstream.deploy.stepfunctions import Compiled, ExportOptions, compile_flow, state_machine_name
from millstream.errors import DeployError
from millstream.flow.decorators import ScheduleDecorator

# Datastore settings that mean nothing inside a container (a local root, fsync policy).
_HOST_ONLY = frozenset({"root", "durable"})
_RULE_NAME = re.compile(r"^[.\-_A-Za-z0-9]{1,64}$")


@dataclass
class Export:
    """One flow, ready to deploy."""

    name: str  # the state machine's and the EventBridge rule's
    compiled: Compiled
    schedule: str | None  # ``cron(...)`` for EventBridge, or None without @schedule
    package_sha: str
    package: bytes


def datastore_environment(ds: DatastoreSettings) -> dict[str, str]:
    """The ``MILLSTREAM_DATASTORE_*`` variables that make a container open this datastore."""
    if ds.type != "s3" or not ds.bucket:
        raise DeployError("Step Functions tasks run in containers and need an S3 datastore: "
                          "set datastore.type = 's3' and datastore.bucket")
    default = DatastoreSettings()
    env = {}
    for f in fields(ds):
        value = getattr(ds, f.name)
        if f.name not in _HOST_ONLY and value != getattr(default, f.name):
            env[f"MILLSTREAM_DATASTORE_{f.name.upper()}"] = str(value)
    return env


def schedule_expression(graph: dict[str, Any]) -> str | None:
    """The flow's ``@schedule`` as an EventBridge ``cron(...)``, or None."""
    deco = graph.get("flow_decorators", {}).get("schedule")
    if deco is None:
        return None
    schedule = ScheduleDecorator(**deco["attributes"])
    return to_aws_cron(schedule.cron, schedule.attributes["timezone"])


def build_export(flow_cls: type, settings: Settings) -> Export:
    """Compile ``flow_cls`` for the deployment the settings describe."""
    from millstream.client.loader import flow_file
    from millstream.datastore.package import build_package
    from millstream.flow.graph import FlowGraph

    graph = FlowGraph(flow_cls)
    graph.validate()
    graph_dict = graph.to_dict()
    sf, ds = settings.stepfunctions, settings.datastore
    name = state_machine_name(graph.name, sf.name_prefix)
    if not _RULE_NAME.match(name):
        raise DeployError(f"{name!r} cannot name an EventBridge rule (at most 64 of letters, digits, '.', '-', '_')")
    path = flow_file(flow_cls)
    sha, package = build_package(path.parent)
    options = ExportOptions(
        bucket=ds.bucket if ds.type == "s3" else "",
        prefix=ds.prefix,
        job_queue=sf.job_queue,
        package=sha,
        module_file=path.name,
        class_name=flow_cls.__name__,
        foreach_mode=sf.foreach_mode,
        max_concurrency=sf.max_concurrency,
        container=ContainerDefaults(image=sf.image, python=sf.python, job_role_arn=sf.job_role_arn,
                                    execution_role_arn=sf.batch_execution_role_arn,
                                    environment=datastore_environment(ds)),
    )
    if not options.job_queue:
        raise DeployError("set stepfunctions.job_queue: the Batch job queue the steps run on")
    compiled = compile_flow(graph_dict, options)
    return Export(name=name, compiled=compiled, schedule=schedule_expression(graph_dict),
                  package_sha=sha, package=package)
