"""The AWS Batch compute backend, on aiobotocore.

This is the one module that talks to AWS Batch and CloudWatch Logs; :meth:`BatchBackend._call`
is where botocore's errors become :class:`~millstream.errors.ComputeError` (``retryable``
for throttling, 5xx and connection trouble; :class:`~millstream.compute.batch_watch.Throttled`
for throttling).

Job definitions
    One per distinct set of container properties (image, roles, the bootstrap command,
    Linux parameters), named ``millstream-<hash of the properties>``. It is looked up
    with DescribeJobDefinitions before it is registered, and cached, so a daemon
    registers each at most once and a fleet of daemons shares them. Per-attempt
    resources travel as ``containerOverrides.resourceRequirements``.

Submission
    Each attempt's :class:`~millstream.task.spec.TaskSpec` is written to the datastore
    (``<run>/_run/batch/<job name>.json``, put-if-absent) and the container gets its key:
    SubmitJob requests stay far below Batch's 30 KiB limit whatever the parameters.
    The job name is derived from (flow, run, step, task, attempt), so it is the same for
    a restarted daemon; when the spec is already there, an earlier daemon may have
    submitted the job and died before its checkpoint said so, and ListJobs by that name
    finds it instead of submitting a second one. SubmitJob calls share one token bucket
    (``submit_rate`` per second, below the 50 per account AWS allows).

Retries
    ``retryStrategy.attempts`` is 1: millstream's scheduler decides about every retry
    (``@retry``, infrastructure failures) and every retry is a new attempt with its own
    job, name, logs and done marker, as for local tasks. Letting Batch retry would hide
    attempts from the run's record.

Foreach as array jobs
    The splits of a foreach step that start together (``LaunchRequest.array_key``) are
    gathered for up to ``array_window_s`` (or until all ``array_size`` arrived) and
    submitted as one array job. The specs go into one list ordered by split index, and
    the bootstrap picks entry ``AWS_BATCH_JOB_ARRAY_INDEX``: when every split is in the
    array (the usual first attempt) that index *is* the split index. Each child
    (``<array job id>:<index>``) is then watched, logged, cancelled and retried as its
    own task; a retry is an ordinary single job.

Watching
    :class:`~millstream.compute.batch_watch.JobPoller` describes every watched job, 100
    ids per DescribeJobs; :func:`~millstream.compute.batch_watch.job_end` maps the end to
    an exit code and an :class:`~millstream.compute.base.ExitReason`. Cancelling is
    TerminateJob. After a daemon restart a handle is re-attached by its job id (one
    batched DescribeJobs), never resubmitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from millstream.compute.base import ExitReason, LaunchRequest
from millstream.compute.batch_logs import LogFollower, messages_of
from millstream.compute.batch_watch import CANCEL_REASON, JobPoller, Throttled, TokenBucket, job_end
from millstream.config.settings import BatchSettings
from millstream.datastore import layout
from millstream.datastore.storage import ObjectStore
from millstream.errors import ComputeError
from millstream.task.spec import TaskSpec

log = structlog.get_logger(__name__)

#: The container's entry point (see millstream/compute/bootstrap.py and the Dockerfile).
BOOTSTRAP_COMMAND = ["python", "-m", "millstream.compute.bootstrap"]
MAX_JOB_NAME = 128
_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")
_THROTTLING = frozenset({"TooManyRequestsException", "ThrottlingException", "Throttling"})
SUBMIT_RETRIES = 5
MIN_ATTEMPT_DURATION_S = 60  # AWS refuses a shorter timeout.attemptDurationSeconds


def job_name(*parts: object) -> str:
    """A Batch job name from its parts: letters, digits, ``-`` and ``_``, at most 128.

    Where a part needs changing (``.`` in a task id) or the name is too long, a hash of
    the original parts is appended, so two different attempts never share a name.
    """
    raw = "-".join(str(p) for p in parts)
    clean = _NAME_OK.sub("_", raw)
    if clean == raw and len(clean) <= MAX_JOB_NAME:
        return clean
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    return f"{clean[:MAX_JOB_NAME - len(digest) - 1]}-{digest}"


def attempt_job_name(spec: TaskSpec) -> str:
    """The job name of one attempt."""
    return job_name("ms", spec.flow, spec.run_id, spec.step, spec.task_id, spec.attempt)


def array_job_name(specs: list[TaskSpec]) -> str:
    """The job name of an array of splits: the step, the attempt and a hash of the tasks."""
    first = specs[0]
    members = hashlib.sha256(",".join(s.task_id for s in specs).encode()).hexdigest()[:10]
    return job_name("ms", first.flow, first.run_id, first.step, f"array{len(specs)}", first.attempt, members)


def resources(request: LaunchRequest) -> tuple[float, int, int]:
    """``(vcpus, memory MiB, gpus)``: the larger of @batch and @resources, as in Metaflow."""
    attrs = request.batch or {}
    cpu = max(float(attrs.get("cpu") or 0), float(request.cpu or 0), 0.25)
    memory = max(int(attrs.get("memory") or 0), int(request.memory_mb or 0), 128)
    gpu = max(int(attrs.get("gpu") or 0), int(request.gpu or 0))
    return cpu, memory, gpu


def resource_requirements(cpu: float, memory_mb: int, gpu: int) -> list[dict[str, str]]:
    """``resourceRequirements`` for SubmitJob's container overrides."""
    reqs = [{"type": "VCPU", "value": f"{cpu:g}"}, {"type": "MEMORY", "value": str(memory_mb)}]
    if gpu:
        reqs.append({"type": "GPU", "value": str(gpu)})
    return reqs


def container_properties(settings: BatchSettings, attrs: dict[str, Any]) -> dict[str, Any]:
    """A job definition's container properties for a step's @batch attributes."""
    image = attrs.get("image") or settings.image
    if not image:
        raise ComputeError("no container image: set [batch] image or @batch(image=...)", retryable=False)
    props: dict[str, Any] = {
        "image": image,
        "command": list(BOOTSTRAP_COMMAND),
        # Defaults only: every SubmitJob overrides them with the step's demand.
        "resourceRequirements": resource_requirements(1, 1024, 0),
    }
    role = attrs.get("iam_role") or settings.job_role
    if role:
        props["jobRoleArn"] = role
    execution = attrs.get("execution_role") or settings.execution_role
    if execution:
        props["executionRoleArn"] = execution
    if attrs.get("privileged"):
        props["privileged"] = True
    linux: dict[str, Any] = {}
    if attrs.get("shared_memory"):
        linux["sharedMemorySize"] = int(attrs["shared_memory"])
    if attrs.get("max_swap") is not None:
        linux["maxSwap"] = int(attrs["max_swap"])
    if attrs.get("swappiness") is not None:
        linux["swappiness"] = int(attrs["swappiness"])
    if linux:
        props["linuxParameters"] = linux
    return props


def definition_name(props: dict[str, Any]) -> str:
    """``millstream-<hash>``: the job definition's name follows from its properties."""
    digest = hashlib.sha256(json.dumps(props, sort_keys=True).encode()).hexdigest()[:24]
    return f"millstream-{digest}"


def spec_key(spec: TaskSpec, name: str) -> str:
    """Where the specs of a job are stored."""
    return f"{layout.run_prefix(spec.flow, spec.run_id)}_run/batch/{name}.json"


@dataclass
class _Group:
    """Splits of one foreach gathering into one array job."""

    size: int
    members: dict[int, tuple[LaunchRequest, asyncio.Future[dict[str, Any]]]] = field(default_factory=dict)
    full: asyncio.Event = field(default_factory=asyncio.Event)


class BatchBackend:
    """Runs attempts as AWS Batch jobs; see the module docstring."""

    def __init__(self, settings: BatchSettings, *, store: ObjectStore, datastore_config: dict[str, Any],
                 session: AioSession | None = None) -> None:
        self.settings = settings
        self.store = store
        self.datastore_config = datastore_config
        self._session = session
        self._clients: dict[str, Any] = {}
        self._exit = contextlib.AsyncExitStack()
        self._client_lock = asyncio.Lock()
        self._definitions: dict[str, str] = {}
        self._definition_locks: dict[str, asyncio.Lock] = {}
        self._groups: dict[str, _Group] = {}
        self._reasons: dict[str, ExitReason | None] = {}
        self._stdout: dict[str, str] = {}
        self._prepared: dict[str, dict[tuple[str, str, int], tuple[str, int, int]]] = {}
        self._scan_locks: dict[str, asyncio.Lock] = {}
        self._submit_bucket = TokenBucket(settings.submit_rate)
        self.poller = JobPoller(self._describe, interval_s=settings.poll_interval_s,
                                max_interval_s=settings.max_poll_interval_s, on_update=self._on_update)
        self.logs = LogFollower(self._get_log_events, TokenBucket(settings.log_rate),
                                interval_s=max(0.2, settings.poll_interval_s / 2))
        self._stop: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.calls: dict[str, int] = {}

    # ----------------------------------------------------------------- AWS calls
    async def _client(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is not None:
            return client
        async with self._client_lock:
            if service not in self._clients:
                endpoint = self.settings.endpoint_url
                if service == "logs" and self.settings.logs_endpoint_url:
                    endpoint = self.settings.logs_endpoint_url
                config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1},
                                   max_pool_connections=16)
                session = self._session or AioSession()
                try:
                    self._clients[service] = await self._exit.enter_async_context(session.create_client(
                        service, region_name=self.settings.region or None, endpoint_url=endpoint or None,
                        config=config))
                except BotoCoreError as exc:
                    raise ComputeError(f"cannot open an AWS {service} client: {exc}") from exc
            return self._clients[service]

    async def _call(self, service: str, op: str, **kwargs: Any) -> dict[str, Any]:
        """One AWS call; botocore's errors become ComputeError here and nowhere else."""
        client = await self._client(service)
        self.calls[op] = self.calls.get(op, 0) + 1
        try:
            result: dict[str, Any] = await getattr(client, op)(**kwargs)
            return result
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            text = f"{service}.{op}: {code}: {error.get('Message', '')} (HTTP {status})"
            if code in _THROTTLING or status == 429:
                raise Throttled(text) from exc
            raise ComputeError(text, retryable=status >= 500) from exc
        except (BotoCoreError, OSError) as exc:
            raise ComputeError(f"{service}.{op}: {type(exc).__name__}: {exc}") from exc

    async def _call_retrying(self, service: str, op: str, **kwargs: Any) -> dict[str, Any]:
        for retry in range(SUBMIT_RETRIES + 1):
            try:
                return await self._call(service, op, **kwargs)
            except ComputeError as exc:
                if not exc.retryable or retry == SUBMIT_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0, min(10.0, 0.2 * 2**retry)))
        raise AssertionError("unreachable")

    async def _describe(self, job_ids: list[str]) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = (await self._call("batch", "describe_jobs", jobs=job_ids))["jobs"]
        return jobs

    async def _get_log_events(self, group: str, stream: str, token: str | None) -> tuple[list[str], str] | None:
        kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
        if token:
            kwargs["nextToken"] = token
        try:
            page = await self._call("logs", "get_log_events", **kwargs)
        except ComputeError as exc:
            if "ResourceNotFoundException" in str(exc):
                return None
            raise
        return messages_of(page), str(page.get("nextForwardToken") or token or "")

    # ----------------------------------------------------------------- background work
    def _ensure_running(self) -> None:
        if self._stop is None:
            self._stop = asyncio.Event()
            self._workers = [
                asyncio.create_task(self.poller.run(self._stop), name="batch-poller"),
                asyncio.create_task(self.logs.run(self._stop), name="batch-logs"),
            ]

    def _on_update(self, job_id: str, job: dict[str, Any]) -> None:
        stream = (job.get("container") or {}).get("logStreamName")
        path = self._stdout.get(job_id)
        if stream and path and job.get("status") in ("RUNNING", "SUCCEEDED", "FAILED"):
            self.logs.follow(job_id, self.settings.log_group, str(stream), path)

    # ----------------------------------------------------------------- job definitions
    async def job_definition(self, attrs: dict[str, Any]) -> str:
        """The ARN of the job definition for these @batch attributes, registered at most once."""
        props = container_properties(self.settings, attrs)
        name = definition_name(props)
        if name in self._definitions:
            return self._definitions[name]
        lock = self._definition_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._definitions:
                found = await self._call_retrying("batch", "describe_job_definitions",
                                                  jobDefinitionName=name, status="ACTIVE")
                active = sorted(found.get("jobDefinitions", []), key=lambda d: int(d.get("revision", 0)))
                if active:
                    arn = str(active[-1]["jobDefinitionArn"])
                else:
                    made = await self._call_retrying(
                        "batch", "register_job_definition", jobDefinitionName=name, type="container",
                        containerProperties=props, tags={"millstream": "task"}, propagateTags=True)
                    arn = str(made["jobDefinitionArn"])
                    log.info("batch_job_definition_registered", name=name, image=props["image"])
                self._definitions[name] = arn
        return self._definitions[name]

    # ----------------------------------------------------------------- submitting
    def _queue(self, attrs: dict[str, Any]) -> str:
        queue = attrs.get("queue") or self.settings.queue
        if not queue:
            raise ComputeError("no job queue: set [batch] queue or @batch(queue=...)", retryable=False)
        return str(queue)

    def submit_request(self, request: LaunchRequest, *, name: str, definition: str, key: str,
                       array_size: int = 0) -> dict[str, Any]:
        """The SubmitJob parameters of one job (or one array job of ``array_size``)."""
        spec = request.spec
        attrs = request.batch or {}
        cpu, memory, gpu = resources(request)
        environment = {
            "MILLSTREAM_DATASTORE": json.dumps(self.datastore_config, sort_keys=True),
            "MILLSTREAM_CODE_PACKAGE": request.package,
            "MILLSTREAM_SPEC_KEY": key,
            "PYTHONUNBUFFERED": "1",
        }
        tags = {
            "millstream:flow": spec.flow,
            "millstream:run_id": spec.run_id,
            "millstream:step": spec.step,
            "millstream:attempt": str(spec.attempt),
            "millstream:user": spec.username or "unknown",
        }
        if not array_size:
            tags["millstream:task"] = spec.task_id
        tags.update({str(k): str(v) for k, v in (attrs.get("aws_batch_tags") or {}).items()})
        params: dict[str, Any] = {
            "jobName": name,
            "jobQueue": self._queue(attrs),
            "jobDefinition": definition,
            "containerOverrides": {
                "command": list(BOOTSTRAP_COMMAND),
                "environment": [{"name": k, "value": v} for k, v in sorted(environment.items())],
                "resourceRequirements": resource_requirements(cpu, memory, gpu),
            },
            "retryStrategy": {"attempts": 1},
            "tags": tags,
            "propagateTags": True,
        }
        if request.timeout_s:
            params["timeout"] = {"attemptDurationSeconds": max(MIN_ATTEMPT_DURATION_S, math.ceil(request.timeout_s))}
        if array_size:
            params["arrayProperties"] = {"size": array_size}
        return params

    async def _submit(self, requests: list[LaunchRequest]) -> str:
        """Submit one job for one request, or one array job for several; its job id."""
        first = requests[0]
        specs = [r.spec for r in requests]
        name = attempt_job_name(first.spec) if len(requests) == 1 else array_job_name(specs)
        key = spec_key(first.spec, name)
        payload = json.dumps([s.to_dict() for s in specs]).encode()
        queue = self._queue(first.batch or {})
        if not await self.store.put_if_absent(key, payload):
            existing = await self._find_job(queue, name)
            if existing is not None:
                log.info("batch_job_found", name=name, job_id=existing)
                return existing
            await self.store.put(key, payload)
        definition = await self.job_definition(first.batch or {})
        params = self.submit_request(first, name=name, definition=definition, key=key,
                                     array_size=len(requests) if len(requests) > 1 else 0)
        await self._submit_bucket.take()
        job_id = str((await self._call_retrying("batch", "submit_job", **params))["jobId"])
        log.info("batch_job_submitted", name=name, job_id=job_id, size=len(requests))
        return job_id

    async def _find_job(self, queue: str, name: str) -> str | None:
        """The id of a job of this name in the queue, if an earlier daemon submitted one."""
        found = await self._call_retrying("batch", "list_jobs", jobQueue=queue,
                                          filters=[{"name": "JOB_NAME", "values": [name]}])
        # Array children share their parent's name; the parent's id is the one wanted.
        jobs = [j for j in found.get("jobSummaryList", []) if j.get("jobName") == name and ":" not in j["jobId"]]
        if not jobs:
            return None
        return str(max(jobs, key=lambda j: int(j.get("createdAt", 0)))["jobId"])

    def _handle(self, request: LaunchRequest, job_id: str, *, parent: str | None = None,
                index: int | None = None) -> dict[str, Any]:
        # The engine reads and uploads both files as for a local process; CloudWatch has
        # one stream per container, which fills stdout, so stderr stays empty.
        for path in (request.stdout_path, request.stderr_path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch()
        handle: dict[str, Any] = {"backend": "batch", "job_id": job_id, "stdout": request.stdout_path}
        if parent is not None:
            handle.update(parent_job_id=parent, array_index=index)
        return handle

    async def _submitted_before(self, spec: TaskSpec) -> tuple[str, int, int] | None:
        """``(job name, array index, array size)`` of a job an earlier daemon prepared for this attempt.

        The first launch of a run in this daemon lists the run's stored job specs (one LIST
        call; a new run has none), so an attempt whose job was submitted but not yet
        checkpointed (the daemon died in between, perhaps with only part of an array's
        attempts in its last checkpoint) is found, not submitted again.
        """
        run = f"{spec.flow}/{spec.run_id}"
        lock = self._scan_locks.setdefault(run, asyncio.Lock())
        async with lock:
            if run not in self._prepared:
                prepared: dict[tuple[str, str, int], tuple[str, int, int]] = {}
                prefix = f"{layout.run_prefix(spec.flow, spec.run_id)}_run/batch/"
                for key in await self.store.list(prefix):
                    name = key[len(prefix):].removesuffix(".json")
                    specs = json.loads(await self.store.get(key))
                    for index, s in enumerate(specs):
                        prepared[(s["step"], s["task_id"], int(s["attempt"]))] = (name, index, len(specs))
                self._prepared[run] = prepared
        return self._prepared[run].get((spec.step, spec.task_id, spec.attempt))

    async def _adopt(self, request: LaunchRequest) -> dict[str, Any] | None:
        known = await self._submitted_before(request.spec)
        if known is None:
            return None
        name, index, size = known
        job_id = await self._find_job(self._queue(request.batch or {}), name)
        if job_id is None:
            return None
        log.info("batch_job_adopted", name=name, job_id=job_id, index=index)
        if size == 1:
            return self._handle(request, job_id)
        return self._handle(request, f"{job_id}:{index}", parent=job_id, index=index)

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Submit the attempt as a job, or as a child of its foreach's array job."""
        self._ensure_running()
        adopted = await self._adopt(request)
        if adopted is not None:
            return adopted
        if request.array_key is None or request.array_size < 2:
            return self._handle(request, await self._submit([request]))
        return await self._join_array(request)

    async def _join_array(self, request: LaunchRequest) -> dict[str, Any]:
        key = str(request.array_key)
        group = self._groups.get(key)
        leader = group is None
        if group is None:
            group = self._groups[key] = _Group(size=request.array_size)
        mine: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        group.members[int(request.spec.split_index or 0)] = (request, mine)
        if len(group.members) >= group.size:
            group.full.set()
        if leader:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.full.wait(), self.settings.array_window_s)
            del self._groups[key]
            await self._submit_group(group)
        return await mine

    async def _submit_group(self, group: _Group) -> None:
        ordered = [group.members[i] for i in sorted(group.members)]
        requests = [r for r, _ in ordered]
        try:
            job_id = await self._submit(requests)
        except BaseException as exc:
            for _, fut in ordered:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ComputeError("submission cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for index, (request, fut) in enumerate(ordered):
            if len(ordered) == 1:
                fut.set_result(self._handle(request, job_id))
            else:
                fut.set_result(self._handle(request, f"{job_id}:{index}", parent=job_id, index=index))

    # ----------------------------------------------------------------- watching
    async def wait(self, handle: dict[str, Any]) -> int | None:
        """The attempt's exit code once its job has ended (logs drained first)."""
        self._ensure_running()
        job_id = str(handle["job_id"])
        if handle.get("stdout"):
            self._stdout[job_id] = str(handle["stdout"])
        try:
            job = await self.poller.until_done(job_id)
            self._on_update(job_id, job)  # a job that ended before it was seen running
            await self.logs.finish(job_id)
        except ComputeError as exc:
            self._reasons[job_id] = ExitReason(str(exc), kind="infra")
            return None
        finally:
            self._stdout.pop(job_id, None)
        end = job_end(job)
        assert end is not None
        self._reasons[job_id] = end.reason
        return end.exit_code

    def exit_reason(self, handle: dict[str, Any]) -> ExitReason | None:
        """Why the job ended, as Batch told it (out of memory, spot reclaim, ...)."""
        return self._reasons.pop(str(handle["job_id"]), None)

    async def cancel(self, handle: dict[str, Any], *, grace_s: float) -> None:
        """TerminateJob; Batch stops the container (SIGTERM, then SIGKILL after 30 s)."""
        job_id = str(handle["job_id"])
        try:
            await self._call_retrying("batch", "terminate_job", jobId=job_id, reason=CANCEL_REASON)
        except ComputeError as exc:
            log.warning("batch_terminate_failed", job_id=job_id, error=str(exc))

    async def reattach(self, handle: dict[str, Any]) -> bool:
        """True when Batch still knows the job (running or ended: :meth:`wait` tells which)."""
        self._ensure_running()
        return await self.poller.peek(str(handle["job_id"])) is not None

    async def close(self) -> None:
        """Stop polling and tailing, and close the AWS clients (jobs carry on)."""
        if self._stop is not None:
            self._stop.set()
            for worker in self._workers:
                worker.cancel()
            for worker in self._workers:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
            self._stop = None
        self.poller.fail_all(ComputeError("the Batch backend closed"))
        await self._exit.aclose()
        self._clients.clear()

