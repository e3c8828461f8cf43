"""Watching Batch jobs at scale: the status mapping, the poller and the rate limit.

- :func:`job_end` maps one DescribeJobs entry to the attempt's end (or None while it
  runs). It is pure: the table in ``docs/batch.md`` is its test.
- :class:`JobPoller` is the one poller of a daemon: every watched job id goes into
  DescribeJobs calls of at most :data:`DESCRIBE_BATCH` ids. The interval starts at
  ``interval_s``, grows by half while nothing changes up to ``max_interval_s``, falls
  back when a job changes or a new one is watched, and doubles on throttling.
- :class:`TokenBucket` keeps SubmitJob (and GetLogEvents) under the account's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from millstream.compute.base import ExitReason
from millstream.errors import ComputeError
from millstream.task.spec import EXIT_INFRA_FAILURE, EXIT_OK, EXIT_USER_FAILURE

log = structlog.get_logger(__name__)

#: DescribeJobs takes at most 100 job ids.
DESCRIBE_BATCH = 100
#: A watched job DescribeJobs no longer knows after this many polls is lost.
MISSING_POLLS = 3

ACTIVE_STATUSES = frozenset({"SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING"})
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED"})
#: The reason our own TerminateJob calls give, so their end is told from others.
CANCEL_REASON = "millstream: cancelled"

# Reasons Batch gives when the container never ran the task: retrying may help.
_START_FAILURES = (
    "CannotPullContainerError",
    "CannotStartContainerError",
    "CannotCreateContainerError",
    "CannotInspectContainerError",
    "ResourceInitializationError",
    "DockerTimeoutError",
    "TaskFailedToStart",
)


class Throttled(ComputeError):
    """AWS asked us to slow down (TooManyRequestsException, ThrottlingException)."""


@dataclass(frozen=True)
class JobEnd:
    """How a finished job ended: the exit code to report and, if any, the reason."""

    exit_code: int
    reason: ExitReason | None = None


def _reasons(job: dict[str, Any]) -> str:
    parts = [job.get("statusReason") or ""]
    container = job.get("container") or {}
    parts.append(container.get("reason") or "")
    for attempt in job.get("attempts") or []:
        parts.append(attempt.get("statusReason") or "")
        parts.append((attempt.get("container") or {}).get("reason") or "")
    return "; ".join(dict.fromkeys(p for p in parts if p))


def job_end(job: dict[str, Any]) -> JobEnd | None:
    """The end of a described job, or None while it is still queued or running."""
    status = job.get("status")
    if status not in TERMINAL_STATUSES:
        return None
    if status == "SUCCEEDED":
        return JobEnd(EXIT_OK)
    reasons = _reasons(job)
    exit_code = (job.get("container") or {}).get("exitCode")
    memory = (job.get("container") or {}).get("memory")
    if "OutOfMemoryError" in reasons or (exit_code == 137 and "memory" in reasons.lower()):
        limit = f" ({memory} MiB)" if memory else ""
        return JobEnd(
            EXIT_USER_FAILURE,
            ExitReason(
                f"out of memory: the container used more than its memory limit{limit}; "
                f"raise @batch(memory=) or @resources(memory=) [{reasons}]",
                kind="user",
            ),
        )
    if CANCEL_REASON in reasons:
        return JobEnd(EXIT_USER_FAILURE, ExitReason(f"the Batch job was terminated ({reasons})", kind="user"))
    if "duration exceeded timeout" in reasons.lower():
        return JobEnd(
            EXIT_USER_FAILURE,
            ExitReason(f"timed out on Batch (@timeout): {reasons}", kind="user"),
        )
    lowered = reasons.lower()
    if "spot" in lowered and ("reclaim" in lowered or "interrupt" in lowered or "terminat" in lowered):
        return JobEnd(
            EXIT_INFRA_FAILURE,
            ExitReason(f"spot capacity was reclaimed while the job ran: {reasons}", kind="infra"),
        )
    if lowered.startswith("host ec2") or "host ec2" in lowered:
        return JobEnd(
            EXIT_INFRA_FAILURE,
            ExitReason(
                f"the host running the job went away (a spot reclaim or a host failure): {reasons}",
                kind="infra",
            ),
        )
    if any(marker in reasons for marker in _START_FAILURES):
        return JobEnd(EXIT_INFRA_FAILURE, ExitReason(f"the container could not start: {reasons}", kind="infra"))
    if isinstance(exit_code, int):
        # The task runner's own exit code: its done marker tells the rest.
        text = f"the Batch job exited with code {exit_code}" + (f" ({reasons})" if reasons else "")
        return JobEnd(exit_code, ExitReason(text))
    return JobEnd(
        EXIT_INFRA_FAILURE,
        ExitReason(f"the Batch job failed without an exit code: {reasons or 'no reason given'}", kind="infra"),
    )


class TokenBucket:
    """At most ``rate_per_s`` takes per second on average, bursts up to ``burst``."""

    def __init__(self, rate_per_s: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0:
            raise ComputeError(f"a rate limit must be positive, got {rate_per_s!r}", retryable=False)
        self.rate = rate_per_s
        self.burst = burst if burst is not None else max(1.0, rate_per_s)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        """Wait for a token and spend it (callers are served in order)."""
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.rate)


Describe = Callable[[list[str]], Awaitable[list[dict[str, Any]]]]
OnUpdate = Callable[[str, dict[str, Any]], None]


class JobPoller:
    """One DescribeJobs loop for every job the daemon watches; see the module docstring."""

    def __init__(self, describe: Describe, *, interval_s: float = 2.0, max_interval_s: float = 30.0,
                 on_update: OnUpdate | None = None) -> None:
        self.describe = describe
        self.interval_s = interval_s
        self.max_interval_s = max(interval_s, max_interval_s)
        self.on_update = on_update
        self.current_interval_s = interval_s
        self.describe_calls = 0
        self._ends: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._peeks: dict[str, list[asyncio.Future[dict[str, Any] | None]]] = {}
        self._status: dict[str, str] = {}
        self._missing: dict[str, int] = {}
        self._kick = asyncio.Event()

    @property
    def watched(self) -> int:
        """How many jobs are watched now."""
        return len(set(self._ends) | set(self._peeks))

    def _hurry(self) -> None:
        self.current_interval_s = self.interval_s
        self._kick.set()

    async def until_done(self, job_id: str) -> dict[str, Any]:
        """The job's description once it has SUCCEEDED or FAILED."""
        fut = self._ends.get(job_id)
        if fut is None:
            fut = self._ends[job_id] = asyncio.get_running_loop().create_future()
            self._hurry()
        return await asyncio.shield(fut)

    async def peek(self, job_id: str) -> dict[str, Any] | None:
        """The job's next description, or None if Batch does not know it."""
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._peeks.setdefault(job_id, []).append(fut)
        self._hurry()
        return await fut

    def _resolve(self, job_id: str, job: dict[str, Any] | None) -> bool:
        changed = False
        for peek in self._peeks.pop(job_id, []):
            if not peek.done():
                peek.set_result(job)
        if job is None:
            return False
        status = str(job.get("status"))
        if self._status.get(job_id) != status:
            self._status[job_id] = status
            changed = True
        if self.on_update is not None:
            self.on_update(job_id, job)
        if status in TERMINAL_STATUSES:
            fut = self._ends.pop(job_id, None)
            self._status.pop(job_id, None)
            if fut is not None and not fut.done():
                fut.set_result(job)
        return changed

    def _lost(self, job_id: str) -> None:
        self._missing[job_id] = self._missing.get(job_id, 0) + 1
        if self._missing[job_id] >= MISSING_POLLS:
            self._missing.pop(job_id, None)
            fut = self._ends.pop(job_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(ComputeError(f"Batch no longer knows job {job_id}"))

    async def poll_once(self) -> bool:
        """Describe every watched job once; True when any job changed status."""
        ids = sorted(set(self._ends) | set(self._peeks))
        changed = False
        for start in range(0, len(ids), DESCRIBE_BATCH):
            chunk = ids[start:start + DESCRIBE_BATCH]
            self.describe_calls += 1
            jobs = await self.describe(chunk)
            seen = {}
            for job in jobs:
                seen[str(job["jobId"])] = job
            for job_id in chunk:
                found = seen.get(job_id)
                if found is None:
                    self._resolve(job_id, None)
                    self._lost(job_id)
                else:
                    self._missing.pop(job_id, None)
                    changed = self._resolve(job_id, found) or changed
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            self._kick.clear()
            if self._ends or self._peeks:
                try:
                    changed = await self.poll_once()
                except Throttled as exc:
                    self.current_interval_s = min(self.max_interval_s, self.current_interval_s * 2)
                    log.info("batch_describe_throttled", interval_s=self.current_interval_s, error=str(exc))
                except ComputeError as exc:
                    self.current_interval_s = min(self.max_interval_s, self.current_interval_s * 2)
                    log.warning("batch_describe_failed", interval_s=self.current_interval_s, error=str(exc))
                else:
                    if changed:
                        self.current_interval_s = self.interval_s
                    else:
                        self.current_interval_s = min(self.max_interval_s, self.current_interval_s * 1.5)
            else:
                self.current_interval_s = self.interval_s
            deadline = time.monotonic() + self.current_interval_s
            while not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake(stop), remaining)
                if self._kick.is_set():
                    # A new job: poll again within the base interval, not the grown one.
                    self._kick.clear()
                    deadline = min(deadline, time.monotonic() + self.interval_s)

    async def _wake(self, stop: asyncio.Event) -> None:
        kick = asyncio.ensure_future(self._kick.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({kick, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kick.cancel()
            stopped.cancel()

    def fail_all(self, exc: BaseException) -> None:
        """Fail every waiter (the backend is closing)."""
        for fut in self._ends.values():
            if not fut.done():
                fut.set_exception(exc)
        for futs in self._peeks.values():
            for peek in futs:
                if not peek.done():
                    peek.set_exception(exc)
        self._ends.clear()
        self._peeks.clear()
