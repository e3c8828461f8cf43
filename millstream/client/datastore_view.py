"""What the notebook Client API reads, and the reader that finds it in the datastore.

:class:`RunReader` is the port :mod:`millstream.client.api` depends on: a handful of
async questions about flows, runs, tasks and attempts. :class:`DatastoreView` answers
them from the object store alone, until the metadata store can answer the listing
questions faster; a reader over it only has to implement the same protocol.

Where each answer comes from, and what it costs:

======================  ==================================================  ==============
question                source                                              cost
======================  ==================================================  ==============
flows and run ids       ``daemon/<id>/runs/<flow>/<run>.json`` keys         one listing
a run                   ``<flow>/<run>/_run/run.json`` (owner, tags, time)  one get
its tasks and status    ``<flow>/<run>/_run/checkpoint.json``               one get
parameters              ``<flow>/<run>/_run/params.json``                   one get
a task's attempts       keys under ``<flow>/<run>/<step>/<task>/``          one listing
an attempt's outcome    ``.../<attempt>/done.json``                         one get
logs, artifacts         ``.../<attempt>/stdout``, ``<flow>/data/...``       one get each
======================  ==================================================  ==============

So iterating a flow's runs costs one listing plus one small read per run visited,
never anything per task. A run without a daemon summary (its daemon died between
storing the submission and the summary) is still reachable by its pathspec, but not
listed. Run ids are ordered newest first by number, since the daemon allocates them
monotonically per flow; ids that are not numbers come after, in reverse text order.

The Client API is synchronous: :func:`run_sync` runs a reader's coroutines on one
private event loop, on the calling thread when that runs no loop, else (inside
Jupyter, whose loop is running) on a helper thread, so a call never nests in the
caller's loop. One loop for the whole process keeps loop-bound clients (aiobotocore's)
valid across calls.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from millstream.datastore import layout
from millstream.datastore.artifacts import ArtifactRef, ArtifactStore
from millstream.datastore.records import AttemptKey, decode_record, list_attempts, read_done
from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError, NotFound

T = TypeVar("T")

CHECKPOINT_VERSION = 1

# The scheduler's transient states read as "running", as in the daemon's run summaries.
_STATUS = {"failing": "running", "cancelling": "running"}


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run's submission: who started it, when, with which tags."""

    flow: str
    run_id: str
    owner: str
    created_at: float | None
    tags: tuple[str, ...] = ()
    origin_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """One task of a run as the scheduler last recorded it."""

    step: str
    task_id: str
    index: tuple[int, ...]
    status: str
    attempts: int
    started_at: float | None


@dataclass(frozen=True, slots=True)
class RunProgress:
    """A run's scheduler state: its status and its tasks, in the order they were created."""

    status: str
    message: str | None
    tasks: tuple[TaskEntry, ...]

    @property
    def finished(self) -> bool:
        """True once the run has an end state, so this answer can no longer change."""
        return self.status in ("ok", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """The exception that failed an attempt, as the task runner recorded it."""

    type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return self.traceback or f"{self.type}: {self.message}"


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """An attempt's done marker: how it ended and what it stored."""

    status: str
    artifacts: dict[str, ArtifactRef] = field(default_factory=dict)
    foreach_stack: tuple[dict[str, Any], ...] = ()
    exception: TaskFailure | None = None
    started_at: float | None = None
    finished_at: float | None = None


class RunReader(Protocol):
    """The questions the Client API asks; every answer for a missing object is None or empty."""

    async def runs_by_flow(self) -> dict[str, list[str]]:
        """Every flow with at least one listed run, with its run ids newest first."""
        ...

    async def run_ids(self, flow: str) -> list[str]:
        """Ids of a flow's listed runs, newest first."""
        ...

    async def run(self, flow: str, run_id: str) -> RunRecord | None:
        """A run's submission record."""
        ...

    async def progress(self, flow: str, run_id: str) -> RunProgress | None:
        """A run's scheduler state, None before the first checkpoint."""
        ...

    async def params(self, flow: str, run_id: str) -> dict[str, Any]:
        """A run's parameter values, in their JSON form."""
        ...

    async def attempts(self, flow: str, run_id: str, step: str, task_id: str) -> list[int]:
        """Numbers of a task's attempts that left a record, sorted."""
        ...

    async def outcome(self, flow: str, run_id: str, step: str, task_id: str,
                      attempt: int) -> AttemptOutcome | None:
        """An attempt's outcome, None while it runs."""
        ...

    async def log(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                  stream: str) -> bytes:
        """An attempt's stored stdout or stderr, empty if none was stored."""
        ...

    async def artifact(self, flow: str, sha: str) -> Any:
        """The unpickled artifact with id ``sha``."""
        ...


class DatastoreView:
    """A :class:`RunReader` over an :class:`ObjectStore` and its layout."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._artifact_stores: dict[str, ArtifactStore] = {}

    def __repr__(self) -> str:
        return f"DatastoreView({self.store!r})"

    async def runs_by_flow(self) -> dict[str, list[str]]:
        """Every flow some daemon summarised a run of, by name, with its run ids newest first."""
        by_flow: dict[str, set[str]] = {}
        for flow, run_id in await self._summarised():
            by_flow.setdefault(flow, set()).add(run_id)
        return {flow: _newest_first(ids) for flow, ids in sorted(by_flow.items())}

    async def run_ids(self, flow: str) -> list[str]:
        """A flow's summarised runs, newest first."""
        layout.check_flow(flow)
        return _newest_first({run_id for name, run_id in await self._summarised() if name == flow})

    async def run(self, flow: str, run_id: str) -> RunRecord | None:
        """The run's ``run.json``, reduced to what the client shows."""
        key = f"{layout.run_prefix(flow, run_id)}{layout.RUN_DIR}/run.json"
        record = await self._read(key)
        if record is None:
            return None
        options = record.get("options") or {}
        created = record.get("created_at")
        return RunRecord(
            flow=flow, run_id=run_id, owner=str(record.get("owner") or ""),
            created_at=float(created) if isinstance(created, (int, float)) else None,
            tags=tuple(str(t) for t in options.get("tags") or ()),
            origin_run_id=options.get("origin_run_id"),
        )

    async def progress(self, flow: str, run_id: str) -> RunProgress | None:
        """The run's checkpoint, reduced to its status and task table."""
        key = layout.checkpoint_key(flow, run_id)
        state = await self._read(key)
        if state is None:
            return None
        if state.get("version") != CHECKPOINT_VERSION:
            raise DatastoreError(f"checkpoint {key} has version {state.get('version')!r}; "
                                 f"this client reads version {CHECKPOINT_VERSION}")
        try:
            tasks = tuple(_task_entry(t) for t in state.get("tasks", {}).values())
        except (KeyError, TypeError, ValueError) as exc:
            raise DatastoreError(f"corrupt checkpoint {key}: {exc!r}") from exc
        status = str(state.get("status", "running"))
        return RunProgress(status=_STATUS.get(status, status), message=state.get("message"), tasks=tasks)

    async def params(self, flow: str, run_id: str) -> dict[str, Any]:
        """The run's ``params.json``; empty if it has none."""
        return await self._read(layout.params_key(flow, run_id)) or {}

    async def attempts(self, flow: str, run_id: str, step: str, task_id: str) -> list[int]:
        """Attempt numbers found under the task's folder (a task cloned by a resume has one, 0)."""
        found = await list_attempts(self.store, flow, run_id, step, task_id)
        if not found and await self._clone_of(flow, run_id, step, task_id) is not None:
            return [0]
        return found

    async def _clone_of(self, flow: str, run_id: str, step: str, task_id: str) -> AttemptKey | None:
        """The origin attempt a resumed run cloned this task from, if it did."""
        index = await self._read(f"{layout.run_prefix(flow, run_id)}{layout.RUN_DIR}/clones.json")
        entry = (index or {}).get(f"{step}/{task_id}")
        if entry is None:
            return None
        return AttemptKey(flow, str(entry["run_id"]), step, task_id, int(entry["attempt"]))

    async def outcome(self, flow: str, run_id: str, step: str, task_id: str,
                      attempt: int) -> AttemptOutcome | None:
        """The attempt's ``done.json`` (for a cloned task, the origin's), parsed."""
        key = AttemptKey(flow, run_id, step, task_id, attempt)
        done = await read_done(self.store, key)
        if done is None and attempt == 0 and (origin := await self._clone_of(flow, run_id, step, task_id)):
            key = origin
            done = await read_done(self.store, key)
        if done is None:
            return None
        try:
            return _outcome(done)
        except (KeyError, TypeError, ValueError, DatastoreError) as exc:
            raise DatastoreError(f"corrupt done marker {key.done_key}: {exc}") from exc

    async def log(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                  stream: str) -> bytes:
        """The attempt's log as stored when it ended (for a cloned task, the origin's)."""
        if stream not in (layout.STDOUT, layout.STDERR):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        key = AttemptKey(flow, run_id, step, task_id, attempt)
        origin = await self._clone_of(flow, run_id, step, task_id) if attempt == 0 else None
        for candidate in (key, origin):
            if candidate is None:
                continue
            try:
                return await self.store.get(candidate.stdout_key if stream == layout.STDOUT else candidate.stderr_key)
            except NotFound:
                continue
        return b""

    async def artifact(self, flow: str, sha: str) -> Any:
        """Load, verify and unpickle one artifact."""
        store = self._artifact_stores.get(flow)
        if store is None:
            store = self._artifact_stores[flow] = ArtifactStore(self.store, flow)
        return await store.load(sha)

    async def _summarised(self) -> set[tuple[str, str]]:
        """``(flow, run_id)`` of every summary of every daemon sharing this datastore."""
        found = set()
        for key in await self.store.list(f"{layout.DAEMON_DIR}/"):
            parts = key.split("/")
            # daemon/<daemon_id>/runs/<flow>/<run_id>.json; active.json and the rest are skipped.
            if len(parts) == 5 and parts[2] == "runs" and parts[4].endswith(".json"):
                found.add((parts[3], parts[4][: -len(".json")]))
        return found

    async def _read(self, key: str) -> dict[str, Any] | None:
        try:
            data = await self.store.get(key)
        except NotFound:
            return None
        # json keeps the daemon's key order: a checkpoint lists tasks in creation order.
        return decode_record(data, key)


def _newest_first(ids: set[str]) -> list[str]:
    numbers = sorted((i for i in ids if i.isdigit()), key=int, reverse=True)
    return numbers + sorted((i for i in ids if not i.isdigit()), reverse=True)


def _task_entry(task: dict[str, Any]) -> TaskEntry:
    attempts = task.get("attempts") or []
    started = attempts[0].get("started_at") if attempts else None
    return TaskEntry(step=str(task["step"]), task_id=str(task["task_id"]),
                     index=tuple(int(i) for i in task.get("index") or ()), status=str(task.get("status")),
                     attempts=len(attempts), started_at=float(started) if started is not None else None)


def _outcome(done: dict[str, Any]) -> AttemptOutcome:
    exc = done.get("exception")
    failure = None
    if isinstance(exc, dict):
        failure = TaskFailure(type=str(exc.get("type", "")), message=str(exc.get("message", "")),
                              traceback=str(exc.get("traceback", "")))
    return AttemptOutcome(
        status=str(done.get("status")),
        artifacts={name: ArtifactRef.from_dict(ref) for name, ref in (done.get("artifacts") or {}).items()},
        foreach_stack=tuple(done.get("foreach_stack") or ()),
        exception=failure,
        started_at=done.get("started_at"),
        finished_at=done.get("finished_at"),
    )


# ----------------------------------------------------------------- synchronous access


class SyncBridge:
    """Runs coroutines to completion from synchronous code, one caller at a time, on one private loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._helper: ThreadPoolExecutor | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` and return its result."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None:
            return self._run_here(coro)
        if running is self._loop:
            coro.close()
            raise RuntimeError("the Client API cannot be called from inside its own I/O")
        with self._lock:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="millstream-client")
            helper = self._helper
        return helper.submit(self._run_here, coro).result()

    def _run_here(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Close the loop and stop the helper thread; a later call opens a new loop."""
        with self._lock:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.run_until_complete(self._loop.shutdown_default_executor())
                self._loop.close()
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.shutdown(wait=True)


_bridge = SyncBridge()
atexit.register(_bridge.close)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a reader coroutine from synchronous code (see the module docstring)."""
    return _bridge.run(coro)


_readers: dict[tuple[str, str, bool], DatastoreView] = {}
_readers_lock = threading.Lock()


def configured_reader(env: Mapping[str, str]) -> RunReader:
    """The reader of the datastore the settings name; one per datastore, reused."""
    from millstream.config.settings import load_settings
    from millstream.datastore.backends import open_store

    ds = load_settings(env).datastore
    key = (ds.type, ds.root, ds.durable)
    with _readers_lock:
        reader = _readers.get(key)
        if reader is None:
            # inline: the private loop has nothing else to run while one read blocks it.
            store = open_store({"type": ds.type, "root": ds.root, "durable": ds.durable, "inline": True})
            reader = _readers[key] = DatastoreView(store)
    return reader
