"""What only the SQLite store promises: WAL, schema versions, many processes, bounded statements."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from millstream.errors import MetadataError
from millstream.metadata import sqlite as sqlite_module
from millstream.metadata.model import DEAD_RUN_MESSAGE, AttemptRecord
from millstream.metadata.sqlite import MIGRATIONS, SqliteMetadataStore

REPO = Path(__file__).resolve().parents[2]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteMetadataStore]:
    """An open SQLite store (this module's own: no service parameter)."""
    async with SqliteMetadataStore(tmp_path / "meta.db") as s:
        yield s


def read(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Rows from a plain sqlite3 connection, as another process would see them."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def make_v1_database(path: Path) -> None:
    """A database exactly as migration 1 leaves it, with one run, written without the store."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.executescript(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);"
            "INSERT INTO schema_version VALUES (1, 0);"
            "INSERT INTO flows VALUES ('F', 1);"
            "INSERT INTO runs (flow, run_number, user, status, created_at) VALUES ('F', 1, 'ann', 'ok', 5);")


# ----------------------------------------------------------------- connection and schema


async def test_wal_and_foreign_keys_are_on(store: SqliteMetadataStore) -> None:
    assert read(store.path, "PRAGMA journal_mode") == [("wal",)]
    db = store._db
    assert db is not None
    assert [tuple(r) for r in await db.execute_fetchall("PRAGMA foreign_keys")] == [(1,)]
    assert next(iter(await db.execute_fetchall("PRAGMA busy_timeout")))[0] == 30_000


async def test_schema_version_is_recorded(store: SqliteMetadataStore) -> None:
    assert [row[0] for row in read(store.path, "SELECT version FROM schema_version")] == [len(MIGRATIONS)]


async def test_reopening_applies_nothing_twice(tmp_path: Path) -> None:
    for _ in range(2):
        async with SqliteMetadataStore(tmp_path / "meta.db") as s:
            await s.create_run("F", user="ann")
    assert len(read(tmp_path / "meta.db", "SELECT * FROM schema_version")) == len(MIGRATIONS)
    assert read(tmp_path / "meta.db", "SELECT run_number FROM runs ORDER BY 1") == [(1,), (2,)]


async def test_a_version_1_database_opens_and_continues(tmp_path: Path) -> None:
    make_v1_database(tmp_path / "old.db")
    async with SqliteMetadataStore(tmp_path / "old.db") as s:
        old = await s.get_run("F", "1")
        assert (old.user, old.status, old.created_at, old.tags, old.params) == ("ann", "ok", 5.0, (), {})
        assert (await s.create_run("F", user="bob")).run_id == "2"


async def test_a_later_migration_is_applied_to_an_old_database(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    make_v1_database(tmp_path / "old.db")
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*MIGRATIONS, """
        -- migration 2: a column and an index
        ALTER TABLE runs ADD COLUMN note TEXT;
        CREATE INDEX runs_by_user ON runs (user);
    """))
    async with SqliteMetadataStore(tmp_path / "old.db") as s:
        assert (await s.get_run("F", "1")).status == "ok"
    assert [r[0] for r in read(tmp_path / "old.db", "SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    assert "note" in [r[1] for r in read(tmp_path / "old.db", "PRAGMA table_info(runs)")]


async def test_a_failing_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_v1_database(tmp_path / "old.db")
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*MIGRATIONS, """
        CREATE TABLE half_done (x INTEGER);
        ALTER TABLE no_such_table ADD COLUMN y TEXT;
    """))
    with pytest.raises(MetadataError, match="no_such_table"):
        await SqliteMetadataStore(tmp_path / "old.db").open()
    assert read(tmp_path / "old.db", "SELECT version FROM schema_version") == [(1,)]
    assert read(tmp_path / "old.db", "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []


async def test_a_database_from_a_newer_millstream_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SqliteMetadataStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    store = SqliteMetadataStore(path)
    with pytest.raises(MetadataError, match=rf"version {len(MIGRATIONS) + 1}, newer .*upgrade millstream"):
        await store.open()
    with pytest.raises(MetadataError, match="not open"):
        await store.list_flows()
    assert len(read(path, "SELECT * FROM schema_version")) == len(MIGRATIONS) + 1


# ----------------------------------------------------------------- clocks and locks


async def test_dead_run_detection_follows_the_store_clock(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    async with SqliteMetadataStore(tmp_path / "meta.db", dead_after_s=5.0, clock=clock) as s:
        run = await s.create_run("F", user="ann")
        assert run.created_at == 1000.0
        clock.now = 1004.9
        assert (await s.get_run("F", run.run_id)).status == "running"
        clock.now = 1005.1
        dead = await s.get_run("F", run.run_id)
        assert (dead.status, dead.message) == ("failed", DEAD_RUN_MESSAGE)
        await s.heartbeat_run("F", run.run_id)
        assert (await s.get_run("F", run.run_id)).heartbeat_at == 1005.1
        clock.now = 1010.0
        assert (await s.get_run("F", run.run_id)).status == "running"
        clock.now = 1010.2
        assert (await s.list_runs(status="failed")).items[0].message == DEAD_RUN_MESSAGE


async def test_a_locked_file_is_a_retryable_error(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    async with SqliteMetadataStore(path, busy_timeout_s=0.05) as s:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(MetadataError) as caught:
                await s.create_run("F", user="ann")
            assert caught.value.retryable
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert (await s.create_run("F", user="ann")).run_id == "1"


async def test_non_canonical_run_ids_are_not_found(store: SqliteMetadataStore) -> None:
    await store.create_run("F", user="ann")
    for run_id in ("01", "+1", " 1", "1.0", "\u0661"):  # the last is ARABIC-INDIC DIGIT ONE: isdigit() but not ASCII
        with pytest.raises(KeyError):
            await store.get_run("F", run_id)


# ----------------------------------------------------------------- several processes

WORKER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from millstream.metadata.sqlite import SqliteMetadataStore

    async def main() -> None:
        async with SqliteMetadataStore(Path(sys.argv[1])) as store:
            print("ready", flush=True)
            sys.stdin.readline()  # all workers are open: go together
            ids = [(await store.create_run("F", user=sys.argv[2])).run_id for _ in range(25)]
        print(json.dumps(ids), flush=True)

    asyncio.run(main())
""")


def test_four_processes_allocate_100_distinct_ids(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"  # created by whichever worker opens first: migration races too
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), f"u{n}"], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for n in range(4)]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready", w.stderr and w.stderr.read()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        results = []
        for w in workers:
            out, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    allocated = [int(run_id) for ids in results for run_id in ids]
    assert sorted(allocated) == list(range(1, 101))
    assert all(ids == sorted(ids, key=int) for ids in results)  # each worker saw its own ids increase
    assert read(path, "SELECT last_run FROM flows WHERE name = 'F'") == [(100,)]


# ----------------------------------------------------------------- statement counts


async def test_listing_1000_runs_costs_one_statement_a_page(store: SqliteMetadataStore,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    for n in range(1000):
        await store.create_run("F", user="ann", tags=[f"t{n % 3}"], system_tags=["user:ann"], params={"n": n},
                               now=now + n)
    statements: list[str] = []
    db = store._db
    assert db is not None
    await db.set_trace_callback(statements.append)
    started = time.perf_counter()
    first = await store.list_runs(flow="F", limit=500)
    second = await store.list_runs(flow="F", limit=500, cursor=first.next_cursor)
    elapsed_ms = (time.perf_counter() - started) * 1000
    per_page = len(statements) / 2
    assert len(first.items) == len(second.items) == 500 and second.next_cursor is None
    assert len({r.run_id for r in first.items + second.items}) == 1000
    assert per_page <= 3, statements

    statements.clear()
    tagged = await store.list_runs(flow="F", tags=["t1", "user:ann"], status="running", limit=500)
    assert len(tagged.items) == 333 and len(statements) <= 3
    await db.set_trace_callback(None)  # type: ignore[arg-type]  # None removes it, as in sqlite3
    with capsys.disabled():
        print(f"\nlist 1,000 runs in 2 pages of 500: {per_page:.0f} statement(s) a page, {elapsed_ms:.1f} ms")


async def test_list_tasks_costs_a_bounded_number_of_statements(store: SqliteMetadataStore,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = await store.create_run("F", user="ann")
    for n in range(300):
        await store.record_task("F", run.run_id, f"s{n % 5}", str(n))
        for attempt in range(n % 3):
            await store.record_attempt("F", run.run_id, f"s{n % 5}", str(n), AttemptRecord(attempt=attempt))
    statements: list[str] = []
    db = store._db
    assert db is not None
    await db.set_trace_callback(statements.append)
    started = time.perf_counter()
    tasks = await store.list_tasks("F", run.run_id)
    elapsed_ms = (time.perf_counter() - started) * 1000
    one_step = await store.list_tasks("F", run.run_id, step="s1")
    await db.set_trace_callback(None)  # type: ignore[arg-type]  # None removes it, as in sqlite3
    assert len(tasks) == 300 and sum(len(t.attempts) for t in tasks) == 300
    assert len(one_step) == 60
    queries = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(queries) == 4, statements  # two a listing, whatever the number of tasks
    with capsys.disabled():
        print(f"\nlist 300 tasks with 300 attempts: {len(statements) // 2} statements, {elapsed_ms:.1f} ms")


async def test_concurrent_readers_and_writers_in_one_process(store: SqliteMetadataStore) -> None:
    async def write(n: int) -> None:
        run = await store.create_run("F", user="ann")
        await store.record_task("F", run.run_id, "start", "1")
        await store.finish_run("F", run.run_id, status="ok" if n % 2 else "failed")

    async def read_all() -> int:
        return len((await store.list_runs(flow="F", limit=1000)).items)

    results = await asyncio.gather(*(write(n) for n in range(30)), *(read_all() for _ in range(30)))
    assert all(isinstance(r, int) or r is None for r in results)
    assert len((await store.list_runs(flow="F", status="ok")).items) == 15
