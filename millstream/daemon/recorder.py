"""Record runs, tasks, attempts and artifacts in the metadata store, off the hot path.

The scheduler never waits for the metadata store: every write is queued and one
worker applies them in order (a task before its attempts, an attempt's start before
its end). A write that fails because the store is unreachable is retried with backoff
until it succeeds or the daemon stops; one the store rejects is logged and dropped.
Every write is idempotent, so a recovered daemon simply records again.

Heartbeats for the active runs go out every ``heartbeat_interval_s`` so the store can
tell a run whose daemon vanished from one that is still going.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from millstream.daemon import scheduler as sch
from millstream.errors import MetadataError
from millstream.metadata.model import ArtifactRecord, AttemptRecord
from millstream.metadata.store import MetadataStore

log = structlog.get_logger(__name__)

MAX_BACKOFF_S = 10.0


class Recorder:
    """An ordered, retrying queue of metadata writes."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self._queue: asyncio.Queue[tuple[str, Callable[[], Awaitable[Any]]]] = asyncio.Queue()
        self.written = 0
        self.dropped = 0

    def record(self, what: str, write: Callable[[], Awaitable[Any]]) -> None:
        """Queue a write; ``what`` names it in logs."""
        self._queue.put_nowait((what, write))

    @property
    def backlog(self) -> int:
        """Writes not yet applied."""
        return self._queue.qsize()

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) until the queue is empty."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Apply writes until ``stop`` is set and the queue is empty (or cancelled)."""
        while not (stop.is_set() and self._queue.empty()):
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter not in done:
                getter.cancel()
                continue
            what, write = getter.result()
            try:
                await self._apply(what, write, stop)
            finally:
                self._queue.task_done()

    async def _apply(self, what: str, write: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> None:
        delay = 0.1
        while True:
            try:
                await write()
                self.written += 1
                return
            except MetadataError as exc:
                if not exc.retryable or stop.is_set():
                    self.dropped += 1
                    log.warning("metadata_write_dropped", what=what, error=str(exc))
                    return
                log.info("metadata_write_retry", what=what, error=str(exc), delay_s=round(delay, 2))
            except Exception as exc:
                self.dropped += 1
                log.error("metadata_write_failed", what=what, error=repr(exc))
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(MAX_BACKOFF_S, delay * 2)

    async def heartbeats(self, active: Callable[[], list[list[str]]], interval_s: float, stop: asyncio.Event) -> None:
        """Beat for every active run every ``interval_s`` until ``stop``."""
        while not stop.is_set():
            for flow, run_id in active():
                self.record(f"heartbeat {flow}/{run_id}", functools.partial(self.store.heartbeat_run, flow, run_id))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


# --------------------------------------------------------------------- what the engine records
def record_tasks(recorder: Recorder, flow: str, run_id: str, tasks: list[sch.Task]) -> None:
    """New tasks of a run (pending)."""
    store = recorder.store
    for task in tasks:
        parents = [f"{s}/{t}" for s, t in task.parents]
        write = functools.partial(
            store.record_task, flow, run_id, task.step, task.task_id, foreach_index=task.index, parents=parents
        )
        recorder.record(f"task {flow}/{run_id}/{task.key}", write)


def record_clone(recorder: Recorder, flow: str, run_id: str, task: sch.Task, origin_pathspec: str) -> None:
    """A task a resume cloned, with the origin task it came from."""
    store = recorder.store
    attempt = task.attempts[-1]
    origin = origin_pathspec.rsplit("/", 1)[0]
    record = AttemptRecord(
        attempt=0,
        status="ok",
        started_at=attempt.started_at,
        finished_at=attempt.finished_at,
        exit_code=0,
        handle=attempt.handle,
    )

    async def write() -> None:
        await store.record_task(
            flow,
            run_id,
            task.step,
            task.task_id,
            foreach_index=task.index,
            parents=[f"{s}/{t}" for s, t in task.parents],
            origin=origin,
        )
        await store.record_attempt(flow, run_id, task.step, task.task_id, record)

    recorder.record(f"clone {flow}/{run_id}/{task.key}", write)


def record_attempt(
    recorder: Recorder, flow: str, run_id: str, task: sch.Task, attempt: sch.Attempt, done: dict[str, Any] | None = None
) -> None:
    """An attempt's start or end; at a successful end, its artifact index too."""
    store = recorder.store
    record = AttemptRecord(
        attempt=attempt.number,
        status=attempt.status,
        started_at=attempt.started_at,
        finished_at=attempt.finished_at,
        exit_code=attempt.exit_code,
        message=attempt.message,
        handle=attempt.handle,
    )
    artifacts = [
        ArtifactRecord(name=name, sha=ref["sha"], size=int(ref.get("size", 0)), type_name=str(ref.get("type", "")))
        for name, ref in sorted(((done or {}).get("artifacts") or {}).items())
    ]

    async def write() -> None:
        await store.record_attempt(flow, run_id, task.step, task.task_id, record)
        if artifacts and attempt.status == sch.OK:
            await store.record_artifacts(flow, run_id, task.step, task.task_id, attempt.number, artifacts)

    recorder.record(f"attempt {flow}/{run_id}/{task.key}/{attempt.number}", write)
