"""The notebook Client API over a datastore filled by real runs, without a daemon.

Runs are made as the daemon makes them, in this process: the pure scheduler names the
ready tasks, the real task runner runs each attempt (``run_spec``), and the run-level
files (``run.json``, ``params.json``, the checkpoint and the daemon's run summary) are
written with the engine's own keys and encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import pickle
import pwd
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from millstream import FlowSpec, Parameter, step
from millstream.client import api
from millstream.client.api import (
    DataArtifact,
    Flow,
    Metaflow,
    MetaflowInvalidPathspec,
    MetaflowNamespaceMismatch,
    MetaflowNotFound,
    Run,
    Step,
    Task,
    default_namespace,
    get_namespace,
    namespace,
)
from millstream.client.datastore_view import DatastoreView, run_sync
from millstream.client.loader import load_flow
from millstream.daemon import scheduler as sch
from millstream.daemon.checkpoint import dumps, run_record_key, summary_key
from millstream.datastore import layout
from millstream.datastore.local import LocalStore
from millstream.datastore.records import AttemptKey, read_done
from millstream.errors import MillstreamError
from millstream.flow.graph import FlowGraph
from millstream.flow.parameters import ParameterContext, encode_value, flow_parameters
from millstream.task.runner import run_spec
from millstream.task.spec import ParentRef, TaskSpec

T = TypeVar("T")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ME = pwd.getpwuid(os.getuid()).pw_name  # the owner the default namespace expects
OTHER = "someone-else"
T0 = 1_700_000_000.0
DAEMON_ID = "test"


class BoomFlow(FlowSpec):
    """Fails in its middle step unless told not to."""

    fail = Parameter("fail", default=True, help="raise in explode")

    @step
    def start(self):
        """Nothing to do."""
        self.next(self.explode)

    @step
    def explode(self):
        """Print, then maybe raise."""
        print("about to explode")
        if self.fail:
            raise ValueError("boom")
        self.next(self.end)

    @step
    def end(self):
        """Reached only when nothing exploded."""


# ------------------------------------------------------------------ a daemon-less driver


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run one datastore coroutine from the (synchronous) driver."""
    return asyncio.run(coro)


@dataclass
class Datastore:
    """A datastore root the driver writes runs into, the way the daemon's engine does."""

    root: Path
    clock: float = T0
    runs: dict[str, sch.RunState] = field(default_factory=dict)

    @property
    def store(self) -> LocalStore:
        """The object store at the root."""
        return LocalStore(self.root, durable=False)

    @property
    def config(self) -> dict[str, Any]:
        """The datastore configuration every task spec carries."""
        return {"type": "local", "root": str(self.root), "durable": False}

    def record(self, flow: str, run_id: str, *, owner: str = ME, tags: tuple[str, ...] = (),
               params: dict[str, Any] | None = None, graph: dict[str, Any] | None = None,
               status: str = "running") -> dict[str, Any]:
        """Write a submission, its parameters and its summary, as ``Engine.submit`` does."""
        self.clock += 10
        record = {"flow": flow, "run_id": run_id, "owner": owner, "owner_uid": 1000,
                  "graph": graph or {"steps": {}}, "params": params or {}, "package": "0" * 64,
                  "module_file": "flow.py", "class_name": flow, "python": "python3", "env": {},
                  "options": {"tags": list(tags), "max_workers": 16, "max_num_splits": 100},
                  "created_at": self.clock}
        sync(self.store.put(run_record_key(flow, run_id), dumps(record)))
        sync(self.store.put(layout.params_key(flow, run_id), dumps(record["params"])))
        self.summary(record, status, None)
        return record

    def summary(self, record: dict[str, Any], status: str, finished_at: float | None,
                message: str | None = None) -> None:
        """Write the daemon's one-line summary of a run."""
        summary = {"flow": record["flow"], "run_id": record["run_id"], "status": status,
                   "owner": record["owner"], "created_at": record["created_at"], "finished_at": finished_at,
                   "message": message, "tags": record["options"]["tags"]}
        sync(self.store.put(summary_key(DAEMON_ID, record["flow"], record["run_id"]), dumps(summary)))

    def run(self, cls: type[FlowSpec], run_id: str, *, owner: str = ME, tags: tuple[str, ...] = (),
            params: dict[str, Any] | None = None) -> sch.RunState:
        """Run a flow to its end: every ready task through the real task runner."""
        flow = cls.__name__
        graph = FlowGraph(cls).to_dict()
        values = resolve_params(cls, params or {})
        record = self.record(flow, run_id, owner=owner, tags=tags, params=values, graph=graph)
        state = sch.initial_state(flow, run_id)
        while ready := sch.ready_tasks(state, self.clock):
            for task in ready:
                self._attempt(cls, graph, state, task, values, owner, tags)
        assert state.finished, state.status
        sync(self.store.put(layout.checkpoint_key(flow, run_id), dumps(state.to_dict())))
        self.summary(record, state.status, self.clock, state.message)
        self.runs[f"{flow}/{run_id}"] = state
        return state

    def _attempt(self, cls: type[FlowSpec], graph: dict[str, Any], state: sch.RunState, task: sch.Task,
                 params: dict[str, Any], owner: str, tags: tuple[str, ...]) -> None:
        number = len(task.attempts)
        parents = [ParentRef(step=s, task=t, attempt=state.tasks[sch.task_key(s, t)].ok_attempt or 0)
                   for s, t in task.parents]
        spec = TaskSpec(flow=state.flow, run_id=state.run_id, step=task.step, task_id=task.task_id,
                        attempt=number, package_dir=str(EXAMPLES), module_file="flow.py",
                        class_name=cls.__name__, datastore=self.config, params=params,
                        node=graph["steps"][task.step], parents=parents, split_index=task.split_index,
                        max_user_retries=sch.max_user_retries(graph, task.step), tags=list(tags),
                        username=owner)
        sch.attempt_started(state, task.key, {"pid": os.getpid()}, self.clock)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_spec(spec, cls)
        key = AttemptKey(state.flow, state.run_id, task.step, task.task_id, number)
        # The engine stores each log when the attempt ends, only when it is not empty.
        for text, log_key in ((out.getvalue(), key.stdout_key), (err.getvalue(), key.stderr_key)):
            if text:
                sync(self.store.put(log_key, text.encode()))
        self.clock += 1
        sch.attempt_finished(graph, state, task.key, number, exit_code=code,
                             done=sync(read_done(self.store, key)), now=self.clock)


def resolve_params(cls: type[FlowSpec], given: dict[str, Any]) -> dict[str, Any]:
    """Every parameter's JSON value, given or default, as the client submits them."""
    values = {}
    for param in flow_parameters(cls):
        context = ParameterContext(flow_name=cls.__name__, user_name=ME, parameter_name=param.name,
                                   logger=print, ds_type="local")
        values[param.name] = encode_value(param.resolve(given.get(param.name), context))
    return values


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Datastore:
    """One datastore with the runs most tests read."""
    ds = Datastore(tmp_path_factory.mktemp("client-api") / "ds")
    hello = load_flow(EXAMPLES / "hello.py")
    ds.run(hello, "1", tags=("first",))
    ds.run(hello, "2")
    ds.run(hello, "3", owner=OTHER, tags=("shared",))
    ds.run(load_flow(EXAMPLES / "foreach.py"), "1", params={"count": 10})
    ds.run(BoomFlow, "1", params={"fail": False})
    ds.run(BoomFlow, "2")
    return ds


@pytest.fixture(autouse=True)
def fresh_namespace() -> Iterator[None]:
    """Each test starts, and leaves, in the default namespace with the configured reader."""
    default_namespace()
    yield
    api.use_reader(None)
    default_namespace()


def point_at(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make the settings name ``root`` as the datastore, and nothing else."""
    for name in list(os.environ):
        if name.startswith("MILLSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MILLSTREAM_CONFIG", str(root.parent / "no-config.toml"))
    monkeypatch.setenv("MILLSTREAM_DATASTORE_ROOT", str(root))


@pytest.fixture
def datastore(filled: Datastore, monkeypatch: pytest.MonkeyPatch) -> Datastore:
    """The filled datastore, configured through the environment."""
    point_at(monkeypatch, filled.root)
    return filled


class CountingStore:
    """An object store that records the keys read and the prefixes listed."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.gets: list[str] = []
        self.lists: list[str] = []
        self.threads: set[str] = set()

    async def get(self, key: str) -> bytes:
        """Record and read."""
        self.gets.append(key)
        self.threads.add(threading.current_thread().name)
        return await self.inner.get(key)

    async def list(self, prefix: str) -> list[str]:
        """Record and list."""
        self.lists.append(prefix)
        return await self.inner.list(prefix)


# ------------------------------------------------------------------ flows and runs


def test_flows_are_listed_and_runs_come_newest_first(datastore: Datastore) -> None:
    assert [f.id for f in Metaflow().flows] == ["BoomFlow", "ForeachFlow", "HelloFlow"]
    flow = Flow("HelloFlow")
    assert [run.id for run in flow] == ["2", "1"]  # run 3 belongs to someone else
    assert flow.latest_run is not None and flow.latest_run.pathspec == "HelloFlow/2"
    assert flow["1"].pathspec == "HelloFlow/1"
    assert "1" in flow and "99" not in flow
    assert [r.id for r in flow.runs("first")] == ["1"]
    assert repr(flow["2"]) == "Run('HelloFlow/2')"


def test_latest_successful_run_skips_failed_runs(datastore: Datastore) -> None:
    flow = Flow("BoomFlow")
    assert flow.latest_run is not None and flow.latest_run.id == "2"
    assert not flow.latest_run.successful
    assert flow.latest_successful_run is not None and flow.latest_successful_run.id == "1"


def test_run_properties(datastore: Datastore) -> None:
    run = Run("HelloFlow/1")
    assert run.successful and run.finished and run.status == "ok"
    assert run.user == ME
    assert run.tags == {"first", f"user:{ME}"} and run.user_tags == {"first"}
    assert run.system_tags == {f"user:{ME}"}
    assert run.created_at == datetime.fromtimestamp(T0 + 10)
    assert run.finished_at is not None and run.finished_at > run.created_at
    assert run.end_task is not None and run.end_task.pathspec == "HelloFlow/1/end/0"
    assert run.data is not None and run.data.message == "hello, world"
    assert [s.id for s in run] == ["end", "greet", "start"]
    assert run["greet"].pathspec == "HelloFlow/1/greet"
    assert "greet" in run and "nope" not in run
    assert run.parent is not None and run.parent.id == "HelloFlow"
    assert run.origin_pathspec is None


def test_foreach_run_data_and_parameters(datastore: Datastore) -> None:
    run = Flow("ForeachFlow").latest_successful_run
    assert run is not None
    assert run.data is not None
    assert run.data.total == 285
    assert run.data.count == 10  # parameters are artifacts of every task
    assert "total" in run.data and "nothing" not in run.data
    with pytest.raises(AttributeError, match="no artifact named 'nothing'"):
        _ = run.data.nothing
    assert [s.id for s in run] == ["end", "join", "square", "start"]


def test_step_iterates_foreach_tasks_last_split_first(datastore: Datastore) -> None:
    square = Step("ForeachFlow/1/square")
    tasks = list(square)
    assert [t.id for t in tasks] == [str(i) for i in range(9, -1, -1)]
    assert [t.index for t in tasks] == list(range(9, -1, -1))
    assert sum(t.data.value for t in tasks) == 285
    assert square.task is not None and square.task.id == "9"
    assert square["4"].data.value == 16
    assert "4" in square and "10" not in square
    assert square.finished_at == max(t.finished_at for t in tasks if t.finished_at)
    assert Step("ForeachFlow/1/join").task is not None
    assert Step("ForeachFlow/1/join").task.index is None  # the join closed the foreach
    assert Step("ForeachFlow/1/start").task.index is None


def test_task_data_artifacts_and_sha(datastore: Datastore) -> None:
    task = Task("ForeachFlow/1/square/3")
    assert task.pathspec == "ForeachFlow/1/square/3"
    assert task.id == "3" and task.index == 3 and task.current_attempt == 0
    assert task.successful and task.finished and task.exception is None
    assert task.finished_at is not None and task.created_at is not None
    assert task.data.value == 9
    artifact = task["value"]
    assert isinstance(artifact, DataArtifact)
    assert artifact.data == 9
    assert artifact.sha == hashlib.sha256(pickle.dumps(9, protocol=5)).hexdigest()
    assert artifact.pathspec == "ForeachFlow/1/square/3/value"
    assert artifact.type_name == "int"
    assert artifact.tags == task.tags == {f"user:{ME}"}
    assert task.artifacts.value.sha == artifact.sha
    assert {a.id for a in task} == {"count", "numbers", "value"}
    assert task["numbers"].data == list(range(10))
    param = task["count"]
    assert param.data == 10 and param.sha == hashlib.sha256(pickle.dumps(10, protocol=5)).hexdigest()
    assert DataArtifact("ForeachFlow/1/square/3/value").data == 9
    assert repr(Task("ForeachFlow/1/square/3", attempt=0)) == "Task('ForeachFlow/1/square/3', attempt=0)"
    assert task.parent is not None and task.parent.pathspec == "ForeachFlow/1/square"


def test_task_logs(datastore: Datastore) -> None:
    assert Task("HelloFlow/1/greet/0").stdout == "hello, world\n"
    assert Task("HelloFlow/1/start/0").stdout == "HelloFlow run 1 starting\n"
    assert Task("HelloFlow/1/greet/0").stderr == ""


def test_failed_run_shows_the_exception(datastore: Datastore) -> None:
    run = Run("BoomFlow/2")
    assert not run.successful and not run.finished
    assert run.status == "failed" and "boom" in (run.message or "")
    assert run.end_task is None and run.data is None and run.finished_at is None
    assert [s.id for s in run] == ["explode", "start"]
    task = run["explode"].task
    assert task is not None
    assert task.finished and not task.successful
    assert task.exception is not None
    assert task.exception.type == "builtins.ValueError"
    assert task.exception.message == "boom"
    assert "raise ValueError" in task.exception.traceback
    assert task.stdout == "about to explode\n"
    assert "ValueError: boom" in task.stderr
    assert task.data.fail is True  # the parameter, though the attempt stored nothing


# ------------------------------------------------------------------ namespaces


def test_namespace_filters_runs_by_owner(datastore: Datastore) -> None:
    assert get_namespace() == f"user:{ME}" == default_namespace()
    assert namespace(f"user:{OTHER}") == f"user:{OTHER}"
    assert [r.id for r in Flow("HelloFlow")] == ["3"]
    assert [f.id for f in Metaflow().flows] == ["HelloFlow"]
    with pytest.raises(MetaflowNamespaceMismatch, match="not in namespace") as caught:
        Run("HelloFlow/1")
    assert isinstance(caught.value, KeyError) and caught.value.pathspec == "HelloFlow/1"
    with pytest.raises(MetaflowNamespaceMismatch) as caught:
        Task("HelloFlow/1/start/0")
    assert caught.value.pathspec == "HelloFlow/1/start/0"
    with pytest.raises(MetaflowNamespaceMismatch, match="has no run in namespace"):
        Flow("ForeachFlow")
    assert Run("HelloFlow/3").user == OTHER

    namespace("shared")  # any tag is a namespace
    assert [r.id for r in Flow("HelloFlow")] == ["3"]

    assert namespace(None) is None
    assert [r.id for r in Flow("HelloFlow")] == ["3", "2", "1"]
    assert Run("HelloFlow/1").successful

    assert default_namespace() == f"user:{ME}"
    assert [r.id for r in Flow("HelloFlow")] == ["2", "1"]


def test_objects_keep_the_namespace_they_were_made_in(datastore: Datastore) -> None:
    flow = Flow("HelloFlow")
    namespace(None)
    assert [r.id for r in flow] == ["2", "1"]
    assert [r.id for r in Flow("HelloFlow")] == ["3", "2", "1"]
    hidden = Flow("HelloFlow", _namespace_check=False)
    default_namespace()
    assert len(list(hidden)) == 3


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("make", [
    lambda: Flow("NoSuchFlow"),
    lambda: Run("HelloFlow/99"),
    lambda: Step("HelloFlow/1/nosuch"),
    lambda: Task("HelloFlow/1/start/7"),
    lambda: Task("HelloFlow/1/start/0", attempt=3),
    lambda: DataArtifact("HelloFlow/1/start/0/nosuch"),
    lambda: Run("HelloFlow/1")["nosuch"],
    lambda: Flow("HelloFlow")["99"],
    lambda: Flow("HelloFlow")["../1"],
    lambda: Step("HelloFlow/1/start")["5"],
    lambda: Task("HelloFlow/1/start/0")["nosuch"],
])
def test_missing_objects_raise_not_found(datastore: Datastore, make: Any) -> None:
    with pytest.raises(MetaflowNotFound, match="does not exist") as caught:
        make()
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, MillstreamError)
    assert caught.value.pathspec
    assert str(caught.value) == caught.value.args[0]  # the message, not KeyError's quoted repr


def test_not_found_names_the_pathspec(datastore: Datastore) -> None:
    with pytest.raises(MetaflowNotFound) as caught:
        Run("HelloFlow/99")
    assert caught.value.pathspec == "HelloFlow/99"
    assert str(caught.value).startswith("Run('HelloFlow/99') does not exist")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Run("HelloFlow"), r"expected Run\('FlowName/RunID'\)"),
    (lambda: Flow("HelloFlow/1"), r"expected Flow\('FlowName'\)"),
    (lambda: Task("HelloFlow/1/start"), r"expected Task\('FlowName/RunID/StepName/TaskID'\)"),
    (lambda: DataArtifact("HelloFlow/1/start/0"), "expected DataArtifact"),
    (lambda: Run("Hello Flow/1"), "invalid flow name"),
    (lambda: Run("HelloFlow/.hidden"), "invalid run id"),
    (lambda: Run("HelloFlow/data"), "reserved"),
    (lambda: Step("HelloFlow/1/_run"), "reserved"),
    (lambda: Step("HelloFlow//start"), "invalid run id ''"),
    (lambda: DataArtifact("HelloFlow/1/start/0/not-a-name"), "invalid artifact name"),
    (lambda: Run(12), "a pathspec is a string"),
])
def test_bad_pathspecs_raise_value_errors(datastore: Datastore, make: Any, message: str) -> None:
    with pytest.raises(MetaflowInvalidPathspec, match=message) as caught:
        make()
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, MillstreamError)


def test_bad_attempt_is_a_value_error(datastore: Datastore) -> None:
    with pytest.raises(ValueError, match="attempt must be an int"):
        Task("HelloFlow/1/start/0", attempt=-1)


# ------------------------------------------------------------------ how it reads


async def test_works_inside_a_running_event_loop(datastore: Datastore) -> None:
    # As in Jupyter: the caller's thread runs a loop, so reads go to a helper thread.
    counting = CountingStore(datastore.store)
    api.use_reader(DatastoreView(counting))  # type: ignore[arg-type]
    assert Run("HelloFlow/1").data.message == "hello, world"  # type: ignore[union-attr]
    assert Task("ForeachFlow/1/square/2").data.value == 4
    assert counting.threads and all(name.startswith("millstream-client") for name in counting.threads)


def test_objects_pickle_as_their_pathspec(datastore: Datastore) -> None:
    task = pickle.loads(pickle.dumps(Task("ForeachFlow/1/square/5")))
    assert isinstance(task, Task) and task.data.value == 25
    run = pickle.loads(pickle.dumps(Run("HelloFlow/2")))
    assert run.pathspec == "HelloFlow/2"


def test_the_top_level_package_exports_the_client(datastore: Datastore) -> None:
    import millstream

    assert millstream.Flow is Flow and millstream.namespace is namespace
    assert millstream.Run("HelloFlow/1").successful


def test_a_flow_with_many_runs_reads_no_tasks(tmp_path: Path) -> None:
    ds = Datastore(tmp_path / "ds")
    hello = load_flow(EXAMPLES / "hello.py")
    ds.run(hello, "1")
    for n in range(2, 42):  # submitted, never started: a run.json and a summary each
        ds.record("HelloFlow", str(n), owner=OTHER if n % 2 else ME)
    counting = CountingStore(ds.store)
    api.use_reader(DatastoreView(counting))  # type: ignore[arg-type]

    latest = Flow("HelloFlow").latest_run
    assert latest is not None and latest.id == "40"  # 41 is someone else's
    assert counting.lists == ["daemon/", "daemon/"]
    assert len(counting.gets) == 4  # Flow(): runs 41, 40; latest_run: 41, 40

    counting.gets.clear()
    assert len(list(Flow("HelloFlow", _namespace_check=False))) == 41
    assert all(key.endswith("/_run/run.json") for key in counting.gets)
    assert len(counting.gets) == 1 + 41  # Flow(): does run 41 exist; then each run once

    counting.gets.clear()
    assert Flow("HelloFlow").latest_successful_run.id == "1"  # type: ignore[union-attr]
    assert not [k for k in counting.gets if "/start/" in k or "/greet/" in k]


def test_the_bridge_runs_on_one_loop_from_any_thread() -> None:
    async def loop_id() -> int:
        return id(asyncio.get_running_loop())

    here = run_sync(loop_id())

    async def from_inside() -> int:
        return run_sync(loop_id())

    assert asyncio.run(from_inside()) == here
