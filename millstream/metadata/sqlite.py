"""The embedded metadata store: one SQLite file, shared safely by several daemons.

Decisions, so that the next reader need not rediscover them:

- **One connection per store, one asyncio lock.** aiosqlite runs every statement on one
  worker thread; the lock keeps one coroutine's transaction from interleaving with
  another's on that connection. Other processes are kept out by SQLite's own locks:
  WAL mode (readers never block the writer), ``busy_timeout`` (a writer waits for the
  file lock rather than failing at once) and ``BEGIN IMMEDIATE`` for every write, so the
  write lock is taken before anything is read and a read-then-write can never race.
- **Run ids** come from a per-flow counter row (``flows.last_run``) bumped with an
  upsert inside that immediate transaction: monotonic per flow, never handed out twice,
  even to processes that open the same file at the same moment. They are stored as
  integers (``run_number``) so that "10" sorts after "9", and spoken as strings.
- **Idempotency**: a ``request_id`` is unique in the file, so a retried ``create_run``
  returns the first run (and one naming another flow is a conflict). Recording a task or
  an artifact again is a no-op, and a conflict if it contradicts what is stored (another
  parent, another sha). Updating an attempt keeps the fields the update leaves ``None``
  (a finish report need not repeat ``started_at``); the task's status is the status of
  its highest-numbered attempt. Metadata fields merge, the last write winning.
- **Dead runs** are not written: a ``running`` run whose heartbeat (or creation, if it
  never beat) is older than ``dead_after_s`` by the store's clock reads as ``failed`` with
  :data:`DEAD_RUN_MESSAGE`, and a late heartbeat brings it back. Listings filter on that
  computed status in SQL, so ``status="failed"`` finds dead runs.
- **Listings** are keyset-paginated (:mod:`millstream.metadata.cursor`) and cost one
  statement per page: tags and parameters are JSON columns read with the run and filtered
  with ``json_each``. ``created_after`` is inclusive and ``created_before`` exclusive, so
  adjacent windows neither overlap nor leave gaps. ``list_tasks`` is two statements.
- **Schema**: :data:`MIGRATIONS` is applied in order on open, each inside the immediate
  transaction that records it in ``schema_version``; a crash mid-migration leaves the
  previous version intact. A file written by a newer millstream is refused, not guessed at.
  Migrations live here, not in ``.sql`` files, so that no packaging step can lose them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from millstream.errors import MetadataConflict, MetadataError, MetadataNotFound
from millstream.metadata.cursor import decode_cursor, encode_cursor
from millstream.metadata.model import (
    DEAD_RUN_MESSAGE,
    RUN_STATUSES,
    TASK_STATUSES,
    ArtifactRecord,
    AttemptRecord,
    Page,
    RunRecord,
    TaskRecord,
)

MAX_PAGE = 1000  # a larger ``limit`` is served as this many runs per page
FINAL_RUN_STATUSES = ("ok", "failed", "cancelled")

# Migration N is MIGRATIONS[N - 1]. Append; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE flows (name TEXT PRIMARY KEY, last_run INTEGER NOT NULL);  -- last_run: the run counter
    CREATE TABLE runs (
        flow TEXT NOT NULL REFERENCES flows (name), run_number INTEGER NOT NULL, user TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'cancelled')),
        created_at REAL NOT NULL, finished_at REAL, heartbeat_at REAL, message TEXT,
        tags TEXT NOT NULL DEFAULT '[]', system_tags TEXT NOT NULL DEFAULT '[]',  -- JSON arrays of strings
        params TEXT NOT NULL DEFAULT '{}',                                        -- a JSON object
        daemon_id TEXT, origin_run_id TEXT, request_id TEXT,
        PRIMARY KEY (flow, run_number)
    );
    CREATE UNIQUE INDEX runs_by_request ON runs (request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX runs_by_flow_newest ON runs (flow, created_at DESC, run_number DESC);
    CREATE INDEX runs_newest ON runs (created_at DESC, run_number DESC, flow DESC);
    CREATE TABLE tasks (
        flow TEXT NOT NULL, run_number INTEGER NOT NULL, step TEXT NOT NULL, task_id TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'ok', 'failed', 'cancelled')),
        foreach_index TEXT NOT NULL DEFAULT '[]', parents TEXT NOT NULL DEFAULT '[]', origin TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (flow, run_number, step, task_id),
        FOREIGN KEY (flow, run_number) REFERENCES runs (flow, run_number)
    );
    CREATE TABLE attempts (
        flow TEXT NOT NULL, run_number INTEGER NOT NULL, step TEXT NOT NULL, task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL CHECK (attempt >= 0),
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'ok', 'failed', 'cancelled')),
        started_at REAL, finished_at REAL, exit_code INTEGER, message TEXT,
        handle TEXT,                                                              -- a JSON object or NULL
        PRIMARY KEY (flow, run_number, step, task_id, attempt),
        FOREIGN KEY (flow, run_number, step, task_id) REFERENCES tasks (flow, run_number, step, task_id)
    );
    -- Artifacts hang off the task, not the attempt row: an attempt's index may be recorded
    -- before its final status is.
    CREATE TABLE artifacts (
        flow TEXT NOT NULL, run_number INTEGER NOT NULL, step TEXT NOT NULL, task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL CHECK (attempt >= 0), name TEXT NOT NULL,
        sha TEXT NOT NULL, size INTEGER NOT NULL, type_name TEXT NOT NULL,
        PRIMARY KEY (flow, run_number, step, task_id, attempt, name),
        FOREIGN KEY (flow, run_number, step, task_id) REFERENCES tasks (flow, run_number, step, task_id)
    );
    CREATE TABLE task_metadata (
        flow TEXT NOT NULL, run_number INTEGER NOT NULL, step TEXT NOT NULL, task_id TEXT NOT NULL,
        field TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (flow, run_number, step, task_id, field),
        FOREIGN KEY (flow, run_number, step, task_id) REFERENCES tasks (flow, run_number, step, task_id)
    );
    """,
)

_RUN_COLUMNS = ("flow, run_number, user, status, created_at, finished_at, heartbeat_at, message, "
                "tags, system_tags, params, daemon_id, origin_run_id")
_TASK_COLUMNS = "step, task_id, status, foreach_index, parents, origin, created_at"
_ATTEMPT_COLUMNS = "step, task_id, attempt, status, started_at, finished_at, exit_code, message, handle"
_RUN_KEY = "flow = ? AND run_number = ?"
_TASK_KEY = "flow = ? AND run_number = ? AND step = ? AND task_id = ?"
# The status a reader sees: one parameter, the instant before which a heartbeat is stale.
_SEEN_STATUS = ("CASE WHEN status = 'running' AND COALESCE(heartbeat_at, created_at) < ? "
                "THEN 'failed' ELSE status END")
_HAS_TAG = ("EXISTS (SELECT 1 FROM json_each(runs.tags) WHERE value = ? "
            "UNION ALL SELECT 1 FROM json_each(runs.system_tags) WHERE value = ?)")


class SqliteMetadataStore:
    """:class:`~millstream.metadata.store.MetadataStore` in one SQLite file."""

    def __init__(self, path: Path, *, dead_after_s: float = 120.0, busy_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.dead_after_s = dead_after_s
        self.busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> SqliteMetadataStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, switch to WAL, and create or migrate the schema."""
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _translate():
            # isolation_level=None: no implicit transactions; every BEGIN here is explicit.
            db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            with _translate():
                db.row_factory = sqlite3.Row
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                (mode,) = (await _fetch(db, "PRAGMA journal_mode = WAL"))[0]
                if str(mode).lower() != "wal":
                    raise MetadataError(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})")
                # In WAL mode NORMAL never corrupts the file; a power cut may lose the last
                # commits, which the daemon records again from its checkpoint. It saves an
                # fsync per commit, and the daemon makes thousands in a big foreach.
                await db.execute("PRAGMA synchronous = NORMAL")
                await db.execute("PRAGMA foreign_keys = ON")
                await _migrate(db, self.path)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    # ----------------------------------------------------------------- runs
    async def create_run(self, flow: str, *, user: str, params: Mapping[str, Any] | None = None,
                         tags: Sequence[str] = (), system_tags: Sequence[str] = (),
                         daemon_id: str | None = None, origin_run_id: str | None = None,
                         request_id: str | None = None, now: float | None = None) -> RunRecord:
        """Allocate the flow's next run id and record the run as running (idempotent per request id)."""
        _check_name("flow", flow)
        if not isinstance(user, str) or not user:
            raise MetadataError(f"bad user {user!r}: a non-empty string")
        user_tags, sys_tags = _check_tags(tags), _check_tags(system_tags)
        params_json = _to_json(dict(params or {}), "params")
        at = self._now(now)
        async with self._write() as db:
            if request_id is not None:
                rows = await _fetch(db, f"SELECT {_RUN_COLUMNS} FROM runs WHERE request_id = ?", (request_id,))
                if rows and rows[0]["flow"] != flow:
                    raise MetadataConflict(f"request {request_id!r} already created run "
                                           f"{rows[0]['flow']}/{rows[0]['run_number']} of another flow")
                if rows:
                    return self._run(rows[0])
            rows = await _fetch(db,
                "INSERT INTO flows (name, last_run) VALUES (?, 1) "
                "ON CONFLICT (name) DO UPDATE SET last_run = last_run + 1 RETURNING last_run", (flow,))
            number = int(rows[0][0])
            await db.execute(
                "INSERT INTO runs (flow, run_number, user, status, created_at, tags, system_tags, params, "
                "daemon_id, origin_run_id, request_id) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (flow, number, user, at, json.dumps(user_tags), json.dumps(sys_tags), params_json,
                 daemon_id, origin_run_id, request_id))
            rows = await _fetch(db, f"SELECT {_RUN_COLUMNS} FROM runs WHERE {_RUN_KEY}", (flow, number))
        return self._run(rows[0])

    async def get_run(self, flow: str, run_id: str) -> RunRecord:
        """One run; raises MetadataNotFound."""
        key = _run_key(flow, run_id)
        async with self._read() as db:
            rows = await _fetch(db, f"SELECT {_RUN_COLUMNS} FROM runs WHERE {_RUN_KEY}", key)
        if not rows:
            raise MetadataNotFound(f"no run {flow}/{run_id}")
        return self._run(rows[0])

    async def list_runs(self, *, flow: str | None = None, status: str | None = None,
                        user: str | None = None, tags: Sequence[str] = (),
                        created_after: float | None = None, created_before: float | None = None,
                        limit: int = 50, cursor: str | None = None) -> Page[RunRecord]:
        """Runs newest first, filtered, one page per statement."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise MetadataError(f"bad limit {limit!r}: a positive integer")
        limit = min(limit, MAX_PAGE)
        dead_before = self._dead_before()  # one instant for the filter and the records
        where: list[str] = []
        args: list[Any] = []
        if flow is not None:
            where.append("flow = ?")
            args.append(flow)
        if status is not None:
            if status not in RUN_STATUSES:
                raise MetadataError(f"bad run status {status!r}: one of {', '.join(RUN_STATUSES)}")
            where.append(f"{_SEEN_STATUS} = ?")
            args += [dead_before, status]
        if user is not None:
            where.append("user = ?")
            args.append(user)
        for tag in _check_tags(tags):
            where.append(_HAS_TAG)
            args += [tag, tag]
        if created_after is not None:
            where.append("created_at >= ?")
            args.append(float(created_after))
        if created_before is not None:
            where.append("created_at < ?")
            args.append(float(created_before))
        if cursor is not None:
            where.append("(created_at, run_number, flow) < (?, ?, ?)")
            args += list(decode_cursor(cursor))
        sql = (f"SELECT {_RUN_COLUMNS} FROM runs {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY created_at DESC, run_number DESC, flow DESC LIMIT ?")
        async with self._read() as db:
            rows = await _fetch(db, sql, (*args, limit + 1))  # one extra row: is there a next page?
        items = [self._run(row, dead_before) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(last["created_at"], last["run_number"], last["flow"])
        return Page(items=items, next_cursor=next_cursor)

    async def list_flows(self) -> list[str]:
        """Names of all flows with at least one run, sorted."""
        async with self._read() as db:
            rows = await _fetch(db, "SELECT name FROM flows ORDER BY name")
        return [row[0] for row in rows]

    async def finish_run(self, flow: str, run_id: str, *, status: str, message: str | None = None,
                         now: float | None = None) -> RunRecord:
        """Record a run's end status; repeating the same end is a no-op, a different one a conflict."""
        if status not in FINAL_RUN_STATUSES:
            raise MetadataError(f"bad end status {status!r}: one of {', '.join(FINAL_RUN_STATUSES)}")
        key = _run_key(flow, run_id)
        at = self._now(now)
        async with self._write() as db:
            rows = await _fetch(db, f"SELECT status FROM runs WHERE {_RUN_KEY}", key)
            if not rows:
                raise MetadataNotFound(f"no run {flow}/{run_id}")
            stored = rows[0][0]
            if stored == "running":
                await db.execute(f"UPDATE runs SET status = ?, message = ?, finished_at = ? WHERE {_RUN_KEY}",
                                 (status, message, at, *key))
            elif stored != status:
                raise MetadataConflict(f"run {flow}/{run_id} already ended {stored}; cannot end it {status}")
            rows = await _fetch(db, f"SELECT {_RUN_COLUMNS} FROM runs WHERE {_RUN_KEY}", key)
        return self._run(rows[0])

    async def heartbeat_run(self, flow: str, run_id: str, *, now: float | None = None) -> None:
        """The run's daemon is alive; a no-op once the run has ended."""
        key = _run_key(flow, run_id)
        at = self._now(now)
        async with self._write() as db:
            cur = await db.execute(f"UPDATE runs SET heartbeat_at = ? WHERE {_RUN_KEY} AND status = 'running'",
                                   (at, *key))
            if cur.rowcount == 0:
                await self._require_run(db, flow, run_id)

    async def add_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Add user tags (already present ones are kept once)."""
        return await self._retag(flow, run_id, _check_tags(tags), add=True)

    async def remove_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Remove user tags; system tags are never removed, and naming one is not an error."""
        return await self._retag(flow, run_id, _check_tags(tags), add=False)

    async def _retag(self, flow: str, run_id: str, tags: tuple[str, ...], *, add: bool) -> RunRecord:
        key = _run_key(flow, run_id)
        async with self._write() as db:
            rows = await _fetch(db, f"SELECT tags FROM runs WHERE {_RUN_KEY}", key)
            if not rows:
                raise MetadataNotFound(f"no run {flow}/{run_id}")
            current: list[str] = json.loads(rows[0][0])
            changed = [*current, *tags] if add else [t for t in current if t not in tags]
            await db.execute(f"UPDATE runs SET tags = ? WHERE {_RUN_KEY}",
                             (json.dumps(list(dict.fromkeys(changed))), *key))
            rows = await _fetch(db, f"SELECT {_RUN_COLUMNS} FROM runs WHERE {_RUN_KEY}", key)
        return self._run(rows[0])

    # ----------------------------------------------------------------- tasks
    async def record_task(self, flow: str, run_id: str, step: str, task_id: str, *,
                          foreach_index: Sequence[int] = (), parents: Sequence[str] = (),
                          origin: str | None = None, now: float | None = None) -> None:
        """A task exists (pending). A repeat is a no-op; one with another shape is a conflict."""
        key = _task_key(flow, run_id, step, task_id)
        if isinstance(foreach_index, str | bytes) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in foreach_index):
            raise MetadataError(f"bad foreach_index {foreach_index!r}: non-negative integers")
        if isinstance(parents, str) or not all(isinstance(p, str) and p for p in parents):
            raise MetadataError(f"bad parents {parents!r}: 'step/task_id' strings")
        shape = (json.dumps(list(foreach_index)), json.dumps(list(parents)), origin)
        at = self._now(now)
        async with self._write() as db:
            await self._require_run(db, flow, run_id)
            rows = await _fetch(db, f"SELECT foreach_index, parents, origin FROM tasks WHERE {_TASK_KEY}", key)
            if rows and tuple(rows[0]) != shape:
                raise MetadataConflict(f"task {flow}/{run_id}/{step}/{task_id} was recorded with another "
                                       "foreach_index, parents or origin")
            if not rows:
                await db.execute(
                    "INSERT INTO tasks (flow, run_number, step, task_id, status, foreach_index, parents, origin, "
                    "created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)", (*key, *shape, at))

    async def record_attempt(self, flow: str, run_id: str, step: str, task_id: str,
                             attempt: AttemptRecord) -> None:
        """Create or update an attempt; the task's status follows its latest attempt."""
        key = _task_key(flow, run_id, step, task_id)
        number = _check_attempt(attempt.attempt)
        if attempt.status not in TASK_STATUSES:
            raise MetadataError(f"bad attempt status {attempt.status!r}: one of {', '.join(TASK_STATUSES)}")
        if attempt.exit_code is not None and (isinstance(attempt.exit_code, bool)
                                              or not isinstance(attempt.exit_code, int)):
            raise MetadataError(f"bad exit code {attempt.exit_code!r}: an integer")
        handle = None if attempt.handle is None else _to_json(attempt.handle, "handle")
        async with self._write() as db:
            await self._require_task(db, flow, run_id, step, task_id, key)
            await db.execute(
                "INSERT INTO attempts (flow, run_number, step, task_id, attempt, status, started_at, finished_at, "
                "exit_code, message, handle) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET status = excluded.status, "
                "started_at = COALESCE(excluded.started_at, started_at), "
                "finished_at = COALESCE(excluded.finished_at, finished_at), "
                "exit_code = COALESCE(excluded.exit_code, exit_code), "
                "message = COALESCE(excluded.message, message), handle = COALESCE(excluded.handle, handle)",
                (*key, number, attempt.status, attempt.started_at, attempt.finished_at, attempt.exit_code,
                 attempt.message, handle))
            await db.execute(
                f"UPDATE tasks SET status = (SELECT status FROM attempts WHERE {_TASK_KEY} "
                f"ORDER BY attempt DESC LIMIT 1) WHERE {_TASK_KEY}", (*key, *key))

    async def get_task(self, flow: str, run_id: str, step: str, task_id: str) -> TaskRecord:
        """One task with its attempts; raises MetadataNotFound."""
        key = _task_key(flow, run_id, step, task_id)
        async with self._read(snapshot=True) as db:
            tasks = await _fetch(db, f"SELECT {_TASK_COLUMNS} FROM tasks WHERE {_TASK_KEY}", key)
            if not tasks:
                raise MetadataNotFound(f"no task {flow}/{run_id}/{step}/{task_id}")
            attempts = await _fetch(db,
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE {_TASK_KEY} ORDER BY attempt", key)
        return _task(flow, run_id, tasks[0], [_attempt(a) for a in attempts])

    async def list_tasks(self, flow: str, run_id: str, *, step: str | None = None) -> list[TaskRecord]:
        """Every task of a run (of one step), oldest first (then by step and id), with attempts: two statements."""
        key = _run_key(flow, run_id)
        on_step, step_args = (" AND t.step = ?", (step,)) if step is not None else ("", ())
        async with self._read(snapshot=True) as db:
            # LEFT JOIN from the run: no row at all means no run, a NULL task means no tasks.
            tasks = await _fetch(db,
                "SELECT " + ", ".join(f"t.{c.strip()}" for c in _TASK_COLUMNS.split(",")) + " FROM runs r "
                "LEFT JOIN tasks t ON t.flow = r.flow AND t.run_number = r.run_number" + on_step +
                " WHERE r.flow = ? AND r.run_number = ? ORDER BY t.created_at, t.step, t.task_id", (*step_args, *key))
            if not tasks:
                raise MetadataNotFound(f"no run {flow}/{run_id}")
            attempts = await _fetch(db,
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE {_RUN_KEY}"
                + (" AND step = ?" if step is not None else "") + " ORDER BY step, task_id, attempt",
                (*key, *step_args))
        by_task: dict[tuple[str, str], list[AttemptRecord]] = {}
        for row in attempts:
            by_task.setdefault((row["step"], row["task_id"]), []).append(_attempt(row))
        return [_task(flow, run_id, row, by_task.get((row["step"], row["task_id"]), []))
                for row in tasks if row["step"] is not None]

    # ----------------------------------------------------------------- artifacts and metadata
    async def record_artifacts(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                               artifacts: Sequence[ArtifactRecord]) -> None:
        """The artifact index of an attempt. A repeat is a no-op; another sha for a name is a conflict."""
        key = _task_key(flow, run_id, step, task_id)
        number = _check_attempt(attempt)
        if len({a.name for a in artifacts}) != len(artifacts):
            raise MetadataError("artifact names must be unique within an attempt")
        rows = []
        for a in artifacts:
            if not (isinstance(a.name, str) and a.name and isinstance(a.sha, str) and a.sha
                    and isinstance(a.size, int) and not isinstance(a.size, bool) and a.size >= 0
                    and isinstance(a.type_name, str)):
                raise MetadataError(f"bad artifact record {a!r}")
            rows.append((*key, number, a.name, a.sha, a.size, a.type_name))
        async with self._write() as db:
            await self._require_task(db, flow, run_id, step, task_id, key)
            stored = {r[0]: tuple(r)[1:] for r in await _fetch(
                db, f"SELECT name, sha, size, type_name FROM artifacts WHERE {_TASK_KEY} AND attempt = ?",
                (*key, number))}
            clashes = sorted(r[5] for r in rows if r[5] in stored and stored[r[5]] != r[6:])
            if clashes:
                raise MetadataConflict(f"attempt {attempt} of {flow}/{run_id}/{step}/{task_id} already recorded "
                                       f"other values for {', '.join(clashes)}")
            await db.executemany(
                "INSERT INTO artifacts (flow, run_number, step, task_id, attempt, name, sha, size, type_name) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)

    async def get_artifacts(self, flow: str, run_id: str, step: str, task_id: str,
                            attempt: int | None = None) -> list[ArtifactRecord]:
        """The artifacts of an attempt (default: the latest ok one, else the latest one), by name."""
        key = _task_key(flow, run_id, step, task_id)
        if attempt is None:
            which = (f"COALESCE((SELECT MAX(attempt) FROM attempts WHERE {_TASK_KEY} AND status = 'ok'), "
                     f"(SELECT MAX(attempt) FROM (SELECT attempt FROM attempts WHERE {_TASK_KEY} "
                     f"UNION ALL SELECT attempt FROM artifacts WHERE {_TASK_KEY})))")
            which_args: tuple[Any, ...] = (*key, *key, *key)
        else:
            which, which_args = "?", (_check_attempt(attempt),)
        async with self._read(snapshot=True) as db:
            await self._require_task(db, flow, run_id, step, task_id, key)
            rows = await _fetch(db,
                f"SELECT name, sha, size, type_name FROM artifacts WHERE {_TASK_KEY} AND attempt = {which} "
                "ORDER BY name", (*key, *which_args))
        return [ArtifactRecord(name=r[0], sha=r[1], size=r[2], type_name=r[3]) for r in rows]

    async def set_metadata(self, flow: str, run_id: str, step: str, task_id: str,
                           fields: Mapping[str, str]) -> None:
        """Free-form string fields of a task, merged with what is there."""
        key = _task_key(flow, run_id, step, task_id)
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in fields.items()):
            raise MetadataError("bad metadata: non-empty string names with string values")
        async with self._write() as db:
            await self._require_task(db, flow, run_id, step, task_id, key)
            await db.executemany(
                "INSERT INTO task_metadata (flow, run_number, step, task_id, field, value) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET value = excluded.value",
                [(*key, k, v) for k, v in fields.items()])

    async def get_metadata(self, flow: str, run_id: str, step: str, task_id: str) -> dict[str, str]:
        """The free-form fields of a task."""
        key = _task_key(flow, run_id, step, task_id)
        async with self._read(snapshot=True) as db:
            await self._require_task(db, flow, run_id, step, task_id, key)
            rows = await _fetch(db,
                f"SELECT field, value FROM task_metadata WHERE {_TASK_KEY} ORDER BY field", key)
        return {r[0]: r[1] for r in rows}

    # ----------------------------------------------------------------- plumbing
    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def _dead_before(self) -> float:
        return self._clock() - self.dead_after_s

    def _run(self, row: sqlite3.Row, dead_before: float | None = None) -> RunRecord:
        status, message = row["status"], row["message"]
        alive_at = row["heartbeat_at"] if row["heartbeat_at"] is not None else row["created_at"]
        if dead_before is None:
            dead_before = self._dead_before()
        if status == "running" and alive_at < dead_before:
            status, message = "failed", DEAD_RUN_MESSAGE
        return RunRecord(
            flow=row["flow"], run_id=str(row["run_number"]), user=row["user"], status=status,
            created_at=row["created_at"], finished_at=row["finished_at"], heartbeat_at=row["heartbeat_at"],
            message=message, tags=tuple(json.loads(row["tags"])), system_tags=tuple(json.loads(row["system_tags"])),
            params=json.loads(row["params"]), daemon_id=row["daemon_id"], origin_run_id=row["origin_run_id"])

    async def _require_run(self, db: aiosqlite.Connection, flow: str, run_id: str) -> None:
        if not await _fetch(db, f"SELECT 1 FROM runs WHERE {_RUN_KEY}", _run_key(flow, run_id)):
            raise MetadataNotFound(f"no run {flow}/{run_id}")

    async def _require_task(self, db: aiosqlite.Connection, flow: str, run_id: str, step: str, task_id: str,
                            key: tuple[Any, ...]) -> None:
        if not await _fetch(db, f"SELECT 1 FROM tasks WHERE {_TASK_KEY}", key):
            raise MetadataNotFound(f"no task {flow}/{run_id}/{step}/{task_id}")

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise MetadataError(f"{self.path}: the metadata store is not open")
        return self._db

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """An immediate transaction: the file's write lock is held from the first statement."""
        async with self._lock:
            db = self._connection()
            with _translate():
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    if db.in_transaction:  # SQLite may already have rolled back (disk full, ...)
                        await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def _read(self, *, snapshot: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """Reads; ``snapshot`` wraps several statements in one read transaction."""
        async with self._lock:
            db = self._connection()
            with _translate():
                if not snapshot:
                    yield db
                    return
                await db.execute("BEGIN")
                try:
                    yield db
                finally:
                    await db.execute("COMMIT")


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Bring the schema to ``len(MIGRATIONS)`` inside one immediate transaction."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version "
                         "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        (current,) = (await _fetch(db, "SELECT COALESCE(MAX(version), 0) FROM schema_version"))[0]
        if current > len(MIGRATIONS):
            raise MetadataError(
                f"{path}: the metadata schema is version {current}, newer than this millstream "
                f"understands (up to {len(MIGRATIONS)}); upgrade millstream or use another database file")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            # Statement by statement: executescript() would COMMIT the open transaction first.
            for statement in _statements(MIGRATIONS[version - 1]):
                await db.execute(statement)
            await db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                             (version, time.time()))
    except BaseException:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into complete SQL statements."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()):
        raise MetadataError(f"incomplete statement at the end of a migration: {buffer.strip()[:80]!r}")


async def _fetch(db: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
    return list(await db.execute_fetchall(sql, args))


@contextlib.contextmanager
def _translate() -> Iterator[None]:
    """SQLite's exceptions become MetadataError, here and only here."""
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        # SQLITE_BUSY / SQLITE_LOCKED: another process held the file past busy_timeout.
        raise MetadataError(f"sqlite: {exc}", retryable=code in (5, 6)) from exc


def _check_name(kind: str, value: object) -> None:
    if not isinstance(value, str) or not value or "/" in value or value != value.strip():
        raise MetadataError(f"bad {kind} {value!r}: a non-empty name without '/' or surrounding spaces")


def _check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
        raise MetadataError(f"bad tags {tags!r}: a list of non-empty strings")
    return tuple(dict.fromkeys(tags))


def _check_attempt(attempt: object) -> int:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise MetadataError(f"bad attempt number {attempt!r}: a non-negative integer")
    return attempt


def _run_key(flow: str, run_id: str) -> tuple[str, int]:
    _check_name("flow", flow)
    # Only the canonical spelling names a run: "7", not "07" or "+7".
    if not isinstance(run_id, str) or not (run_id.isascii() and run_id.isdigit()) or str(int(run_id)) != run_id:
        raise MetadataNotFound(f"no run {flow}/{run_id}")
    return flow, int(run_id)


def _task_key(flow: str, run_id: str, step: str, task_id: str) -> tuple[str, int, str, str]:
    _check_name("step", step)
    _check_name("task id", task_id)
    return (*_run_key(flow, run_id), step, task_id)


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"bad {what}: not JSON ({exc})") from exc


def _attempt(row: sqlite3.Row) -> AttemptRecord:
    return AttemptRecord(
        attempt=row["attempt"], status=row["status"], started_at=row["started_at"],
        finished_at=row["finished_at"], exit_code=row["exit_code"], message=row["message"],
        handle=None if row["handle"] is None else json.loads(row["handle"]))


def _task(flow: str, run_id: str, row: sqlite3.Row, attempts: list[AttemptRecord]) -> TaskRecord:
    return TaskRecord(
        flow=flow, run_id=run_id, step=row["step"], task_id=row["task_id"], status=row["status"],
        foreach_index=tuple(json.loads(row["foreach_index"])), parents=tuple(json.loads(row["parents"])),
        attempts=tuple(attempts), origin=row["origin"], created_at=row["created_at"])
