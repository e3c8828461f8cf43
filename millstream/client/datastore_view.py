"""What the notebook Client API reads, and the reader that finds it in the datastore alone.

:class:`RunReader` is the port :mod:`millstream.client.api` depends on: a handful of
async questions about flows, runs, tasks and attempts, plus the two tag changes. Two
readers answer them:

- :class:`~millstream.client.metadata_view.MetadataView`, the default whenever a
  metadata store is configured and exists: runs, tasks, attempts, tags and the artifact
  index from the metadata store, bytes (artifacts, done markers, logs) from the datastore.
- :class:`DatastoreView`, for a datastore without a metadata store (a notebook pointed
  only at a datastore): everything from the object store, tags read-only.

Where :class:`DatastoreView` finds each answer, and what it costs:

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

So a page of a flow's runs costs one listing plus one small read per run visited,
never anything per task. A run without a daemon summary (its daemon died between
storing the submission and the summary) is still reachable by its pathspec, but not
listed. Run ids are ordered newest first by number, since the daemon allocates them
monotonically per flow; ids that are not numbers come after, in reverse text order.

The Client API is synchronous: :func:`run_sync` runs a reader's coroutines on one
private event loop, on the calling thread when that runs no loop, else (inside
Jupyter, whose loop is running) on a helper thread, so a call never nests in the
caller's loop. One loop for the whole process keeps loop-bound clients (aiobotocore's,
aiohttp's, aiosqlite's) valid across calls; :func:`close_readers` closes them, and runs
by itself at interpreter exit before non-daemon threads (aiosqlite's) are waited for.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from millstream.datastore import layout
from millstream.datastore.artifacts import ArtifactRef, ArtifactStore
from millstream.datastore.records import AttemptKey, decode_record, list_attempts, read_done
from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError, MetadataError, NotFound

if TYPE_CHECKING:
    from millstream.config.settings import Settings

T = TypeVar("T")

CHECKPOINT_VERSION = 1
FINAL_STATUSES = frozenset({"ok", "failed", "cancelled"})

# The scheduler's transient states read as "running", as in the daemon's run summaries.
_STATUS = {"failing": "running", "cancelling": "running"}
# Handle fields a resume writes into a cloned attempt's handle.
CLONE_FIELDS = ("cloned_from", "origin_run_id", "origin_attempt")


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run: who started it, when, with which tags; status and parameters when the reader knows them."""

    flow: str
    run_id: str
    owner: str
    created_at: float | None
    tags: tuple[str, ...] = ()
    origin_run_id: str | None = None
    system_tags: tuple[str, ...] | None = None  # None: the reader keeps none (``user:<owner>`` is implied)
    status: str | None = None  # None: ask RunReader.progress
    message: str | None = None
    finished_at: float | None = None
    params: Mapping[str, Any] | None = None  # None: ask RunReader.params


@dataclass(frozen=True, slots=True)
class RunPage:
    """One page of a listing; pass ``next_cursor`` back for the next (None: the last)."""

    items: list[RunRecord]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptEntry:
    """One attempt of a task as recorded: its status, times, exit code and backend handle."""

    number: int
    status: str = "unknown"  # unknown: the reader only knows that the attempt started
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    message: str | None = None
    handle: Mapping[str, Any] | None = None

    @property
    def clone_of(self) -> tuple[str, int] | None:
        """``(origin run id, origin attempt)`` when a resume cloned this attempt."""
        handle = self.handle or {}
        if not handle.get("cloned_from"):
            return None
        return str(handle["origin_run_id"]), int(handle["origin_attempt"])


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """One task of a run: where it sits in the graph, and its attempts in order."""

    step: str
    task_id: str
    index: tuple[int, ...] | None  # foreach indices, outermost first; None: not known to this reader
    status: str
    attempts: tuple[AttemptEntry, ...]
    parents: tuple[str, ...] | None = ()  # "step/task_id"; None: not known to this reader
    origin: str | None = None  # "flow/run/step/task" of the task a resume cloned
    created_at: float | None = None

    @property
    def started_at(self) -> float | None:
        """When the first attempt started."""
        return self.attempts[0].started_at if self.attempts else None

    def attempt(self, number: int) -> AttemptEntry | None:
        """The attempt numbered ``number``, if it was recorded."""
        return next((a for a in self.attempts if a.number == number), None)


@dataclass(frozen=True, slots=True)
class RunProgress:
    """A run's status and its tasks, in the order they were created."""

    status: str
    message: str | None
    tasks: tuple[TaskEntry, ...]

    @property
    def finished(self) -> bool:
        """True once the run has an end state, so this answer can no longer change."""
        return self.status in FINAL_STATUSES


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
    """How an attempt ended; its artifacts when the reader had them at hand (None: ask for them)."""

    status: str
    artifacts: Mapping[str, ArtifactRef] | None = None
    foreach_stack: tuple[dict[str, Any], ...] = ()
    exception: TaskFailure | None = None
    started_at: float | None = None
    finished_at: float | None = None


class RunReader(Protocol):
    """The questions the Client API asks; every answer for a missing object is None or empty."""

    async def flows(self) -> list[str]:
        """Every flow with at least one listed run, sorted."""
        ...

    async def list_runs(self, flow: str, *, tags: Sequence[str] = (), limit: int = 100,
                        cursor: str | None = None) -> RunPage:
        """A flow's runs that have every one of ``tags`` (user or system), newest first, a page at a time."""
        ...

    async def run(self, flow: str, run_id: str) -> RunRecord | None:
        """One run."""
        ...

    async def progress(self, flow: str, run_id: str) -> RunProgress | None:
        """A run's status and tasks, None before anything was recorded."""
        ...

    async def params(self, flow: str, run_id: str) -> dict[str, Any]:
        """A run's parameter values, in their JSON form."""
        ...

    async def task(self, flow: str, run_id: str, step: str, task_id: str) -> TaskEntry | None:
        """One task, None before any attempt of it started."""
        ...

    async def outcome(self, flow: str, run_id: str, step: str, task_id: str,
                      attempt: int) -> AttemptOutcome | None:
        """An attempt's outcome, None while it runs."""
        ...

    async def artifacts(self, flow: str, run_id: str, step: str, task_id: str,
                        attempt: int) -> dict[str, ArtifactRef]:
        """The artifacts an attempt stored, by name."""
        ...

    async def log(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                  stream: str) -> bytes:
        """An attempt's stored stdout or stderr, empty if none was stored."""
        ...

    async def artifact(self, flow: str, sha: str) -> Any:
        """The unpickled artifact with id ``sha``."""
        ...

    async def task_metadata(self, flow: str, run_id: str, step: str, task_id: str) -> dict[str, str]:
        """A task's free-form metadata fields."""
        ...

    async def add_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Add user tags; the run as it is now. MetadataError if tags cannot change here."""
        ...

    async def remove_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Remove user tags; the run as it is now. MetadataError if tags cannot change here."""
        ...


class DatastoreView:
    """A :class:`RunReader` over an :class:`ObjectStore` and its layout (tags read-only)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._artifact_stores: dict[str, ArtifactStore] = {}

    def __repr__(self) -> str:
        return f"DatastoreView({self.store!r})"

    async def close(self) -> None:
        """Nothing to release: the object store belongs to whoever made it."""

    async def flows(self) -> list[str]:
        """Every flow some daemon summarised a run of."""
        return sorted({flow for flow, _ in await self._summarised()})

    async def list_runs(self, flow: str, *, tags: Sequence[str] = (), limit: int = 100,
                        cursor: str | None = None) -> RunPage:
        """A page of the summarised runs that have ``tags``; the cursor is the position to go on from."""
        layout.check_flow(flow)
        ids = _newest_first({run_id for name, run_id in await self._summarised() if name == flow})
        position = int(cursor) if cursor and cursor.isdigit() else 0
        found: list[RunRecord] = []
        while position < len(ids) and len(found) < limit:
            record = await self.run(flow, ids[position])
            position += 1
            if record is not None and set(tags) <= {*record.tags, f"user:{record.owner}"}:
                found.append(record)
        return RunPage(found, str(position) if position < len(ids) else None)

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
            tasks = tuple(_task_entry(flow, t) for t in state.get("tasks", {}).values())
        except (KeyError, TypeError, ValueError) as exc:
            raise DatastoreError(f"corrupt checkpoint {key}: {exc!r}") from exc
        status = str(state.get("status", "running"))
        return RunProgress(status=_STATUS.get(status, status), message=state.get("message"), tasks=tasks)

    async def params(self, flow: str, run_id: str) -> dict[str, Any]:
        """The run's ``params.json``; empty if it has none."""
        return await self._read(layout.params_key(flow, run_id)) or {}

    async def task(self, flow: str, run_id: str, step: str, task_id: str) -> TaskEntry | None:
        """The attempts found under the task's folder (a task cloned by a resume has one, 0)."""
        found = await list_attempts(self.store, flow, run_id, step, task_id)
        if found:
            return TaskEntry(step, task_id, None, "unknown", tuple(AttemptEntry(n) for n in found), parents=None)
        origin = await self._clone_of(flow, run_id, step, task_id)
        if origin is None:
            return None
        handle = {"cloned_from": f"{origin.pathspec}/{origin.attempt}", "origin_run_id": origin.run,
                  "origin_attempt": origin.attempt}
        return TaskEntry(step, task_id, None, "ok", (AttemptEntry(0, "ok", handle=handle),), parents=None,
                         origin=f"{flow}/{origin.run}/{step}/{task_id}")

    async def clones(self, flow: str, run_id: str) -> dict[str, AttemptKey]:
        """``step/task_id`` -> the origin attempt, for every task a resumed run cloned."""
        index = await self._read(f"{layout.run_prefix(flow, run_id)}{layout.RUN_DIR}/clones.json")
        found = {}
        for key, entry in (index or {}).items():
            step, _, task_id = key.partition("/")
            found[key] = AttemptKey(flow, str(entry["run_id"]), step, task_id, int(entry["attempt"]))
        return found

    async def _clone_of(self, flow: str, run_id: str, step: str, task_id: str) -> AttemptKey | None:
        """The origin attempt a resumed run cloned this task from, if it did."""
        return (await self.clones(flow, run_id)).get(f"{step}/{task_id}")

    async def outcome(self, flow: str, run_id: str, step: str, task_id: str,
                      attempt: int) -> AttemptOutcome | None:
        """The attempt's ``done.json`` (for a cloned task, the origin's), parsed."""
        outcome = await self.outcome_at(AttemptKey(flow, run_id, step, task_id, attempt))
        if outcome is None and attempt == 0 and (origin := await self._clone_of(flow, run_id, step, task_id)):
            outcome = await self.outcome_at(origin)
        return outcome

    async def outcome_at(self, key: AttemptKey) -> AttemptOutcome | None:
        """The done marker of the attempt at ``key``, parsed; None if it has none."""
        done = await read_done(self.store, key)
        if done is None:
            return None
        try:
            return _outcome(done)
        except (KeyError, TypeError, ValueError, DatastoreError) as exc:
            raise DatastoreError(f"corrupt done marker {key.done_key}: {exc}") from exc

    async def artifacts(self, flow: str, run_id: str, step: str, task_id: str,
                        attempt: int) -> dict[str, ArtifactRef]:
        """The artifacts the attempt's done marker lists."""
        outcome = await self.outcome(flow, run_id, step, task_id, attempt)
        return dict(outcome.artifacts or {}) if outcome else {}

    async def log(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                  stream: str) -> bytes:
        """The attempt's log as stored when it ended (for a cloned task, the origin's)."""
        if stream not in (layout.STDOUT, layout.STDERR):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        key = AttemptKey(flow, run_id, step, task_id, attempt)
        origin = await self._clone_of(flow, run_id, step, task_id) if attempt == 0 else None
        for candidate in (key, origin):
            if candidate is not None:
                with contextlib.suppress(NotFound):
                    return await self.store.get(candidate.stdout_key if stream == layout.STDOUT
                                                else candidate.stderr_key)
        return b""

    async def log_at(self, key: AttemptKey, stream: str) -> bytes:
        """The log of the attempt at ``key``; empty if none was stored."""
        if stream not in (layout.STDOUT, layout.STDERR):
            raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
        try:
            return await self.store.get(key.stdout_key if stream == layout.STDOUT else key.stderr_key)
        except NotFound:
            return b""

    async def artifact(self, flow: str, sha: str) -> Any:
        """Load, verify and unpickle one artifact."""
        store = self._artifact_stores.get(flow)
        if store is None:
            store = self._artifact_stores[flow] = ArtifactStore(self.store, flow)
        return await store.load(sha)

    async def task_metadata(self, flow: str, run_id: str, step: str, task_id: str) -> dict[str, str]:
        """None are kept without a metadata store."""
        return {}

    async def add_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Refused: tags change in the metadata store, and this reader has none."""
        raise _no_metadata(flow, run_id)

    async def remove_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Refused: tags change in the metadata store, and this reader has none."""
        raise _no_metadata(flow, run_id)

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


def _no_metadata(flow: str, run_id: str) -> MetadataError:
    return MetadataError(f"cannot change the tags of {flow}/{run_id}: tags live in the metadata store, "
                         "and this client reads only a datastore (configure metadata.path or metadata.url)")


def _newest_first(ids: set[str]) -> list[str]:
    numbers = sorted((i for i in ids if i.isdigit()), key=int, reverse=True)
    return numbers + sorted((i for i in ids if not i.isdigit()), reverse=True)


def _task_entry(flow: str, task: dict[str, Any]) -> TaskEntry:
    attempts = tuple(
        AttemptEntry(number=int(a.get("number", n)), status=str(a.get("status", "unknown")),
                     started_at=a.get("started_at"), finished_at=a.get("finished_at"),
                     exit_code=a.get("exit_code"), message=a.get("message"), handle=a.get("handle"))
        for n, a in enumerate(task.get("attempts") or ()))
    clone = attempts[-1].clone_of if attempts else None
    return TaskEntry(step=str(task["step"]), task_id=str(task["task_id"]),
                     index=tuple(int(i) for i in task.get("index") or ()), status=str(task.get("status")),
                     attempts=attempts, parents=tuple(f"{s}/{t}" for s, t in task.get("parents") or ()),
                     origin=f"{flow}/{clone[0]}/{task['step']}/{task['task_id']}" if clone else None)


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


# ----------------------------------------------------------------- the configured reader


class _Closable(RunReader, Protocol):
    async def close(self) -> None: ...


_readers: dict[tuple[Any, ...], _Closable] = {}
_readers_lock = threading.Lock()


def configured_reader(env: Mapping[str, str]) -> RunReader:
    """The reader the settings in ``env`` name (see :func:`reader_for`)."""
    from millstream.config.settings import load_settings

    return reader_for(load_settings(env))


def reader_for(settings: Settings) -> RunReader:
    """The reader of the configured datastore and metadata store; one per configuration, reused.

    A :class:`~millstream.client.metadata_view.MetadataView` when a metadata store is
    configured and exists (the service always; an SQLite file once a daemon made it), else
    a :class:`DatastoreView` of the datastore alone.
    """
    from millstream.datastore.backends import open_store

    ds, meta = settings.datastore, settings.metadata
    with_metadata = meta.type == "service" or Path(meta.path).is_file()
    # Every datastore field (an S3 bucket, prefix, endpoint...) is part of the identity.
    key = (*astuple(ds), with_metadata, meta.type, meta.path, meta.url, meta.api_key, meta.api_key_file)
    with _readers_lock:
        reader = _readers.get(key)
        if reader is None:
            # inline: the private loop has nothing else to run while one read blocks it.
            store = open_store({**asdict(ds), "inline": True})
            view = DatastoreView(store)
            reader = view
            if with_metadata:
                from millstream.client.metadata_view import MetadataView
                from millstream.metadata.backends import metadata_store

                reader = MetadataView(metadata_store(meta), view)
            _readers[key] = reader
    return reader


def close_readers() -> None:
    """Close and forget every configured reader (the next call opens new ones)."""
    with _readers_lock:
        readers = list(_readers.values())
        _readers.clear()
    for reader in readers:
        run_sync(reader.close())


def _close_at_exit() -> None:
    # A store that cannot close cleanly (a service gone away) must not turn exit into a traceback.
    with contextlib.suppress(Exception):
        close_readers()


# At exit, before the interpreter waits for non-daemon threads such as aiosqlite's worker
# (plain atexit handlers run after that wait, which would never end).
_register = getattr(threading, "_register_atexit", atexit.register)
_register(_close_at_exit)
