"""The metadata store on PostgreSQL (asyncpg): what the service's handlers call.

:class:`PostgresMetadataStore` implements :class:`millstream.metadata.store.MetadataStore`
and is the only module of the service that speaks SQL. Every database failure is
translated here, in :meth:`PostgresMetadataStore._connection`, into the project's errors:

* lost or refused connections, a server shutting down or starting up, pool or statement
  timeouts, too many connections -> ``MetadataError(retryable=True)`` (HTTP 503);
* values PostgreSQL refuses (a NUL in a string, a number out of range) ->
  ``MetadataError(retryable=False)`` (HTTP 400);
* missing rows -> ``MetadataNotFound``; contradictions -> ``MetadataConflict``.

Run ids are the decimal run number, allocated per flow by a counter row in ``flows``
bumped with ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` in the same statement
that inserts the run: concurrent creators serialise on that row, a failed insert rolls
the bump back, so numbers are monotonic and without gaps. ``request_id`` is unique
across the database: a replay returns the run it created; a replay naming another flow
is a conflict.

Dead runs are computed in the queries, never written: a run stored ``running`` whose
``coalesce(heartbeat_at, created_at)`` is older than ``dead_after_s`` (on the service's
clock) reads as ``failed`` with :data:`DEAD_RUN_MESSAGE`, in ``get_run``, ``list_runs``
and its status filter alike. Nothing is lost by that: a daemon that comes back and
heartbeats the run makes it read ``running`` again, and it can still finish it.

The rest follows the SQLite store, so the two pass one contract suite: tags are kept
once each in first-seen order; recording a task or artifact again is a no-op, and a
conflict if it contradicts what is stored; updating an attempt keeps the fields the
update leaves ``None``, and a task's status is that of its highest-numbered attempt;
``created_after`` is inclusive, ``created_before`` exclusive; a ``limit`` above
:data:`MAX_PAGE` is served as :data:`MAX_PAGE`.

Round trips: one per call, except ``create_run`` on a replay (two) and
``record_attempt`` (a transaction that locks the task row). Listing a page of runs,
tags included, is one query; ``list_tasks`` with attempts is one query (attempts are
aggregated per task with ``jsonb_agg``). Returning a connection to the pool costs no
extra statement (see :func:`_keep_session`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import asyncpg

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
from millstream.metadata.service.schema import migrate

MAX_PAGE = 1000
FINAL_RUN_STATUSES = tuple(s for s in RUN_STATUSES if s != "running")
_MAX_RUN_NUMBER = (1 << 63) - 1

# Failures that say "the database cannot answer right now", not "the request is wrong".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,                 # lost, refused or rejected connections
    asyncpg.exceptions.OperatorInterventionError,    # shutdown, starting up, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,   # too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,     # serialization failure, deadlock
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a primary demoted during a failover
    asyncpg.InterfaceError,                          # the connection closed under us
    asyncpg.exceptions.InternalClientError,          # ... in the middle of a protocol exchange
    OSError,                                         # connect refused, reset, unreachable
    TimeoutError,                                    # connect, acquire or command timeout
)
# Values the database refuses: the request is at fault.
REJECTED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.exceptions.ProgramLimitExceededError,
)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# $1 is always the dead-run cutoff (now - dead_after_s) in queries returning runs.
_DEAD = "(status = 'running' AND coalesce(heartbeat_at, created_at) < $1)"
_RUN_COLUMNS = f"""flow, run_number, user_name, created_at, finished_at, heartbeat_at, tags, system_tags,
    params, daemon_id, origin_run_id,
    CASE WHEN {_DEAD} THEN 'failed' ELSE status END AS status,
    CASE WHEN {_DEAD} THEN {_sql_literal(DEAD_RUN_MESSAGE)} ELSE message END AS message"""
_TASK_KEY = "flow = $1 AND run_number = $2 AND step = $3 AND task_id = $4"
_ATTEMPTS_JSON = """coalesce((SELECT jsonb_agg(jsonb_build_object(
        'attempt', a.attempt, 'status', a.status, 'started_at', a.started_at, 'finished_at', a.finished_at,
        'exit_code', a.exit_code, 'message', a.message, 'handle', a.handle) ORDER BY a.attempt)
    FROM attempts a
    WHERE a.flow = t.flow AND a.run_number = t.run_number AND a.step = t.step AND a.task_id = t.task_id),
    '[]'::jsonb) AS attempts"""
_TASK_COLUMNS = f"t.step, t.task_id, t.status, t.foreach_index, t.parents, t.origin, t.created_at, {_ATTEMPTS_JSON}"


def run_number(run_id: str) -> int | None:
    """The run number a run id names, or None if no allocated id looks like it."""
    if not (run_id.isascii() and run_id.isdigit()) or str(int(run_id)) != run_id:
        return None
    number = int(run_id)
    return number if 0 < number <= _MAX_RUN_NUMBER else None


async def _keep_session(con: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset statement (RESET ALL, UNLISTEN, ...): one round trip
    saved per request. Nothing here sets session state: no SET, LISTEN, cursors or session
    advisory locks (migrations hold a transaction-level one); asyncpg still rolls back an open
    transaction."""


def _unique(values: Sequence[str]) -> list[str]:
    """Without repeats, in first-seen order (the order tags are reported in)."""
    return list(dict.fromkeys(values))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _run(row: asyncpg.Record) -> RunRecord:
    return RunRecord(flow=row["flow"], run_id=str(row["run_number"]), user=row["user_name"], status=row["status"],
                     created_at=row["created_at"], finished_at=row["finished_at"],
                     heartbeat_at=row["heartbeat_at"], message=row["message"], tags=tuple(row["tags"]),
                     system_tags=tuple(row["system_tags"]), params=row["params"], daemon_id=row["daemon_id"],
                     origin_run_id=row["origin_run_id"])


def _attempt(data: dict[str, Any]) -> AttemptRecord:
    # jsonb turns 5.0 into 5: give the times back as floats.
    return AttemptRecord(attempt=data["attempt"], status=data["status"], started_at=_float(data["started_at"]),
                         finished_at=_float(data["finished_at"]), exit_code=data["exit_code"],
                         message=data["message"], handle=data["handle"])


def _task(flow: str, run_id: str, row: asyncpg.Record) -> TaskRecord:
    return TaskRecord(flow=flow, run_id=run_id, step=row["step"], task_id=row["task_id"], status=row["status"],
                      foreach_index=tuple(row["foreach_index"]), parents=tuple(row["parents"]),
                      attempts=tuple(_attempt(a) for a in row["attempts"]), origin=row["origin"],
                      created_at=row["created_at"])


def _not_found_run(flow: str, run_id: str) -> MetadataNotFound:
    return MetadataNotFound(f"no run {flow}/{run_id}")


def _not_found_task(flow: str, run_id: str, step: str, task_id: str) -> MetadataNotFound:
    return MetadataNotFound(f"no task {flow}/{run_id}/{step}/{task_id}")


class PostgresMetadataStore:
    """MetadataStore on PostgreSQL through one asyncpg pool."""

    def __init__(self, dsn: str, *, dead_after_s: float = 120.0, pool_min_size: int = 1, pool_max_size: int = 10,
                 connect_timeout_s: float = 5.0, command_timeout_s: float = 10.0, acquire_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.time,
                 query_logger: Callable[[asyncpg.connection.LoggedQuery], None] | None = None) -> None:
        self.dsn = dsn
        self.dead_after_s = dead_after_s
        self.applied_migrations: list[int] = []
        self._pool_min_size = pool_min_size
        self._pool_max_size = pool_max_size
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._acquire_timeout_s = acquire_timeout_s
        self._clock = clock
        self._query_logger = query_logger  # for tests that count round trips
        self._pool: asyncpg.Pool | None = None

    # ----------------------------------------------------------------- lifecycle
    async def _init_connection(self, con: asyncpg.Connection) -> None:
        await con.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        if self._query_logger is not None:
            con.add_query_logger(self._query_logger)

    async def open(self) -> None:
        """Create the pool and migrate the schema; raises MetadataError(retryable=True) if unreachable."""
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=self._pool_min_size, max_size=self._pool_max_size,
                timeout=self._connect_timeout_s, command_timeout=self._command_timeout_s,
                max_inactive_connection_lifetime=300.0, init=self._init_connection, reset=_keep_session,
                server_settings={"application_name": "millstream-metadata"})
        except UNAVAILABLE_ERRORS as exc:
            raise MetadataError(f"cannot reach the metadata database: {type(exc).__name__}: {exc}",
                                retryable=True) from exc
        try:
            async with pool.acquire(timeout=self._acquire_timeout_s) as con:
                self.applied_migrations = await migrate(con)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, UNAVAILABLE_ERRORS):
                raise MetadataError(f"cannot migrate the metadata database: {type(exc).__name__}: {exc}",
                                    retryable=True) from exc
            raise
        self._pool = pool

    async def close(self) -> None:
        """Close the pool (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self) -> int:
        """The schema version, read from the database: proof that it answers."""
        async with self._connection() as con:
            return int(await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; the one place database failures become MetadataErrors."""
        if self._pool is None:
            raise MetadataError("the metadata store is not open", retryable=True)
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as con:
                try:
                    yield con
                except UNAVAILABLE_ERRORS:
                    con.terminate()  # never hand a connection in doubt to the next request
                    raise
        except UNAVAILABLE_ERRORS as exc:
            raise MetadataError(f"the metadata database is unavailable: {type(exc).__name__}: {exc}",
                                retryable=True) from exc
        except REJECTED_ERRORS as exc:
            raise MetadataError(f"the database refused a value: {exc}") from exc

    def _cutoff(self) -> float:
        return self._clock() - self.dead_after_s

    # ----------------------------------------------------------------- runs
    async def create_run(self, flow: str, *, user: str, params: Mapping[str, Any] | None = None,
                         tags: Sequence[str] = (), system_tags: Sequence[str] = (),
                         daemon_id: str | None = None, origin_run_id: str | None = None,
                         request_id: str | None = None, now: float | None = None) -> RunRecord:
        """Allocate the flow's next run number and record the run as running."""
        run, _ = await self.create_run_once(flow, user=user, params=params, tags=tags, system_tags=system_tags,
                                            daemon_id=daemon_id, origin_run_id=origin_run_id,
                                            request_id=request_id, now=now)
        return run

    async def create_run_once(self, flow: str, *, user: str, params: Mapping[str, Any] | None = None,
                              tags: Sequence[str] = (), system_tags: Sequence[str] = (),
                              daemon_id: str | None = None, origin_run_id: str | None = None,
                              request_id: str | None = None, now: float | None = None) -> tuple[RunRecord, bool]:
        """:meth:`create_run`, also telling whether this call created the run (False: a replay)."""
        created_at = self._clock() if now is None else now
        sql = f"""
            WITH n AS (
                INSERT INTO flows AS f (name, last_run_number) VALUES ($2, 1)
                ON CONFLICT (name) DO UPDATE SET last_run_number = f.last_run_number + 1
                RETURNING last_run_number)
            INSERT INTO runs (flow, run_number, user_name, status, created_at, tags, system_tags, params,
                              daemon_id, origin_run_id, request_id)
            SELECT $2, n.last_run_number, $3, 'running', $4, $5, $6, $7, $8, $9, $10 FROM n
            RETURNING {_RUN_COLUMNS}"""
        async with self._connection() as con:
            try:
                row = await con.fetchrow(sql, self._cutoff(), flow, user, created_at, _unique(tags),
                                         _unique(system_tags), dict(params or {}), daemon_id, origin_run_id,
                                         request_id)
                return _run(row), True
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != "runs_request_id_key":
                    raise
            row = await con.fetchrow(f"SELECT {_RUN_COLUMNS} FROM runs WHERE request_id = $2",
                                     self._cutoff(), request_id)
        if row is None:  # the run that held the request id was deleted between the two statements
            raise MetadataConflict(f"request {request_id!r} collided with a run that no longer exists; retry")
        if row["flow"] != flow:
            raise MetadataConflict(f"request {request_id!r} already created run {row['flow']}/{row['run_number']}"
                                   f" of another flow")
        return _run(row), False

    async def get_run(self, flow: str, run_id: str) -> RunRecord:
        """One run; raises MetadataNotFound."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_run(flow, run_id)
        async with self._connection() as con:
            row = await con.fetchrow(f"SELECT {_RUN_COLUMNS} FROM runs WHERE flow = $2 AND run_number = $3",
                                     self._cutoff(), flow, number)
        if row is None:
            raise _not_found_run(flow, run_id)
        return _run(row)

    async def list_runs(self, *, flow: str | None = None, status: str | None = None,
                        user: str | None = None, tags: Sequence[str] = (),
                        created_after: float | None = None, created_before: float | None = None,
                        limit: int = 50, cursor: str | None = None) -> Page[RunRecord]:
        """Runs newest first, filtered; one query per page."""
        if limit < 1:
            raise MetadataError(f"limit must be a positive integer, not {limit}")
        limit = min(limit, MAX_PAGE)
        if status is not None and status not in RUN_STATUSES:
            raise MetadataError(f"status must be one of {', '.join(RUN_STATUSES)}, not {status!r}")
        args: list[Any] = [self._cutoff()]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        where = []
        if flow is not None:
            where.append(f"flow = {arg(flow)}")
        if status == "running":
            where.append(f"status = 'running' AND NOT {_DEAD}")
        elif status == "failed":
            where.append(f"(status = 'failed' OR {_DEAD})")
        elif status is not None:
            where.append(f"status = {arg(status)}")
        if user is not None:
            where.append(f"user_name = {arg(user)}")
        if tags:
            where.append(f"(tags || system_tags) @> {arg(_unique(tags))}::text[]")
        if created_after is not None:
            where.append(f"created_at >= {arg(created_after)}")
        if created_before is not None:
            where.append(f"created_at < {arg(created_before)}")
        if cursor is not None:
            c_created, c_number, c_flow = decode_cursor(cursor)
            where.append(f"(created_at, run_number, flow) < ({arg(c_created)}, {arg(c_number)}, {arg(c_flow)})")
        sql = (f"SELECT {_RUN_COLUMNS} FROM runs {'WHERE ' + ' AND '.join(where) if where else ''}"
               f" ORDER BY created_at DESC, run_number DESC, flow DESC LIMIT {arg(limit + 1)}")
        async with self._connection() as con:
            rows = await con.fetch(sql, *args)
        items = [_run(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = encode_cursor(last["created_at"], last["run_number"], last["flow"])
        return Page(items, next_cursor)

    async def list_flows(self) -> list[str]:
        """Names of all flows with at least one run, sorted."""
        async with self._connection() as con:
            rows = await con.fetch("SELECT name FROM flows ORDER BY name")
        return [r["name"] for r in rows]

    async def finish_run(self, flow: str, run_id: str, *, status: str, message: str | None = None,
                         now: float | None = None) -> RunRecord:
        """Record a run's end; finishing it again the same way is a no-op, another way a conflict."""
        if status not in FINAL_RUN_STATUSES:
            raise MetadataError(f"a run finishes as one of {', '.join(FINAL_RUN_STATUSES)}, not {status!r}")
        number = run_number(run_id)
        if number is None:
            raise _not_found_run(flow, run_id)
        finished_at = self._clock() if now is None else now
        sql = f"""
            WITH u AS (
                UPDATE runs SET status = $4, message = $5, finished_at = $6
                WHERE flow = $2 AND run_number = $3 AND status = 'running'
                RETURNING {_RUN_COLUMNS})
            SELECT true AS updated, * FROM u
            UNION ALL
            SELECT false AS updated, {_RUN_COLUMNS} FROM runs
            WHERE flow = $2 AND run_number = $3 AND NOT EXISTS (SELECT 1 FROM u)"""
        async with self._connection() as con:
            row = await con.fetchrow(sql, self._cutoff(), flow, number, status, message, finished_at)
            if row is not None and not row["updated"] and row["status"] == "running":
                # A concurrent finish committed after this statement's snapshot: read it again.
                row = await con.fetchrow(sql, self._cutoff(), flow, number, status, message, finished_at)
        if row is None:
            raise _not_found_run(flow, run_id)
        run = _run(row)
        if not row["updated"] and run.status != status:
            raise MetadataConflict(f"run {flow}/{run_id} has already ended as {run.status}")
        return run

    async def heartbeat_run(self, flow: str, run_id: str, *, now: float | None = None) -> None:
        """The run's daemon is alive; a finished run ignores it."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_run(flow, run_id)
        beat = self._clock() if now is None else now
        async with self._connection() as con:
            exists = await con.fetchval(
                """WITH u AS (
                       UPDATE runs SET heartbeat_at = $3
                       WHERE flow = $1 AND run_number = $2 AND status = 'running' RETURNING 1)
                   SELECT EXISTS (SELECT 1 FROM runs WHERE flow = $1 AND run_number = $2)""",
                flow, number, beat)
        if not exists:
            raise _not_found_run(flow, run_id)

    async def _retag(self, flow: str, run_id: str, new_tags_sql: str, tags: Sequence[str]) -> RunRecord:
        number = run_number(run_id)
        if number is None:
            raise _not_found_run(flow, run_id)
        async with self._connection() as con:
            row = await con.fetchrow(
                f"UPDATE runs SET tags = {new_tags_sql} WHERE flow = $2 AND run_number = $3 RETURNING {_RUN_COLUMNS}",
                self._cutoff(), flow, number, _unique(tags))
        if row is None:
            raise _not_found_run(flow, run_id)
        return _run(row)

    async def add_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Add user tags."""
        return await self._retag(
            flow, run_id,
            "ARRAY(SELECT t FROM unnest(tags || $4::text[]) WITH ORDINALITY AS u (t, i) GROUP BY t ORDER BY min(i))",
            tags)

    async def remove_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Remove user tags; system tags are a separate column and stay."""
        return await self._retag(
            flow, run_id,
            "ARRAY(SELECT t FROM unnest(tags) WITH ORDINALITY AS u (t, i) WHERE t <> ALL ($4::text[]) ORDER BY i)",
            tags)

    # ----------------------------------------------------------------- tasks
    async def record_task(self, flow: str, run_id: str, step: str, task_id: str, *,
                          foreach_index: Sequence[int] = (), parents: Sequence[str] = (),
                          origin: str | None = None, now: float | None = None) -> None:
        """A task exists (pending); recording it again with the same shape is a no-op."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_run(flow, run_id)
        created_at = self._clock() if now is None else now
        async with self._connection() as con:
            try:
                row = await con.fetchrow(
                    """WITH ins AS (
                            INSERT INTO tasks (flow, run_number, step, task_id, foreach_index, parents, origin,
                                               created_at)
                            VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING 1)
                        SELECT (SELECT count(*) FROM ins) AS inserted, t.foreach_index, t.parents, t.origin
                        FROM (VALUES (1)) AS one (x) LEFT JOIN tasks t
                            ON t.flow = $1 AND t.run_number = $2 AND t.step = $3 AND t.task_id = $4""",
                    flow, number, step, task_id, list(foreach_index), list(parents), origin, created_at)
            except asyncpg.ForeignKeyViolationError:
                raise _not_found_run(flow, run_id) from None
        if row["inserted"] or row["foreach_index"] is None:  # new, or created concurrently by a twin call
            return
        if (tuple(row["foreach_index"]), tuple(row["parents"]), row["origin"]) != (
                tuple(foreach_index), tuple(parents), origin):
            raise MetadataConflict(f"task {flow}/{run_id}/{step}/{task_id} was recorded with other "
                                   f"foreach_index, parents or origin")

    async def record_attempt(self, flow: str, run_id: str, step: str, task_id: str,
                             attempt: AttemptRecord) -> None:
        """Create or update an attempt (fields left None keep their value); the task's status follows
        its highest-numbered attempt."""
        if attempt.status not in TASK_STATUSES:
            raise MetadataError(f"an attempt's status is one of {', '.join(TASK_STATUSES)}, not {attempt.status!r}")
        number = run_number(run_id)
        if number is None:
            raise _not_found_task(flow, run_id, step, task_id)
        key = (flow, number, step, task_id)
        async with self._connection() as con, con.transaction():
            row = await con.fetchrow(
                f"""SELECT (SELECT max(attempt) FROM attempts WHERE {_TASK_KEY}) AS latest
                    FROM tasks WHERE {_TASK_KEY} FOR UPDATE""", *key)
            if row is None:
                raise _not_found_task(flow, run_id, step, task_id)
            await con.execute(
                """INSERT INTO attempts (flow, run_number, step, task_id, attempt, status, started_at,
                                         finished_at, exit_code, message, handle)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                   ON CONFLICT (flow, run_number, step, task_id, attempt) DO UPDATE SET
                       status = EXCLUDED.status,
                       started_at = coalesce(EXCLUDED.started_at, attempts.started_at),
                       finished_at = coalesce(EXCLUDED.finished_at, attempts.finished_at),
                       exit_code = coalesce(EXCLUDED.exit_code, attempts.exit_code),
                       message = coalesce(EXCLUDED.message, attempts.message),
                       handle = coalesce(EXCLUDED.handle, attempts.handle)""",
                *key, attempt.attempt, attempt.status, attempt.started_at, attempt.finished_at, attempt.exit_code,
                attempt.message, attempt.handle)
            if row["latest"] is None or attempt.attempt >= row["latest"]:
                await con.execute(f"UPDATE tasks SET status = $5 WHERE {_TASK_KEY}", *key, attempt.status)

    async def get_task(self, flow: str, run_id: str, step: str, task_id: str) -> TaskRecord:
        """One task with its attempts; raises MetadataNotFound."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_task(flow, run_id, step, task_id)
        async with self._connection() as con:
            row = await con.fetchrow(
                f"""SELECT {_TASK_COLUMNS} FROM tasks t
                    WHERE t.flow = $1 AND t.run_number = $2 AND t.step = $3 AND t.task_id = $4""",
                flow, number, step, task_id)
        if row is None:
            raise _not_found_task(flow, run_id, step, task_id)
        return _task(flow, run_id, row)

    async def list_tasks(self, flow: str, run_id: str, *, step: str | None = None) -> list[TaskRecord]:
        """Every task of a run (of one step), with attempts, in one query."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_run(flow, run_id)
        async with self._connection() as con:
            rows = await con.fetch(
                f"""SELECT r.run_number AS found, {_TASK_COLUMNS}
                    FROM runs r LEFT JOIN tasks t ON t.flow = r.flow AND t.run_number = r.run_number
                                                  AND ($3::text IS NULL OR t.step = $3)
                    WHERE r.flow = $1 AND r.run_number = $2
                    ORDER BY t.created_at, t.step, t.task_id""",
                flow, number, step)
        if not rows:
            raise _not_found_run(flow, run_id)
        return [_task(flow, run_id, r) for r in rows if r["task_id"] is not None]

    # ----------------------------------------------------------------- artifacts and metadata
    async def record_artifacts(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                               artifacts: Sequence[ArtifactRecord]) -> None:
        """The artifact index of an attempt, in one statement: all of it, or nothing on a conflict."""
        names = [a.name for a in artifacts]
        if len(set(names)) != len(names):
            raise MetadataError("artifact names must be unique within an attempt")
        number = run_number(run_id)
        if number is None:
            raise _not_found_task(flow, run_id, step, task_id)
        async with self._connection() as con:
            try:
                row = await con.fetchrow(
                    f"""WITH input AS (
                            SELECT * FROM unnest($6::text[], $7::text[], $8::bigint[], $9::text[])
                                AS i (name, sha, size, type_name)),
                        clash AS (
                            SELECT i.name FROM input i JOIN artifacts a
                                ON a.flow = $1 AND a.run_number = $2 AND a.step = $3 AND a.task_id = $4
                               AND a.attempt = $5 AND a.name = i.name
                            WHERE (a.sha, a.size, a.type_name) IS DISTINCT FROM (i.sha, i.size, i.type_name)),
                        ins AS (
                            INSERT INTO artifacts (flow, run_number, step, task_id, attempt, name, sha, size,
                                                   type_name)
                            SELECT $1, $2, $3, $4, $5, i.name, i.sha, i.size, i.type_name FROM input i
                            WHERE NOT EXISTS (SELECT 1 FROM clash)
                            ON CONFLICT DO NOTHING RETURNING 1)
                        SELECT EXISTS (SELECT 1 FROM tasks WHERE {_TASK_KEY}) AS found,
                               (SELECT array_agg(name ORDER BY name) FROM clash) AS clashes,
                               (SELECT count(*) FROM ins) AS inserted""",
                    flow, number, step, task_id, attempt, names, [a.sha for a in artifacts],
                    [a.size for a in artifacts], [a.type_name for a in artifacts])
            except asyncpg.ForeignKeyViolationError:
                raise _not_found_task(flow, run_id, step, task_id) from None
        if not row["found"]:
            raise _not_found_task(flow, run_id, step, task_id)
        if row["clashes"]:
            raise MetadataConflict(f"attempt {attempt} of {flow}/{run_id}/{step}/{task_id} already recorded "
                                   f"other values for {', '.join(row['clashes'])}")

    async def get_artifacts(self, flow: str, run_id: str, step: str, task_id: str,
                            attempt: int | None = None) -> list[ArtifactRecord]:
        """The artifacts of an attempt (default: the latest ok one, else the latest one), by name."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_task(flow, run_id, step, task_id)
        async with self._connection() as con:
            rows = await con.fetch(
                f"""WITH chosen AS (
                        SELECT coalesce($5::integer,
                            (SELECT max(attempt) FROM attempts WHERE {_TASK_KEY} AND status = 'ok'),
                            (SELECT max(attempt) FROM (SELECT attempt FROM attempts WHERE {_TASK_KEY}
                                                       UNION ALL
                                                       SELECT attempt FROM artifacts WHERE {_TASK_KEY}) AS known)
                        ) AS attempt)
                    SELECT a.name, a.sha, a.size, a.type_name
                    FROM tasks t CROSS JOIN chosen c
                    LEFT JOIN artifacts a ON a.flow = t.flow AND a.run_number = t.run_number AND a.step = t.step
                                         AND a.task_id = t.task_id AND a.attempt = c.attempt
                    WHERE t.flow = $1 AND t.run_number = $2 AND t.step = $3 AND t.task_id = $4
                    ORDER BY a.name""",
                flow, number, step, task_id, attempt)
        if not rows:
            raise _not_found_task(flow, run_id, step, task_id)
        return [ArtifactRecord(r["name"], r["sha"], r["size"], r["type_name"]) for r in rows if r["name"] is not None]

    async def set_metadata(self, flow: str, run_id: str, step: str, task_id: str,
                           fields: Mapping[str, str]) -> None:
        """Merge free-form string fields into a task's."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_task(flow, run_id, step, task_id)
        async with self._connection() as con:
            try:
                found = await con.fetchval(
                    f"""WITH ins AS (
                            INSERT INTO task_metadata (flow, run_number, step, task_id, field, value)
                            SELECT $1, $2, $3, $4, m.field, m.value
                            FROM unnest($5::text[], $6::text[]) AS m (field, value)
                            ON CONFLICT (flow, run_number, step, task_id, field) DO UPDATE SET value = EXCLUDED.value
                            RETURNING 1)
                        SELECT EXISTS (SELECT 1 FROM tasks WHERE {_TASK_KEY})""",
                    flow, number, step, task_id, list(fields), list(fields.values()))
            except asyncpg.ForeignKeyViolationError:
                raise _not_found_task(flow, run_id, step, task_id) from None
        if not found:
            raise _not_found_task(flow, run_id, step, task_id)

    async def get_metadata(self, flow: str, run_id: str, step: str, task_id: str) -> dict[str, str]:
        """The free-form fields of a task."""
        number = run_number(run_id)
        if number is None:
            raise _not_found_task(flow, run_id, step, task_id)
        async with self._connection() as con:
            rows = await con.fetch(
                """SELECT m.field, m.value FROM tasks t
                   LEFT JOIN task_metadata m ON m.flow = t.flow AND m.run_number = t.run_number AND m.step = t.step
                                            AND m.task_id = t.task_id
                   WHERE t.flow = $1 AND t.run_number = $2 AND t.step = $3 AND t.task_id = $4
                   ORDER BY m.field""",
                flow, number, step, task_id)
        if not rows:
            raise _not_found_task(flow, run_id, step, task_id)
        return {r["field"]: r["value"] for r in rows if r["field"] is not None}

