"""Batch job definitions for exported steps: container properties, named by their hash.

Every step whose container properties are equal shares one job definition, named
``millstream-<first 20 hex digits of the sha256 of the canonical JSON>``. The name is a
pure function of what it names, so deploying the same flow twice, or two flows with
the same images and resources, registers nothing new: the deployer looks the name up
(DescribeJobDefinitions) and registers it only when absent. The state machine refers
to a job definition by name, which Batch resolves to its latest active revision; as a
name never changes meaning, that revision is always the one registered first.

What varies per task (flow, step, run, task, attempt, code package) is not part of
the definition: it reaches the container through SubmitJob ``Parameters``, which Batch
substitutes for the ``Ref::`` placeholders of the command (see
:mod:`millstream.deploy.bootstrap` for the command's contract).

Resources follow Metaflow: the larger of ``@batch`` and ``@resources`` for cpu, memory
and gpu; ``@batch(image=...)`` wins over the configured image; ``@environment`` vars
join the datastore settings in the container's environment.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from millstream.errors import DeployError

JOB_DEFINITION_PREFIX = "millstream-"

#: SubmitJob parameters every task passes; each replaces ``Ref::<name>`` in the command.
TASK_PARAMETERS = ("package", "module", "flow_class", "step", "run_id", "task_id", "attempt")


@dataclass(frozen=True)
class ContainerDefaults:
    """What a step's container gets unless its decorators say otherwise."""

    image: str = ""
    python: str = "python3"
    job_role_arn: str = ""
    execution_role_arn: str = ""
    environment: Mapping[str, str] = field(default_factory=dict)  # the datastore settings, as MILLSTREAM_*


def bootstrap_command(python: str) -> list[str]:
    """The container command: the bootstrap, its arguments filled in by Batch per task."""
    command = [python, "-m", "millstream.deploy.bootstrap"]
    for name in TASK_PARAMETERS:
        command += [f"--{name.replace('_', '-')}", f"Ref::{name}"]
    return command


def _decorators(node: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d["attributes"] for d in node.get("decorators", [])}


def _largest(key: str, *sources: Mapping[str, Any]) -> float:
    return max((float(s[key]) for s in sources if s.get(key) is not None), default=0.0)


def container_properties(node: Mapping[str, Any], defaults: ContainerDefaults) -> dict[str, Any]:
    """The ``containerProperties`` of the job definition that runs ``node``."""
    decos = _decorators(node)
    batch, res = decos.get("batch", {}), decos.get("resources", {})
    image = batch.get("image") or defaults.image
    if not image:
        raise DeployError(
            f"step {node['name']!r} has no container image: set stepfunctions.image in the configuration "
            "or @batch(image=...) on the step")
    cpu = _largest("cpu", batch, res) or 1.0
    memory = math.ceil(_largest("memory", batch, res) or 4096)
    gpu = int(_largest("gpu", batch, res))
    requirements = [{"type": "VCPU", "value": f"{cpu:g}"}, {"type": "MEMORY", "value": str(memory)}]
    if gpu:
        requirements.append({"type": "GPU", "value": str(gpu)})
    env = dict(defaults.environment)
    env.update(decos.get("environment", {}).get("vars", {}))
    props: dict[str, Any] = {
        "image": image,
        "command": bootstrap_command(defaults.python),
        "resourceRequirements": requirements,
        "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
    }
    job_role = batch.get("iam_role") or defaults.job_role_arn
    execution_role = batch.get("execution_role") or defaults.execution_role_arn
    if job_role:
        props["jobRoleArn"] = job_role
    if execution_role:
        props["executionRoleArn"] = execution_role
    shared_memory = _largest("shared_memory", batch, res)
    if shared_memory:
        props["linuxParameters"] = {"sharedMemorySize": int(shared_memory)}
    if batch.get("privileged"):
        props["privileged"] = True
    return props


def job_definition_name(props: Mapping[str, Any]) -> str:
    """The job definition's name: a hash of its container properties (see the module docstring)."""
    canonical = json.dumps(props, sort_keys=True, separators=(",", ":"))
    return JOB_DEFINITION_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:20]
