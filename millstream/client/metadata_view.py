"""The Client API's reader over the metadata store, with the datastore for the bytes.

:class:`MetadataView` answers the listing questions from the metadata store the daemon
records every run, task, attempt and artifact index in, and reads only what the store
does not hold from the datastore: artifact values, the exception of a failed attempt
(its ``done.json``) and logs. A task a resume cloned has no attempt folder of its own;
its attempt handle names the origin attempt (``origin_run_id``, ``origin_attempt``),
whose folder holds its done marker and logs and whose index lists its artifacts.

What each question costs, in metadata store calls (``list_runs`` and ``list_tasks`` are
a bounded number of queries each, whatever the size of the answer):

=====================================  ==============================================
question                               calls
=====================================  ==============================================
a page of a flow's runs (up to 1,000)  one ``list_runs``, tags filtered in the store
a run                                  one ``get_run``
its status and every task              one ``get_run`` + one ``list_tasks``
one task, an attempt's outcome         one ``get_task`` (none once the run's tasks are
                                       memoised, below), + one datastore get for the
                                       exception of a failed attempt
an attempt's artifacts                 one ``get_artifacts`` (the done marker instead
                                       when the index is missing or empty)
logs, artifact values                  datastore gets, as :class:`DatastoreView`
=====================================  ==============================================

The daemon records asynchronously, a moment after the fact, in order: a run's status
turns final only after every task and attempt of it was recorded. So the task table of
a run whose status is final cannot change, and is memoised (for the
:data:`MEMO_RUNS` runs read last): iterating such a run's tasks and asking each one's
outcome costs the one ``list_tasks``. Nothing of a running run is memoised.

The store is opened on first use, on the Client API's private loop
(:func:`~millstream.client.datastore_view.run_sync`), and closed by :meth:`close`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from millstream.client.datastore_view import (
    FINAL_STATUSES,
    AttemptEntry,
    AttemptOutcome,
    DatastoreView,
    RunPage,
    RunProgress,
    RunRecord,
    TaskEntry,
)
from millstream.datastore.artifacts import ArtifactRef
from millstream.datastore.records import AttemptKey
from millstream.errors import MetadataNotFound
from millstream.metadata import model
from millstream.metadata.store import MetadataStore

MEMO_RUNS = 32
_ENDED = frozenset({"ok", "failed", "cancelled"})


class MetadataView:
    """A :class:`~millstream.client.datastore_view.RunReader` over a metadata store and a datastore."""

    def __init__(self, metadata: MetadataStore, datastore: DatastoreView) -> None:
        self.metadata = metadata
        self.datastore = datastore
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._memo: OrderedDict[tuple[str, str], dict[tuple[str, str], model.TaskRecord]] = OrderedDict()

    def __repr__(self) -> str:
        return f"MetadataView({self.metadata!r}, {self.datastore!r})"

    async def _store(self) -> MetadataStore:
        if not self._opened:
            if self._open_lock is None:
                self._open_lock = asyncio.Lock()
            async with self._open_lock:
                if not self._opened:
                    await self.metadata.open()
                    self._opened = True
        return self.metadata

    async def close(self) -> None:
        """Close the metadata store if this view opened it."""
        if self._opened:
            self._opened = False
            await self.metadata.close()

    # ----------------------------------------------------------------- runs
    async def flows(self) -> list[str]:
        """Every flow with a recorded run."""
        return await (await self._store()).list_flows()

    async def list_runs(self, flow: str, *, tags: Sequence[str] = (), limit: int = 100,
                        cursor: str | None = None) -> RunPage:
        """One page of ``list_runs``, the tags filtered by the store."""
        page = await (await self._store()).list_runs(flow=flow, tags=list(tags), limit=limit, cursor=cursor)
        return RunPage([_run(r) for r in page.items], page.next_cursor)

    async def run(self, flow: str, run_id: str) -> RunRecord | None:
        """One run, status and parameters included."""
        try:
            return _run(await (await self._store()).get_run(flow, run_id))
        except MetadataNotFound:
            return None

    async def progress(self, flow: str, run_id: str) -> RunProgress | None:
        """The run's status and every task: one ``get_run`` and one ``list_tasks``."""
        store = await self._store()
        try:
            run = await store.get_run(flow, run_id)
            tasks = await store.list_tasks(flow, run_id)
        except MetadataNotFound:
            return None
        if run.origin_run_id is not None and any(not t.attempts for t in tasks):
            clones = await self.datastore.clones(flow, run_id)
            tasks = [_cloned(t, clones.get(f"{t.step}/{t.task_id}")) for t in tasks]
        if run.status in FINAL_STATUSES:
            self._remember(flow, run_id, tasks)
        # The store lists tasks by creation time; splits recorded in one instant keep their index order.
        ordered = sorted(tasks, key=lambda t: (t.created_at, t.step, t.foreach_index, t.task_id))
        return RunProgress(status=run.status, message=run.message,
                           tasks=tuple(_entry(t) for t in ordered if t.attempts))

    async def params(self, flow: str, run_id: str) -> dict[str, Any]:
        """The run's parameters as recorded with it."""
        record = await self.run(flow, run_id)
        return dict(record.params or {}) if record else {}

    async def add_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Add user tags in the store."""
        return _run(await (await self._store()).add_tags(flow, run_id, list(tags)))

    async def remove_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Remove user tags in the store (it keeps system tags)."""
        return _run(await (await self._store()).remove_tags(flow, run_id, list(tags)))

    # ----------------------------------------------------------------- tasks
    def _remember(self, flow: str, run_id: str, tasks: list[model.TaskRecord]) -> None:
        self._memo[(flow, run_id)] = {(t.step, t.task_id): t for t in tasks}
        self._memo.move_to_end((flow, run_id))
        while len(self._memo) > MEMO_RUNS:
            self._memo.popitem(last=False)

    async def _task(self, flow: str, run_id: str, step: str, task_id: str) -> model.TaskRecord | None:
        memo = self._memo.get((flow, run_id))
        if memo is not None:
            return memo.get((step, task_id))
        try:
            record = await (await self._store()).get_task(flow, run_id, step, task_id)
        except MetadataNotFound:
            return None
        if not record.attempts:
            record = _cloned(record, await self.datastore._clone_of(flow, run_id, step, task_id))
        return record

    async def task(self, flow: str, run_id: str, step: str, task_id: str) -> TaskEntry | None:
        """The task with its attempts, once one started."""
        record = await self._task(flow, run_id, step, task_id)
        return _entry(record) if record is not None and record.attempts else None

    async def _attempt(self, flow: str, run_id: str, step: str, task_id: str,
                       attempt: int) -> tuple[AttemptKey, model.AttemptRecord] | None:
        """Where the attempt's bytes are (the origin's for a clone), and its record."""
        record = await self._task(flow, run_id, step, task_id)
        found = next((a for a in record.attempts if a.attempt == attempt), None) if record else None
        if found is None:
            return None
        clone = AttemptEntry(found.attempt, handle=found.handle).clone_of
        if clone is not None:
            return AttemptKey(flow, clone[0], step, task_id, clone[1]), found
        return AttemptKey(flow, run_id, step, task_id, attempt), found

    async def outcome(self, flow: str, run_id: str, step: str, task_id: str,
                      attempt: int) -> AttemptOutcome | None:
        """The attempt as recorded once it ended; a failure's exception from its done marker."""
        located = await self._attempt(flow, run_id, step, task_id, attempt)
        if located is None or located[1].status not in _ENDED:
            return None
        key, record = located
        if record.status == "ok":
            # Artifacts come from the index, asked for only when they are wanted.
            return AttemptOutcome(status="ok", started_at=record.started_at, finished_at=record.finished_at)
        done = await self.datastore.outcome_at(key)
        return AttemptOutcome(status=record.status, artifacts=done.artifacts if done else {},
                              exception=done.exception if done else None,
                              foreach_stack=done.foreach_stack if done else (),
                              started_at=record.started_at, finished_at=record.finished_at)

    async def artifacts(self, flow: str, run_id: str, step: str, task_id: str,
                        attempt: int) -> dict[str, ArtifactRef]:
        """The attempt's artifact index (the origin attempt's for a clone)."""
        located = await self._attempt(flow, run_id, step, task_id, attempt)
        if located is None:
            return {}
        key = located[0]
        try:
            index = await (await self._store()).get_artifacts(flow, key.run, step, task_id, key.attempt)
        except MetadataNotFound:
            index = []
        if index and all(a.type_name for a in index):
            return {a.name: ArtifactRef(a.sha, a.size, a.type_name) for a in index}
        # Not indexed (yet, or ever: a failed attempt's are not), or indexed without type names
        # (as daemons before the recorder read the done marker's "type" field wrote): the done
        # marker lists them in full.
        done = await self.datastore.outcome_at(key)
        return dict(done.artifacts or {}) if done else {}

    async def log(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                  stream: str) -> bytes:
        """The attempt's stored log (the origin attempt's for a clone)."""
        located = await self._attempt(flow, run_id, step, task_id, attempt)
        key = located[0] if located else AttemptKey(flow, run_id, step, task_id, attempt)
        return await self.datastore.log_at(key, stream)

    async def artifact(self, flow: str, sha: str) -> Any:
        """One artifact's value, from the datastore."""
        return await self.datastore.artifact(flow, sha)

    async def task_metadata(self, flow: str, run_id: str, step: str, task_id: str) -> dict[str, str]:
        """The task's free-form fields."""
        try:
            return await (await self._store()).get_metadata(flow, run_id, step, task_id)
        except MetadataNotFound:
            return {}


def _cloned(record: model.TaskRecord, origin: AttemptKey | None) -> model.TaskRecord:
    """A task without recorded attempts as the datastore's clone index has it, if a resume cloned it.

    The daemon records a clone as its task (with its origin) and one ok attempt whose handle
    names the origin attempt; when that write was refused (the task had been recorded before,
    without its origin), ``_run/clones.json`` still says what the resume did.
    """
    if origin is None:
        return record
    handle = {"cloned_from": f"{origin.pathspec}/{origin.attempt}", "origin_run_id": origin.run,
              "origin_attempt": origin.attempt}
    return dataclasses.replace(record, status="ok", origin=origin.pathspec,
                               attempts=(model.AttemptRecord(0, "ok", exit_code=0, handle=handle),))


def _run(record: model.RunRecord) -> RunRecord:
    return RunRecord(flow=record.flow, run_id=record.run_id, owner=record.user, created_at=record.created_at,
                     tags=tuple(record.tags), origin_run_id=record.origin_run_id,
                     system_tags=tuple(record.system_tags), status=record.status, message=record.message,
                     finished_at=record.finished_at, params=dict(record.params))


def _entry(record: model.TaskRecord) -> TaskEntry:
    attempts = tuple(
        AttemptEntry(number=a.attempt, status=a.status, started_at=a.started_at, finished_at=a.finished_at,
                     exit_code=a.exit_code, message=a.message, handle=a.handle)
        for a in record.attempts)
    return TaskEntry(step=record.step, task_id=record.task_id, index=tuple(record.foreach_index),
                     status=record.status, attempts=attempts, parents=tuple(record.parents),
                     origin=record.origin, created_at=record.created_at)
