"""Run a compiled state machine in moto's Step Functions interpreter, its Batch jobs as local processes.

Two in-process patches of moto 5.2.5 (the server runs in this process):

- moto's interpreter leaves ``StateTaskService._normalise_parameters`` and
  ``_normalise_response`` empty, so a ``batch:submitJob.sync`` Task fails with
  ``States.Runtime 'JobName'``; they are filled in from the botocore service model, as the
  upstream interpreter does (AWS-EMULATION.md);
- moto's Batch in simple mode marks a job SUCCEEDED inside SubmitJob without running it;
  here SubmitJob runs the job's command instead (``Ref::`` placeholders replaced by the
  job's parameters, the job definition's environment plus the overrides) as a local
  subprocess on a thread of its own (SubmitJob returns at once, as on AWS), and the job
  ends SUCCEEDED or FAILED by its exit code. That is the
  container contract of :mod:`millstream.deploy.bootstrap`, with a process for a container.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
import pytest

JOB_TIMEOUT_S = 120


@dataclass
class JobLog:
    """What each emulated container did, for assertions and failure messages."""

    jobs: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(f"{j['name']} rc={j['rc']}\n{j['stderr'][-2000:]}" for j in self.jobs)


def _operation(task: Any, service: str | None, action: str | None) -> Any:
    models = _operation.__dict__.setdefault("models", {})
    name = task._get_boto_service_name(service)
    if name not in models:
        models[name] = botocore.session.get_session().get_service_model(name)
    action = action or task.resource.api_action
    return models[name].operation_model("".join(p[:1].upper() + p[1:] for p in action.split("_")))


@pytest.fixture
def local_batch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[JobLog]:
    """Patch moto so state machines execute and Batch jobs run as local processes."""
    from moto.batch_simple.models import BatchSimpleBackend
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service import (
        StateTaskService,
    )

    def normalise_parameters(self: Any, parameters: Any, boto_service_name: Any = None,
                             service_action_name: Any = None) -> None:
        self._to_boto_request(parameters, _operation(self, boto_service_name, service_action_name).input_shape)

    def normalise_response(self: Any, response: Any, boto_service_name: Any = None,
                           service_action_name: Any = None) -> None:
        self._from_boto_response(response, _operation(self, boto_service_name, service_action_name).output_shape)

    log = JobLog()
    threads: list[threading.Thread] = []
    work = tmp_path / "containers"
    work.mkdir()

    def run_job(self: Any, include_start_attempt: bool, job: Any) -> None:
        self.backend._jobs[job.job_id] = job
        job.job_started_at = datetime.datetime.now()
        job.log_stream_name = job._stream_name
        if include_start_attempt:
            job._start_attempt()
        props = job.job_definition.container_properties
        command = [job.parameters.get(arg[5:], arg) if arg.startswith("Ref::") else arg for arg in props["command"]]
        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PATH", "HOME", "LANG"))}
        env.update({e["name"]: e["value"] for e in props.get("environment", [])})
        overrides = job.container_overrides.get("environment") or job.container_overrides.get("Environment") or []
        env.update({e.get("name", e.get("Name")): e.get("value", e.get("Value")) for e in overrides})
        env["MILLSTREAM_PACKAGE_DIR"] = str(work)
        job.status = "RUNNING"

        def container() -> None:
            done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True,
                                  timeout=JOB_TIMEOUT_S, check=False)
            log.jobs.append({"name": job.job_name, "rc": done.returncode, "stderr": done.stderr,
                             "stdout": done.stdout, "parameters": dict(job.parameters)})
            job.exit_code = done.returncode
            job._mark_stopped(success=done.returncode == 0)

        thread = threading.Thread(target=container, name=f"batch-job-{job.job_id}", daemon=True)
        threads.append(thread)
        thread.start()

    monkeypatch.setattr(StateTaskService, "_normalise_parameters", normalise_parameters)
    monkeypatch.setattr(StateTaskService, "_normalise_response", normalise_response)
    monkeypatch.setattr(BatchSimpleBackend, "_mark_job_as_finished", run_job)
    yield log
    for thread in threads:
        thread.join(JOB_TIMEOUT_S)
