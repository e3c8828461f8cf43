"""Drive a flow through the real scheduler and the real task runner, in this process.

This is the daemon's loop minus processes and the clock: ready tasks become task
specs exactly as the engine builds them, each attempt runs through ``run_spec``, and
its done marker (read back from the datastore) is fed to ``attempt_finished``.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from millstream.daemon import scheduler as sch
from millstream.datastore.artifacts import ArtifactStore
from millstream.datastore.local import LocalStore
from millstream.datastore.records import AttemptKey, read_done
from millstream.flow.current import current
from millstream.flow.graph import FlowGraph
from millstream.flow.parameters import ParameterContext, flow_parameters
from millstream.flow.spec import FlowSpec
from millstream.task.runner import load_flow_class, run_spec
from millstream.task.spec import ParentRef, TaskSpec

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
FLOWS = HERE / "flows.py"
EXAMPLES = HERE.parents[1] / "examples"
USER = "tester"
T0 = 1_700_000_000.0


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run one datastore coroutine from a sync test."""
    return asyncio.run(coro)


def copy_examples(dest: Path) -> Path:
    """A copy of the example flows, as a code package directory."""
    shutil.copytree(EXAMPLES, dest)
    return dest


def resolve_params(cls: type[FlowSpec], given: dict[str, Any] | None) -> dict[str, Any]:
    """Every parameter's value: the given one or the default, as at submission."""
    values = {}
    for param in flow_parameters(cls):
        context = ParameterContext(
            flow_name=cls.__name__, user_name=USER, parameter_name=param.name, logger=print, ds_type="local"
        )
        values[param.name] = param.resolve((given or {}).get(param.name), context)
    return values


@dataclass
class Run:
    """A flow run in a datastore under ``root``: its graph, scheduler state and records."""

    root: Path
    flow_file: Path
    cls: type[FlowSpec]
    graph: dict[str, Any]
    state: sch.RunState
    params: dict[str, Any]
    exit_codes: dict[tuple[str, int], int] = field(default_factory=dict)  # (task key, attempt) -> code
    now: float = T0

    @property
    def flow(self) -> str:
        """The flow's name."""
        return self.cls.__name__

    @property
    def datastore(self) -> dict[str, Any]:
        """The datastore configuration every task spec carries."""
        return {"type": "local", "root": str(self.root), "durable": False}

    @property
    def store(self) -> LocalStore:
        """The run's object store."""
        return LocalStore(self.root, durable=False, inline=True)

    def spec(self, key: str, attempt: int) -> TaskSpec:
        """The task spec of one attempt, built as the engine builds it."""
        task = self.state.tasks[key]
        parents = []
        for step, task_id in task.parents:
            parent = self.state.tasks[sch.task_key(step, task_id)]
            parents.append(ParentRef(step=step, task=task_id, attempt=parent.ok_attempt or 0))
        return TaskSpec(
            flow=self.flow,
            run_id=self.state.run_id,
            step=task.step,
            task_id=task.task_id,
            attempt=attempt,
            package_dir=str(self.flow_file.parent),
            module_file=self.flow_file.name,
            class_name=self.cls.__name__,
            datastore=self.datastore,
            params=self.params,
            node=self.graph["steps"][task.step],
            parents=parents,
            split_index=task.split_index,
            max_user_retries=sch.max_user_retries(self.graph, task.step),
            username=USER,
        )

    def run_attempt(self, key: str) -> int:
        """Run the next attempt of a ready task and report it to the scheduler; its exit code."""
        number = sch.attempt_started(self.state, key, None, self.now).number
        code = run_spec(self.spec(key, number), self.cls)
        assert not current.is_running_flow, "the runner left `current` set"
        done = self.done(key, number)
        sch.attempt_finished(self.graph, self.state, key, number, exit_code=code, done=done, now=self.now)
        self.exit_codes[(key, number)] = code
        self.now += 1
        return code

    def run_until_done(self) -> None:
        """Run ready tasks until the run ends, waiting out retry delays on the fake clock."""
        while not self.state.finished:
            ready = sch.ready_tasks(self.state, self.now)
            if not ready:
                wakeup = sch.next_wakeup(self.state)
                assert wakeup is not None and wakeup > self.now, f"run stuck: {self.state.to_dict()}"
                self.now = wakeup
                continue
            for task in ready:
                self.run_attempt(task.key)

    # ------------------------------------------------------------- reading back
    def done(self, key: str, attempt: int | None = None) -> dict[str, Any] | None:
        """The done marker of an attempt (by default the task's successful one)."""
        task = self.state.tasks[key]
        number = task.ok_attempt if attempt is None else attempt
        assert number is not None, f"{key} has no successful attempt"
        return sync(read_done(self.store, AttemptKey(self.flow, self.state.run_id, task.step, task.task_id, number)))

    def refs(self, key: str) -> dict[str, dict[str, Any]]:
        """The artifact references in a task's successful done marker."""
        done = self.done(key)
        assert done is not None
        return dict(done["artifacts"])

    def load(self, sha: str) -> Any:
        """Load one artifact by id."""
        return sync(ArtifactStore(self.store, self.flow).load(sha))

    def artifact(self, key: str, name: str) -> Any:
        """The value of an artifact of a task's successful attempt."""
        return self.load(self.refs(key)[name]["sha"])

    def steps_run(self) -> set[str]:
        """The steps that have at least one task."""
        return {t.step for t in self.state.tasks.values()}


def new_run(
    root: Path,
    flow_file: Path,
    class_name: str,
    params: dict[str, Any] | None = None,
    *,
    max_num_splits: int = 100,
    run_id: str = "1",
) -> Run:
    """Load the flow as a task process would and set up a run of it."""
    cls = load_flow_class(str(flow_file.parent), flow_file.name, class_name)
    graph = FlowGraph(cls)
    graph.validate()
    return Run(
        root=root,
        flow_file=flow_file,
        cls=cls,
        graph=graph.to_dict(),
        state=sch.initial_state(cls.__name__, run_id, max_num_splits=max_num_splits),
        params=resolve_params(cls, params),
    )


def drive(
    root: Path, flow_file: Path, class_name: str, params: dict[str, Any] | None = None, *, max_num_splits: int = 100
) -> Run:
    """Run a whole flow, step by step, until the scheduler says the run ended."""
    run = new_run(root, flow_file, class_name, params, max_num_splits=max_num_splits)
    run.run_until_done()
    return run
