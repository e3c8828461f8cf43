"""The Client API reading back runs a real daemon made, through the metadata store.

Each test gets a fresh daemon (``tests/conftest.py``): its own datastore, the SQLite
metadata file beside it, its socket. It makes its runs with ``python flow.py run`` and
reads them back in this process, whose environment names the daemon's datastore and
metadata. The daemon records metadata asynchronously, so every read first waits until
the run's status is final in the store. The last tests do the same against the metadata
service: ``millstream metadata-service`` on a fresh PostgreSQL database, a daemon
recording into it (``metadata.type = service``), this process reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pickle
import pwd
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from millstream.client import api, datastore_view
from millstream.client.api import (
    Flow,
    Metaflow,
    MetaflowNamespaceMismatch,
    MetaflowNotFound,
    MetaflowTaggingError,
    Run,
    Step,
    Task,
    default_namespace,
    namespace,
)
from millstream.client.datastore_view import DatastoreView, close_readers, configured_reader, run_sync
from millstream.client.metadata_view import MetadataView
from millstream.datastore.local import LocalStore
from millstream.metadata.model import AttemptRecord
from millstream.metadata.sqlite import SqliteMetadataStore
from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import FLOWS, run_flow
from tests.metadata.service_fixture import API_KEY, service_process

ME = pwd.getpwuid(os.getuid()).pw_name
SYSTEM_TAGS = {f"user:{ME}", "runtime:millstream"}
FINAL = ("ok", "failed", "cancelled")


# ------------------------------------------------------------------ the daemon and this process


def point_at(monkeypatch: pytest.MonkeyPatch, daemon: Daemon) -> None:
    """This process reads what the daemon writes: its datastore and metadata settings."""
    for name in list(os.environ):
        if name.startswith("MILLSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in daemon.env.items():
        if name.startswith(("MILLSTREAM_DATASTORE_", "MILLSTREAM_METADATA_")) or name == "MILLSTREAM_CONFIG":
            monkeypatch.setenv(name, value)
    if "MILLSTREAM_METADATA_TYPE" not in daemon.env:  # the default, said out loud
        monkeypatch.setenv("MILLSTREAM_METADATA_PATH", str(daemon.datastore / "metadata.db"))


@contextlib.contextmanager
def reading(monkeypatch: pytest.MonkeyPatch, daemon: Daemon) -> Iterator[Daemon]:
    """Point this process at the daemon; afterwards close the readers opened meanwhile."""
    point_at(monkeypatch, daemon)
    default_namespace()
    try:
        yield daemon
    finally:
        close_readers()
        api.use_reader(None)
        default_namespace()


@pytest.fixture
def world(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A daemon recording into ``<datastore>/metadata.db``, and this process reading what it records."""
    with reading(monkeypatch, daemon) as d:
        yield d


def run(daemon: Daemon, flow_file: Path, *args: str, fail: str = "", command: str = "run",
        expect: int = 0) -> str:
    """Run (or resume) a flow and wait until the metadata store has its final status; its run id."""
    failing = dataclasses.replace(daemon, env=dict(daemon.env, MS_FAIL=fail))  # where the e2e flows fail
    if command == "run":
        run_id, proc = run_flow(failing, flow_file, *args)
    else:
        id_file = daemon.root / f"id-{time.monotonic_ns()}"
        proc = failing.run_flow(flow_file, command, "--run-id-file", str(id_file), *args)
        run_id = id_file.read_text().strip() if id_file.exists() else ""
    assert proc.returncode == expect, proc.stdout + proc.stderr
    flow = flow_name(flow_file)
    wait_until(lambda: Run(f"{flow}/{run_id}", _namespace_check=False).status in FINAL, 30)
    return run_id


def flow_name(flow_file: Path) -> str:
    return {"hello": "HelloFlow", "foreach": "ForeachFlow", "branch": "BranchFlow", "switch": "SwitchFlow",
            "nested_foreach": "NestedForeachFlow", "parameters": "ParameterFlow", "catch_flow": "CatchFlow",
            "resumable": "ResumableFlow"}[flow_file.stem]


def ids(tasks: Any) -> list[str]:
    return [t.pathspec.split("/", 2)[2] for t in tasks]


# ------------------------------------------------------------------ every example flow


def test_the_configured_reader_is_the_metadata_view(world: Daemon) -> None:
    run(world, EXAMPLES / "hello.py")
    reader = configured_reader(os.environ)
    assert isinstance(reader, MetadataView)
    assert configured_reader(os.environ) is reader  # one per configuration


def test_hello(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "hello.py")
    r = Run(f"HelloFlow/{run_id}")
    assert r.successful and r.finished and r.status == "ok" and r.message is None
    assert r.data is not None and r.data.message == "hello, world"
    assert [s.id for s in r] == ["end", "greet", "start"]
    assert r.pathspec == f"HelloFlow/{run_id}" and r.parent.pathspec == "HelloFlow"
    assert r.user == ME and r.user_tags == set() and r.system_tags == SYSTEM_TAGS and r.tags == SYSTEM_TAGS
    assert r.origin_pathspec is None
    assert Flow("HelloFlow").latest_run.id == run_id  # type: ignore[union-attr]
    assert "HelloFlow" in {f.id for f in Metaflow()}

    greet = r["greet"].task
    assert greet is not None and greet.pathspec == f"HelloFlow/{run_id}/greet/0"
    assert greet.parent.pathspec == f"HelloFlow/{run_id}/greet" and greet.parent.parent.id == run_id
    assert greet.stdout == "hello, world\n" and greet.stderr == ""
    assert list(greet.loglines("stdout")) == [(None, "hello, world")]
    assert greet.exception is None and greet.index is None and greet.origin_pathspec is None
    assert list(greet.parent_task_pathspecs) == [f"HelloFlow/{run_id}/start/0"]
    assert ids(greet.parent_tasks) == ["start/0"] and ids(greet.child_tasks) == ["end/0"]
    assert list(greet.child_task_pathspecs) == [f"HelloFlow/{run_id}/end/0"]
    assert greet.tags == SYSTEM_TAGS
    meta = greet.metadata_dict
    assert meta["attempt"] == "0" and meta["attempt_ok"] == "True" and meta["exit_code"] == "0"
    assert int(meta["pid"]) > 0  # the local backend's handle
    assert {m.name for m in greet.metadata} >= {"attempt", "attempt_ok", "pid"}
    first = greet.metadata[0]
    assert (first.name, first.value, first.type, first.task) == ("attempt", "0", "attempt", greet)
    assert isinstance(first.created_at, int) and abs(first.created_at / 1000 - time.time()) < 600
    assert greet["message"].type_name == "str" and greet["message"].size > 0
    assert Task(f"HelloFlow/{run_id}/start/0").stdout == f"HelloFlow run {run_id} starting\n"


def test_foreach_indices_and_join(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "foreach.py", "--count", "5")
    r = Run(f"ForeachFlow/{run_id}")
    assert r.data is not None and r.data.total == 30 and r.data.count == 5
    square = r["square"]
    tasks = list(square)
    assert [t.index for t in tasks] == [4, 3, 2, 1, 0]  # the last split first
    assert [t.data.value for t in tasks] == [16, 9, 4, 1, 0]
    assert square.task is not None and square.task.index == 4
    start = r["start"].task
    assert start is not None and start.index is None
    assert sorted(ids(start.child_tasks)) == sorted(ids(tasks))
    join = r["join"].task
    assert join is not None and join.index is None
    assert sorted(ids(join.parent_tasks)) == sorted(ids(tasks))
    assert all(ids(t.child_tasks) == ["join/0"] for t in tasks)
    assert Step(f"ForeachFlow/{run_id}/square").finished_at is not None


def test_branch(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "branch.py")
    r = Run(f"BranchFlow/{run_id}")
    assert r.data is not None and r.data.best_model == "tree" and r.data.scores == {"linear": 4.5, "tree": 5.5}
    assert r.data.seed == 42
    pick = r["pick"].task
    assert pick is not None
    assert sorted(ids(pick.parent_tasks)) == ["linear_model/0", "tree_model/0"]
    assert sorted(ids(r["start"].task.child_tasks)) == ["linear_model/0", "tree_model/0"]  # type: ignore[union-attr]
    assert "score" not in pick and "model" not in pick  # excluded from the merge


def test_switch(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "switch.py")
    r = Run(f"SwitchFlow/{run_id}")
    assert [s.id for s in r] == ["end", "small", "start"]  # the branch not taken has no step
    assert "large" not in r
    assert r.data is not None and r.data.result == "in memory (5)" and r.data.size == 5
    assert ids(r["end"].task.parent_tasks) == ["small/0"]  # type: ignore[union-attr]


def test_nested_foreach(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "nested_foreach.py")
    r = Run(f"NestedForeachFlow/{run_id}")
    assert r.data is not None and r.data.table == {"a": [11, 12], "b": [21, 22], "c": [31, 32]}
    fits = list(r["fit"])
    assert len(fits) == 6
    assert sorted((t.id, t.index) for t in fits) == [
        ("0-0", 0), ("0-1", 1), ("1-0", 0), ("1-1", 1), ("2-0", 0), ("2-1", 1)]
    assert [t.index for t in r["per_model"]] == [2, 1, 0]
    joins = {t.id: t for t in r["per_model_join"]}
    assert {i: t.index for i, t in joins.items()} == {"0": 0, "1": 1, "2": 2}  # the outer foreach's
    assert sorted(ids(joins["1"].parent_tasks)) == ["fit/1-0", "fit/1-1"]
    assert r["join"].task.index is None  # type: ignore[union-attr]


def test_parameters(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "parameters.py", "--alpha", "0.1", "--epochs", "2",
                 "--config", '{"layers": [2]}')
    r = Run(f"ParameterFlow/{run_id}")
    assert r.data is not None
    assert (r.data.alpha, r.data.epochs, r.data.verbose) == (0.1, 2, False)
    assert r.data.config == {"layers": [2]} and r.data.greeting == f"hello from {ME}"
    assert r.data.schedule == [0.1, 0.05]
    start = r["start"].task
    assert start is not None and start.data.alpha == 0.1 and "schedule" in start


# ------------------------------------------------------------------ failures


def test_a_failed_task_shows_its_exception(world: Daemon) -> None:
    run_id = run(world, FLOWS / "catch_flow.py", "--fail_hard", "true", expect=1)
    r = Run(f"CatchFlow/{run_id}")
    assert r.status == "failed" and not r.successful and not r.finished and r.end_task is None
    assert r.data is None
    failed = r["maybe_fail"].task
    assert failed is not None and failed.finished and not failed.successful
    assert failed.exception is not None
    assert (failed.exception.type, failed.exception.message) == ("builtins.ValueError", "asked to fail")
    assert "raise ValueError" in failed.exception.traceback
    assert "ValueError: asked to fail" in failed.stderr
    assert failed.metadata_dict["attempt_ok"] == "False"
    assert failed.data.fail_hard is True  # the parameter, though the attempt stored nothing
    caught = r["divide"].task  # @catch kept the exception as an artifact and went on
    assert caught is not None and caught.successful and caught.exception is None
    assert caught.data.divide_error.type == "builtins.ZeroDivisionError"


# ------------------------------------------------------------------ tags


def test_tags_given_with_the_run_then_changed(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "hello.py", "--tag", "alpha", "--tag", "beta")
    pathspec = f"HelloFlow/{run_id}"
    r = Run(pathspec)
    assert r.user_tags == {"alpha", "beta"} and r.system_tags == SYSTEM_TAGS
    assert r.tags == {"alpha", "beta"} | SYSTEM_TAGS
    assert [x.id for x in Flow("HelloFlow").runs("alpha", "beta")] == [run_id]
    assert [x.id for x in Flow("HelloFlow").runs("alpha", "nope")] == []

    r.add_tag("gamma")
    r.remove_tag("alpha")
    r.replace_tag("beta", "delta")
    assert r.user_tags == {"gamma", "delta"}
    assert Run(pathspec).user_tags == {"gamma", "delta"}  # stored, not just on this object
    r.add_tags(["x", "y"])
    r.remove_tags(["x"])
    r.replace_tags(["y"], ["z"])
    assert Run(pathspec).user_tags == {"gamma", "delta", "z"}
    assert Task(f"{pathspec}/end/0").tags == {"gamma", "delta", "z"} | SYSTEM_TAGS

    namespace("delta")
    assert [x.id for x in Flow("HelloFlow")] == [run_id]
    namespace("alpha")
    with pytest.raises(MetaflowNamespaceMismatch):
        Run(pathspec)
    default_namespace()

    with pytest.raises(MetaflowTaggingError, match="cannot remove system tags"):
        r.remove_tag(f"user:{ME}")
    with pytest.raises(MetaflowTaggingError, match="cannot remove system tags"):
        r.replace_tag("runtime:millstream", "other")
    with pytest.raises(MetaflowTaggingError, match="must be a list"):
        r.add_tags("abc")
    with pytest.raises(MetaflowTaggingError, match="bad tag"):
        r.add_tag("")
    assert Run(pathspec).system_tags == SYSTEM_TAGS


def test_only_the_owner_or_root_changes_tags(world: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = run(world, EXAMPLES / "hello.py")
    r = Run(f"HelloFlow/{run_id}")
    monkeypatch.setattr(api.os, "getuid", lambda: 4242)
    monkeypatch.setattr(api, "_username", lambda: "mallory")
    with pytest.raises(MetaflowTaggingError, match=f"only {ME} \\(or root\\)"):
        r.add_tag("mine-now")
    monkeypatch.setattr(api, "_username", lambda: ME)
    r.add_tag("mine")
    assert r.user_tags == {"mine"}


def test_tags_cannot_change_without_a_metadata_store(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "hello.py")
    api.use_reader(DatastoreView(LocalStore(world.datastore, durable=False)))
    with pytest.raises(MetaflowTaggingError, match="only a datastore"):
        Run(f"HelloFlow/{run_id}").add_tag("x")


# ------------------------------------------------------------------ resume


def test_a_resumed_run_reads_its_cloned_tasks_from_the_origin(world: Daemon) -> None:
    flow = "ResumableFlow"
    origin = run(world, FLOWS / "resumable.py", "--max-workers", "1", fail="work:3", expect=1)
    new = run(world, FLOWS / "resumable.py", command="resume")
    r = Run(f"{flow}/{new}")
    assert r.successful and r.origin_pathspec == f"{flow}/{origin}"
    assert Run(f"{flow}/{origin}").origin_pathspec is None

    work = {t.id: t for t in r["work"]}
    assert sorted(work) == [str(i) for i in range(6)]
    cloned = {i for i, t in work.items() if t.origin_pathspec}
    assert cloned == {"0", "1", "2"}
    clone = work["1"]
    assert clone.origin_pathspec == f"{flow}/{origin}/work/1"
    assert clone.successful and clone.finished and clone.index == 1
    assert clone.data.value == 10 and clone.data.ran_in == origin  # the origin attempt's artifacts
    meta = clone.metadata_dict
    assert meta["origin-run-id"] == origin and meta["origin-task-id"] == "1" and meta["origin-attempt"] == "0"
    assert work["3"].origin_pathspec is None and work["3"].data.ran_in == new
    assert Task(f"{flow}/{new}/start/0").origin_pathspec == f"{flow}/{origin}/start/0"
    assert ids(clone.parent_tasks) == ["start/0"]

    assert r.data is not None and r.data.total == sum(i * 10 for i in range(6))
    assert r.data.origin_seen == origin
    join = r["join"].task
    assert join is not None and join.data.split_runs == [origin] * 3 + [new] * 3

    failed = Task(f"{flow}/{origin}/work/3")
    assert failed.exception is not None and "split 3 fails on purpose" in failed.exception.message

    # The datastore alone tells the same story, through the checkpoint and _run/clones.json.
    api.use_reader(DatastoreView(LocalStore(world.datastore, durable=False)))
    alone = Task(f"{flow}/{new}/work/1")
    assert alone.origin_pathspec == f"{flow}/{origin}/work/1" and alone.data.ran_in == origin
    assert alone.index == 1 and ids(alone.parent_tasks) == ["start/0"]
    assert alone.metadata_dict["origin-run-id"] == origin
    assert Run(f"{flow}/{new}").origin_pathspec == f"{flow}/{origin}"
    assert Task(f"{flow}/{new}/work/3").origin_pathspec is None


def _stored(daemon: Daemon, read: Callable[[SqliteMetadataStore], Any]) -> Any:
    """What the daemon's SQLite metadata file holds, read straight from the store."""

    async def go() -> Any:
        async with SqliteMetadataStore(daemon.datastore / "metadata.db") as store:
            return await read(store)

    return asyncio.run(go())


def test_the_store_records_a_clone_and_its_origin(world: Daemon) -> None:
    origin = run(world, FLOWS / "resumable.py", fail="join", expect=1)
    new = run(world, FLOWS / "resumable.py", command="resume")
    task = _stored(world, lambda store: store.get_task("ResumableFlow", new, "work", "0"))
    assert task.origin == f"ResumableFlow/{origin}/work/0" and task.attempts


def test_the_store_indexes_artifact_types(world: Daemon) -> None:
    run_id = run(world, EXAMPLES / "hello.py")
    index = _stored(world, lambda store: store.get_artifacts("HelloFlow", run_id, "greet", "0"))
    assert index and all(a.type_name for a in index)


# ------------------------------------------------------------------ how it reads


async def test_works_inside_a_running_event_loop(world: Daemon) -> None:
    # As in Jupyter: this thread runs a loop, so the reads go to the client's helper thread.
    assert asyncio.get_running_loop() is not None
    run_id = await asyncio.to_thread(run, world, EXAMPLES / "hello.py")
    r = Run(f"HelloFlow/{run_id}")
    assert r.data is not None and r.data.message == "hello, world"
    assert r["greet"].task.stdout == "hello, world\n"  # type: ignore[union-attr]
    helper = datastore_view._bridge._helper
    assert helper is not None
    names = helper.submit(lambda: threading.current_thread().name).result()
    assert names.startswith("millstream-client")


def test_a_datastore_without_metadata_gets_the_datastore_view(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MILLSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MILLSTREAM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("MILLSTREAM_DATASTORE_ROOT", str(tmp_path / "ds"))
    try:
        assert isinstance(configured_reader(os.environ), DatastoreView)
        assert not (tmp_path / "ds" / "metadata.db").exists()  # looking did not create one
    finally:
        close_readers()


class Counting:
    """A MetadataStore proxy that counts the calls of each method."""

    def __init__(self, inner: SqliteMetadataStore) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            if name not in ("open", "close"):
                self.calls[name] = self.calls.get(name, 0) + 1
            return await method(*args, **kwargs)

        return counted

    def reset(self) -> None:
        """Forget the counts."""
        self.calls.clear()


def test_the_cost_of_listing_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "metadata.db"

    async def fill() -> None:
        async with SqliteMetadataStore(db) as store:
            for n in range(1000):
                record = await store.create_run("BigFlow", user=ME if n % 2 else "someone-else",
                                                system_tags=[f"user:{ME if n % 2 else 'someone-else'}"])
                await store.finish_run("BigFlow", record.run_id, status="ok")
            wide = await store.create_run("WideFlow", user=ME, system_tags=[f"user:{ME}"])
            for i in range(200):
                await store.record_task("WideFlow", wide.run_id, "work", str(i), foreach_index=[i])
                await store.record_attempt("WideFlow", wide.run_id, "work", str(i),
                                           AttemptRecord(0, "ok", started_at=1.0, finished_at=2.0, exit_code=0,
                                                         handle={"pid": 100 + i}))
            await store.finish_run("WideFlow", wide.run_id, status="ok")

    asyncio.run(fill())
    counting = Counting(SqliteMetadataStore(db))
    statements: list[str] = []

    async def trace() -> None:  # count SQL statements too, on the store's one connection
        await counting.inner.open()
        await counting.inner._db.set_trace_callback(statements.append)  # type: ignore[union-attr]

    run_sync(trace())
    view = MetadataView(counting, DatastoreView(LocalStore(tmp_path / "ds", durable=False)))  # type: ignore[arg-type]
    api.use_reader(view)
    try:
        namespace(None)
        runs = list(Flow("BigFlow"))
        assert len(runs) == 1000 and runs[0].id == "1000" and runs[-1].id == "1"
        everyone = dict(counting.calls)
        everyone_sql = len([s for s in statements if s.lstrip().upper().startswith("SELECT")])
        assert everyone == {"list_runs": 5}  # Flow(): 1; then pages of 1, 10, 100 and 889

        counting.reset()
        statements.clear()
        default_namespace()
        mine = list(Flow("BigFlow"))  # the namespace filter runs in the store
        assert len(mine) == 500 and all(r.user == ME for r in mine)
        assert counting.calls == {"list_runs": 5}
        assert all(r.successful for r in mine)  # the recorded status: no more calls
        assert counting.calls == {"list_runs": 5}

        counting.reset()
        statements.clear()
        wide = Run("WideFlow/1")
        tasks = list(wide["work"])
        assert len(tasks) == 200 and [t.index for t in tasks[:3]] == [199, 198, 197]
        assert all(t.successful for t in tasks)
        task_calls = dict(counting.calls)
        assert task_calls == {"get_run": 2, "list_tasks": 1}  # Run(); its status and tasks
        assert len([t for t in tasks if t.finished_at is not None]) == 200
        assert counting.calls == task_calls  # the table of a finished run is memoised
    finally:
        api.use_reader(None)
        default_namespace()
        run_sync(view.close())
    with capsys.disabled():
        print(f"\n[bounded cost] 1,000 runs of a flow: {everyone['list_runs']} list_runs calls, "
              f"{everyone_sql} SQL SELECTs; a 200-task run's tasks and their status: {task_calls}")


# ------------------------------------------------------------------ the metadata service


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``millstream metadata-service`` as a subprocess on a fresh database; its URL."""
    with service_process(tmp_path_factory.mktemp("service")) as url:
        yield url


@pytest.fixture
def service_world(daemon_factory: Callable[..., Daemon], service_url: str,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A daemon recording into the metadata service, and this process reading the service."""
    daemon = daemon_factory(metadata_type="service", metadata_url=service_url, metadata_api_key=API_KEY)
    daemon.start()
    with reading(monkeypatch, daemon) as d:
        yield d


def test_the_service_reader_reads_back_runs(service_world: Daemon) -> None:
    assert isinstance(configured_reader(os.environ), MetadataView)
    assert not (service_world.datastore / "metadata.db").exists()  # nothing went to SQLite

    run_id = run(service_world, EXAMPLES / "foreach.py", "--count", "4", "--tag", "svc")
    r = Run(f"ForeachFlow/{run_id}")
    assert r.successful and r.data is not None and r.data.total == 14
    assert r.user_tags == {"svc"} and r.system_tags == SYSTEM_TAGS
    assert [t.index for t in r["square"]] == [3, 2, 1, 0]
    assert sorted(ids(r["join"].task.parent_tasks)) == [f"square/{i}" for i in range(4)]  # type: ignore[union-attr]
    assert r["start"].task.metadata_dict["attempt_ok"] == "True"  # type: ignore[union-attr]
    r.replace_tag("svc", "svc2")
    r.add_tag("more")
    assert Run(f"ForeachFlow/{run_id}").user_tags == {"svc2", "more"}
    assert [x.id for x in Flow("ForeachFlow").runs("more")] == [run_id]

    failed_id = run(service_world, FLOWS / "catch_flow.py", "--fail_hard", "true", expect=1)
    failed = Task(f"CatchFlow/{failed_id}/maybe_fail/0")
    assert failed.exception is not None and failed.exception.message == "asked to fail"

    origin = run(service_world, FLOWS / "resumable.py", fail="join", expect=1)
    new = run(service_world, FLOWS / "resumable.py", command="resume")
    resumed = Run(f"ResumableFlow/{new}")
    assert resumed.origin_pathspec == f"ResumableFlow/{origin}"
    clone = Task(f"ResumableFlow/{new}/work/2")
    assert clone.origin_pathspec == f"ResumableFlow/{origin}/work/2" and clone.data.ran_in == origin
    assert resumed.data is not None and resumed.data.total == sum(i * 10 for i in range(6))


def test_dump_reads_the_service(service_world: Daemon, tmp_path: Path) -> None:
    run_id = run(service_world, EXAMPLES / "hello.py")
    out = tmp_path / "out.pkl"
    proc = service_world.cli("dump", f"HelloFlow/{run_id}/greet", "--file", str(out))
    assert proc.returncode == 0, proc.stderr
    assert pickle.loads(out.read_bytes()) == {f"HelloFlow/{run_id}/greet/0": {"message": "hello, world"}}


def test_not_found_is_still_not_found(world: Daemon) -> None:
    run(world, EXAMPLES / "hello.py")
    with pytest.raises(MetaflowNotFound):
        Run("HelloFlow/999999")
    with pytest.raises(MetaflowNotFound):
        Task("HelloFlow/1/start/7")
    with pytest.raises(MetaflowNotFound):
        Flow("NoSuchFlow")
