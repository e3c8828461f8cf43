"""A sandbox that plays S3, AWS Batch and CloudWatch Logs on one machine.

A moto server (in this process: the emulated compute environment reaches into moto's
models) with Batch in simple mode, plus :class:`ComputeEnvironment`, which replaces what
simple mode does at SubmitJob (mark the job SUCCEEDED on the spot) with a real life
cycle: each submitted job waits in SUBMITTED, goes RUNNABLE -> STARTING -> RUNNING while
its command really runs here (a subprocess with the job's environment; the container
image is ignored and ``python`` is this interpreter), its output goes line by line to
the CloudWatch stream DescribeJobs names, and it ends SUCCEEDED or FAILED by exit code.
TerminateJob kills it. A job using more resident memory than its MEMORY requirement is
killed the way Batch does it (exit 137, ``OutOfMemoryError: Container killed due to
memory usage``). Array jobs run their children, each with ``AWS_BATCH_JOB_ARRAY_INDEX``;
the parent ends when they all have.

``millstream sandbox`` (the ``sandbox`` extra: moto[server], boto3) starts it and prints
the configuration a daemon needs; the tests use the same classes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

ACCOUNT = "123456789012"
REGION = "us-east-1"
QUEUE = "millstream-sandbox"
BUCKET = "millstream-sandbox"
IMAGE = "millstream-task:sandbox"
LOG_GROUP = "/aws/batch/job"
OOM_REASON = "OutOfMemoryError: Container killed due to memory usage"
FAILED_REASON = "Essential container in task exited"

_held: queue.Queue[Any] = queue.Queue()
_patch_lock = threading.Lock()
_patched = False


def _hold(self: Any, include_start_attempt: bool, job: Any) -> None:
    """Replaces moto's instant success: the job stays SUBMITTED until a worker takes it."""
    self.backend._jobs[job.job_id] = job
    job.status = "SUBMITTED"
    job._ms_with_attempt = include_start_attempt
    _held.put(job)


def hold_submitted_jobs() -> None:
    """Make moto's simple Batch leave submitted jobs to :class:`ComputeEnvironment`.

    Also makes DescribeJobs tell ``container.exitCode`` and ``container.reason`` of an
    ended job, as Batch does (moto drops them from the full description), and stops it
    growing the job's environment at each call.
    """
    global _patched  # noqa: PLW0603 - one patch per process
    with _patch_lock:
        if _patched:
            return
        from moto.batch.models import Job
        from moto.batch_simple.models import BatchSimpleBackend

        describe = Job.describe

        def described(self: Any) -> dict[str, Any]:
            # moto appends AWS_BATCH_JOB_ID to the overrides' own environment list at each
            # describe (a list the children of an array share): keep it as submitted.
            env = self.container_overrides.get("environment")
            saved = list(env) if isinstance(env, list) else None
            result: dict[str, Any] = describe(self)
            container = result.get("container")
            if saved is not None and env is not None:
                if isinstance(container, dict) and isinstance(container.get("environment"), list):
                    container["environment"] = list(container["environment"])
                env[:] = saved
            if self.job_stopped and isinstance(container, dict):
                if self.exit_code is not None:
                    container["exitCode"] = self.exit_code
                reason = getattr(self, "_ms_container_reason", None)
                if reason:
                    container["reason"] = reason
            return result

        BatchSimpleBackend._mark_job_as_finished = _hold  # type: ignore[method-assign]
        Job.describe = described  # type: ignore[method-assign]
        _patched = True


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


class ComputeEnvironment:
    """Runs held Batch jobs on this machine with ``slots`` workers; see the module docstring."""

    def __init__(self, *, slots: int = 4, env: Mapping[str, str] | None = None, python: str = sys.executable,
                 enforce_memory: bool = True) -> None:
        self.slots = slots
        self.base_env = dict(os.environ if env is None else env)
        self.python = python
        self.enforce_memory = enforce_memory
        self.started: list[str] = []  # job ids, in the order they started running
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self.paused = threading.Event()  # set: jobs stay queued (RUNNABLE) until cleared

    def start(self) -> ComputeEnvironment:
        """Start the workers (and the patch that hands them jobs)."""
        hold_submitted_jobs()
        for i in range(self.slots):
            t = threading.Thread(target=self._work, name=f"sandbox-batch-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Kill what runs and stop the workers."""
        self._stop.set()
        with self._lock:
            for proc in self._procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()

    def drain_queue(self) -> None:
        """Forget jobs that are held but not started (between tests, after a moto reset)."""
        with contextlib.suppress(queue.Empty):
            while True:
                _held.get_nowait()

    # ----------------------------------------------------------------- the workers
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = _held.get(timeout=0.05)
            except queue.Empty:
                continue
            if self.paused.is_set():
                job.status = "RUNNABLE"
                _held.put(job)
                time.sleep(0.05)
                continue
            try:
                if "size" in job.array_properties:
                    self._supervise_array(job)
                else:
                    self._run(job)
            except Exception as exc:  # a broken job must not take a worker down
                job.job_stopped_reason = f"sandbox: {type(exc).__name__}: {exc}"
                job._mark_stopped(success=False)

    def _supervise_array(self, parent: Any) -> None:
        if parent.job_stopped:
            return
        children = parent._child_jobs
        if children is None:
            _held.put(parent)  # moto sets the children just after holding the parent
            time.sleep(0.01)
            return
        parent.status = "PENDING"
        if all(c.job_stopped for c in children):
            parent.job_started_at = parent.job_started_at or datetime.datetime.now()
            ok = all(c.status == "SUCCEEDED" for c in children)
            if not ok:
                parent.job_stopped_reason = "one or more child jobs failed"
            parent._mark_stopped(success=ok)
            return
        if parent.stop:
            for c in children:
                c.terminate(parent.job_stopped_reason or "parent terminated")
        _held.put(parent)
        time.sleep(0.02)

    def _environment(self, job: Any) -> dict[str, str]:
        env = dict(self.base_env)
        details = job._container_details()
        for item in details.get("environment", []):
            env[item["name"]] = item["value"]
        env["AWS_BATCH_JOB_ID"] = job.job_id
        env["AWS_BATCH_CE_NAME"] = "millstream-sandbox"
        env["AWS_BATCH_JQ_NAME"] = job.job_queue.name
        if "index" in job.array_properties:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(job.array_properties["index"])
        return env

    def _memory_mb(self, job: Any) -> int:
        for req in job.container_overrides.get("resourceRequirements", []):
            if req.get("type") == "MEMORY":
                return int(req["value"])
        return int(job.job_definition._get_resource_requirement("memory", 0) or 0)

    def _log(self, job: Any, lines: list[str]) -> None:
        if not lines:
            return
        now = int(time.time() * 1000)
        job._log_backend.put_log_events(
            LOG_GROUP, job.log_stream_name, [{"timestamp": now, "message": m} for m in lines])

    def _run(self, job: Any) -> None:
        if job.stop:
            job._mark_stopped(success=False)
            return
        for status in ("RUNNABLE", "STARTING"):
            job.status = status
        command = list(job._container_details().get("command") or [])
        if not command:
            job.job_stopped_reason = "CannotStartContainerError: the job has no command"
            job._mark_stopped(success=False)
            return
        if command[0] in ("python", "python3"):
            command[0] = self.python
        job.job_started_at = datetime.datetime.now()
        job.log_stream_name = job._stream_name
        job._log_backend.ensure_log_group(LOG_GROUP)
        job._log_backend.ensure_log_stream(LOG_GROUP, job.log_stream_name)
        if getattr(job, "_ms_with_attempt", True):
            job._start_attempt()
        proc = subprocess.Popen(command, env=self._environment(job), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        with self._lock:
            self._procs[job.job_id] = proc
        job.status = "RUNNING"
        self.started.append(job.job_id)
        memory = self._memory_mb(job)
        killed_for: str | None = None
        reader = threading.Thread(target=self._pump, args=(job, proc), daemon=True)
        reader.start()
        while proc.poll() is None:
            if job.stop and killed_for is None:
                killed_for = job.job_stopped_reason or "terminated"
                proc.terminate()
            elif self.enforce_memory and memory and _rss_mb(proc.pid) > memory and killed_for is None:
                killed_for = OOM_REASON
                proc.kill()
            elif self._stop.is_set():
                proc.kill()
            time.sleep(0.02)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        with self._lock:
            self._procs.pop(job.job_id, None)
        code = proc.returncode
        job.exit_code = 137 if killed_for == OOM_REASON else (code if code >= 0 else 128 - code)
        if killed_for == OOM_REASON:
            job._ms_container_reason = OOM_REASON
            job.job_stopped_reason = OOM_REASON
        elif killed_for is not None:
            job.job_stopped_reason = killed_for
        elif code != 0:
            job.job_stopped_reason = FAILED_REASON
        job._mark_stopped(success=code == 0 and killed_for is None)

    def _pump(self, job: Any, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self._log(job, [raw.decode("utf-8", errors="replace").rstrip("\n")])


@dataclass(frozen=True)
class SandboxConfig:
    """What a daemon needs to use the sandbox."""

    endpoint_url: str
    bucket: str = BUCKET
    queue: str = QUEUE
    image: str = IMAGE
    region: str = REGION

    def environment(self) -> dict[str, str]:
        """``MILLSTREAM_*`` variables that point a daemon at the sandbox."""
        return {
            "MILLSTREAM_DATASTORE_TYPE": "s3",
            "MILLSTREAM_DATASTORE_BUCKET": self.bucket,
            "MILLSTREAM_DATASTORE_ENDPOINT_URL": self.endpoint_url,
            "MILLSTREAM_DATASTORE_REGION": self.region,
            "MILLSTREAM_BATCH_QUEUE": self.queue,
            "MILLSTREAM_BATCH_IMAGE": self.image,
            "MILLSTREAM_BATCH_ENDPOINT_URL": self.endpoint_url,
            "MILLSTREAM_BATCH_REGION": self.region,
        }

    def toml(self) -> str:
        """The same as a config file."""
        return (
            f'[datastore]\ntype = "s3"\nbucket = "{self.bucket}"\nendpoint_url = "{self.endpoint_url}"\n'
            f'region = "{self.region}"\n\n[batch]\nqueue = "{self.queue}"\nimage = "{self.image}"\n'
            f'endpoint_url = "{self.endpoint_url}"\nregion = "{self.region}"\n'
        )


def provision(endpoint_url: str, *, bucket: str = BUCKET, job_queue: str = QUEUE) -> SandboxConfig:
    """Create the bucket, a service role, a compute environment and the job queue."""
    import boto3

    def client(service: str) -> Any:
        return boto3.client(service, endpoint_url=endpoint_url, region_name=REGION,
                            aws_access_key_id="sandbox", aws_secret_access_key="sandbox")

    with contextlib.suppress(Exception):
        client("s3").create_bucket(Bucket=bucket)
    iam, ec2, batch = client("iam"), client("ec2"), client("batch")
    role = iam.create_role(RoleName="millstream-sandbox-batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="millstream-sandbox", Description="sandbox", VpcId=vpc)["GroupId"]
    env = batch.create_compute_environment(
        computeEnvironmentName="millstream-sandbox", type="MANAGED", state="ENABLED", serviceRole=role,
        computeResources={"type": "FARGATE", "maxvCpus": 256, "subnets": [subnet], "securityGroupIds": [group]})
    batch.create_job_queue(jobQueueName=job_queue, state="ENABLED", priority=1,
                           computeEnvironmentOrder=[{"order": 1,
                                                     "computeEnvironment": env["computeEnvironmentArn"]}])
    return SandboxConfig(endpoint_url=endpoint_url, bucket=bucket, queue=job_queue)


def configure_moto(endpoint_url: str) -> None:
    """Batch in simple mode (no Docker)."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{endpoint_url}/moto-api/config",
                                     data=json.dumps({"batch": {"use_docker": False}}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass


@contextlib.contextmanager
def sandbox(*, port: int = 0, slots: int = 4) -> Iterator[tuple[SandboxConfig, ComputeEnvironment]]:
    """A running sandbox on 127.0.0.1 (``port`` 0: any free port)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # one access-log line per AWS call

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    url = f"http://{host}:{bound}"
    compute = ComputeEnvironment(slots=slots)
    try:
        configure_moto(url)
        config = provision(url)
        compute.start()
        yield config, compute
    finally:
        compute.stop()
        server.stop()


def serve(port: int, slots: int) -> int:
    """``millstream sandbox``: run until interrupted, after printing the configuration."""
    for name, value in {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox",
                        "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(name, value)
    with sandbox(port=port, slots=slots) as (config, _):
        print("# millstream sandbox: S3, Batch and CloudWatch Logs on", config.endpoint_url)
        print("# put this in $XDG_CONFIG_HOME/millstream/config.toml (or export the variables below)")
        print(config.toml())
        for name, value in config.environment().items():
            print(f"export {name}={value}")
        print("export AWS_ACCESS_KEY_ID=sandbox AWS_SECRET_ACCESS_KEY=sandbox", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0
