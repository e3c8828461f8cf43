"""The notebook Client API: Metaflow's ``Metaflow``, ``Flow``, ``Run``, ``Step``, ``Task``, ``DataArtifact``.

Results of past and running runs, read straight from the datastore through a
:class:`~millstream.client.datastore_view.RunReader`, in the shape Metaflow's client has::

    from millstream import Flow, namespace
    run = Flow("ForeachFlow").latest_successful_run
    run.data.total                       # the end step's artifacts (and the parameters)
    [t.data.value for t in run["square"]]

Everything is synchronous, safe to call inside Jupyter's running loop too (see
:func:`~millstream.client.datastore_view.run_sync`).

Orders follow Metaflow's: children come newest first, so a flow yields its latest run
first and a run its ``end`` step first, and ``Step.task`` is the first task iterated.

Namespaces are tags, as in Metaflow. Every run carries the system tag
``user:<owner>`` (its owner is the OS account that submitted it) besides its
``--tag`` tags. The default namespace is ``user:<your account>``; ``namespace(None)``
shows every run. Objects keep the namespace in force when they were made, and their
children inherit it.

Errors::

    MillstreamError
    ├── MetaflowNotFound (also KeyError)     no object has this pathspec
    │   └── MetaflowNamespaceMismatch         it exists, outside the current namespace
    └── PathspecError (also ValueError)
        └── MetaflowInvalidPathspec           the pathspec is malformed
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, ClassVar

from millstream.client.datastore_view import (
    AttemptOutcome,
    RunProgress,
    RunReader,
    RunRecord,
    TaskEntry,
    TaskFailure,
    configured_reader,
)
from millstream.client.datastore_view import run_sync as _call
from millstream.client.pathspec import PathspecError
from millstream.datastore import layout
from millstream.datastore.artifacts import ArtifactRef, serialize, type_name
from millstream.errors import DatastoreError, MillstreamError

__all__ = [
    "DataArtifact", "Flow", "Metaflow", "MetaflowData", "MetaflowInvalidPathspec",
    "MetaflowNamespaceMismatch", "MetaflowNotFound", "MetaflowObject", "Run", "Step", "Task",
    "TaskFailure", "default_namespace", "get_namespace", "namespace", "use_reader",
]

# ----------------------------------------------------------------- errors


class MetaflowNotFound(MillstreamError, KeyError):
    """No flow, run, step, task or artifact exists under the pathspec."""

    def __init__(self, message: str, pathspec: str | None = None) -> None:
        super().__init__(message)
        self.pathspec = pathspec

    def __str__(self) -> str:
        # KeyError would print the message in quotes.
        return str(self.args[0])


class MetaflowNamespaceMismatch(MetaflowNotFound):
    """The object exists but belongs to no run of the current namespace."""


class MetaflowInvalidPathspec(PathspecError):
    """A pathspec does not have the shape the object needs, or a part is not a valid name."""


# ----------------------------------------------------------------- the reader


_override: RunReader | None = None


def use_reader(reader: RunReader | None) -> None:
    """Make every new object read through ``reader``; None goes back to the configured datastore."""
    global _override  # noqa: PLW0603 - a process-wide switch, like namespace()
    _override = reader


def _reader() -> RunReader:
    """The reader new objects use: the override, else the datastore the settings name now."""
    return _override if _override is not None else configured_reader(os.environ)


# ----------------------------------------------------------------- namespaces


class _Unset:
    """The namespace before the first call that needs it: the default is chosen lazily."""


_namespace: str | _Unset | None = _Unset()


def namespace(ns: str | None) -> str | None:
    """Show only runs tagged ``ns`` (``user:<name>``, or any tag) from now on; None shows all."""
    global _namespace  # noqa: PLW0603 - Metaflow's namespace is process-wide
    if ns is not None and not isinstance(ns, str):
        raise TypeError(f"a namespace is a tag string or None, not {type(ns).__name__}")
    _namespace = ns
    return get_namespace()


def get_namespace() -> str | None:
    """The namespace objects are filtered by now."""
    ns = _namespace
    if isinstance(ns, _Unset):
        return default_namespace()
    return ns


def default_namespace() -> str:
    """Go back to the default namespace, ``user:<your OS account>``, and return it."""
    global _namespace  # noqa: PLW0603 - Metaflow's namespace is process-wide
    from millstream.flow.current import current

    # Inside a running task, the run's own namespace, as in Metaflow.
    ns = current.namespace if current.is_running_flow and current.namespace else f"user:{_username()}"
    _namespace = ns
    return ns


def _username() -> str:
    # The account name the daemon reads from the socket's peer and records as the owner.
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())


def _namespace_for(check: bool, given: str | None) -> str | None:
    """The namespace a new object is checked against; None for no check."""
    if not check:
        return None
    return given or get_namespace()


def _run_tags(record: RunRecord) -> tuple[frozenset[str], frozenset[str]]:
    """``(user tags, system tags)`` of a run."""
    system = frozenset({f"user:{record.owner}"} if record.owner else ())
    return frozenset(record.tags), system


def _visible(record: RunRecord, ns: str | None) -> bool:
    if ns is None:
        return True
    user, system = _run_tags(record)
    return ns in user or ns in system


def _mismatch(kind: str, pathspec: str, record: RunRecord, ns: str | None) -> MetaflowNamespaceMismatch:
    return MetaflowNamespaceMismatch(
        f"{kind}('{pathspec}') is not in namespace {ns!r}: its run belongs to {record.owner or 'nobody'!r}"
        f"{' with tags ' + ', '.join(record.tags) if record.tags else ''}; "
        "call namespace(None) to see every run", pathspec)


# ----------------------------------------------------------------- pathspecs


_SHAPES = {
    1: "Flow('FlowName')",
    2: "Run('FlowName/RunID')",
    3: "Step('FlowName/RunID/StepName')",
    4: "Task('FlowName/RunID/StepName/TaskID')",
    5: "DataArtifact('FlowName/RunID/StepName/TaskID/ArtifactName')",
}


def _check_artifact_name(name: str) -> str:
    if not name.isidentifier():
        raise DatastoreError(f"invalid artifact name {name!r}: must be a Python identifier")
    return name


_CHECKS = (layout.check_flow, layout.check_run_id, layout.check_step, layout.check_task_id,
           _check_artifact_name)


def _parse(pathspec: object, parts: int) -> list[str]:
    """Split a pathspec of exactly ``parts`` parts and validate each; raise MetaflowInvalidPathspec."""
    if not isinstance(pathspec, str):
        raise MetaflowInvalidPathspec(
            f"a pathspec is a string such as {_SHAPES[parts]}, not {type(pathspec).__name__}")
    ids = pathspec.split("/")
    if len(ids) != parts:
        raise MetaflowInvalidPathspec(
            f"pathspec {pathspec!r} has {len(ids)} part{'s' if len(ids) != 1 else ''}; expected {_SHAPES[parts]}")
    for check, part in zip(_CHECKS[:parts], ids, strict=True):
        try:
            check(part)
        except DatastoreError as exc:
            raise MetaflowInvalidPathspec(f"pathspec {pathspec!r}: {exc}") from None
    return ids


def _check_attempt(attempt: object) -> int | None:
    if attempt is None:
        return None
    if isinstance(attempt, bool) or not isinstance(attempt, (int, str)):
        raise ValueError(f"attempt must be an int >= 0, not {attempt!r}")
    try:
        number = int(attempt)
    except ValueError:
        raise ValueError(f"attempt must be an int >= 0, not {attempt!r}") from None
    if number < 0:
        raise ValueError(f"attempt must be an int >= 0, not {attempt!r}")
    return number


def _datetime(ts: float | None) -> datetime | None:
    # Naive local time, as Metaflow's client returns.
    return datetime.fromtimestamp(ts) if ts is not None else None


def _restore(cls_name: str, pathspec: str, attempt: int | None) -> MetaflowObject:
    """Rebuild a pickled object by looking it up again (without a namespace check)."""
    if cls_name == "Task":
        return Task(pathspec, attempt, _namespace_check=False)
    if cls_name == "DataArtifact":
        return DataArtifact(pathspec, attempt, _namespace_check=False)
    if cls_name == "Flow":
        return Flow(pathspec, _namespace_check=False)
    if cls_name == "Run":
        return Run(pathspec, _namespace_check=False)
    return Step(pathspec, _namespace_check=False)


# ----------------------------------------------------------------- objects


class MetaflowObject:
    """What every client object has: an id, a pathspec, tags and a parent."""

    _NAME: ClassVar[str] = "object"
    id: str
    _pathspec: str
    _reader: RunReader
    _ns: str | None
    _run: Run | None = None  # the run this object belongs to (itself for a run)
    _attempt: int | None = None

    @property
    def pathspec(self) -> str:
        """``Flow/run/step/task/artifact``, as far as this object goes."""
        return self._pathspec

    @property
    def path_components(self) -> list[str]:
        """The parts of the pathspec."""
        return self.pathspec.split("/")

    @property
    def parent(self) -> MetaflowObject | None:
        """The object this one belongs to (None for a flow)."""
        return None

    @property
    def tags(self) -> frozenset[str]:
        """Every tag of the run this object belongs to: user and system tags."""
        return self.user_tags | self.system_tags

    @property
    def user_tags(self) -> frozenset[str]:
        """The run's tags given with ``--tag``."""
        return _run_tags(self._run._record)[0] if self._run is not None else frozenset()

    @property
    def system_tags(self) -> frozenset[str]:
        """The tags millstream gives the run: ``user:<owner>``."""
        return _run_tags(self._run._record)[1] if self._run is not None else frozenset()

    @property
    def created_at(self) -> datetime | None:
        """When the object came to be."""
        return None

    @property
    def origin_pathspec(self) -> str | None:
        """The object this one was resumed from, if it was."""
        return None

    def is_in_namespace(self) -> bool:
        """Whether the object is visible in the current namespace."""
        ns = get_namespace()
        return ns is None or ns in self.tags

    def __repr__(self) -> str:
        if self._attempt is not None:
            return f"{type(self).__name__}('{self.pathspec}', attempt={self._attempt})"
        return f"{type(self).__name__}('{self.pathspec}')"

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (type(self).__name__, self.pathspec, self._attempt)


class Metaflow:
    """Entry point: every flow with a run in the current namespace."""

    def __init__(self) -> None:
        self._reader = _reader()
        self._ns = get_namespace()

    @property
    def flows(self) -> list[Flow]:
        """The flows with at least one run in the current namespace."""
        return list(self)

    def __iter__(self) -> Iterator[Flow]:
        for name, run_ids in _call(self._reader.runs_by_flow()).items():
            flow = Flow._of(self._reader, name, self._ns)
            if self._ns is None or flow._first_visible(run_ids) is not None:
                yield flow

    def __getitem__(self, name: str) -> Flow:
        return Flow(name, _current_namespace=self._ns, _namespace_check=self._ns is not None)

    def __repr__(self) -> str:
        return "Metaflow()"


class Flow(MetaflowObject):
    """Every run of one flow class, newest first."""

    _NAME = "flow"

    def __init__(self, name: str, *, _namespace_check: bool = True, _current_namespace: str | None = None) -> None:
        (flow,) = _parse(name, 1)
        self._setup(_reader(), flow, _namespace_for(_namespace_check, _current_namespace))
        run_ids = _call(self._reader.run_ids(flow))
        if not run_ids:
            raise MetaflowNotFound(f"Flow('{flow}') does not exist: no run of it is recorded", flow)
        if self._ns is not None and self._first_visible(run_ids) is None:
            raise MetaflowNamespaceMismatch(
                f"Flow('{flow}') has no run in namespace {self._ns!r}; call namespace(None) to see every run", flow)

    @classmethod
    def _of(cls, reader: RunReader, name: str, ns: str | None) -> Flow:
        flow = cls.__new__(cls)
        flow._setup(reader, name, ns)
        return flow

    def _setup(self, reader: RunReader, name: str, ns: str | None) -> None:
        self._reader = reader
        self._ns = ns
        self.id = self._pathspec = name

    def _first_visible(self, run_ids: Iterable[str], ns: str | None = None) -> RunRecord | None:
        ns = self._ns if ns is None else ns
        for record in self._records(run_ids):
            if _visible(record, ns):
                return record
        return None

    def _records(self, run_ids: Iterable[str]) -> Iterator[RunRecord]:
        for run_id in run_ids:
            record = _call(self._reader.run(self.id, run_id))
            if record is not None:
                yield record

    def __iter__(self) -> Iterator[Run]:
        """The flow's runs in the namespace, newest first; each costs one small read."""
        for record in self._records(_call(self._reader.run_ids(self.id))):
            if _visible(record, self._ns):
                yield Run._of(self._reader, record, self._ns)

    def runs(self, *tags: str) -> Iterator[Run]:
        """The runs that have every one of ``tags``, newest first."""
        return (run for run in self if all(tag in run.tags for tag in tags))

    @property
    def latest_run(self) -> Run | None:
        """The newest run, finished or not."""
        return next(iter(self), None)

    @property
    def latest_successful_run(self) -> Run | None:
        """The newest run whose end step succeeded."""
        return next((run for run in self if run.successful), None)

    def __getitem__(self, run_id: str) -> Run:
        try:
            layout.check_run_id(str(run_id))
        except DatastoreError as exc:
            raise MetaflowNotFound(f"Run('{self.id}/{run_id}') does not exist: {exc}", f"{self.id}/{run_id}") from None
        return Run._lookup(self._reader, self.id, str(run_id), self._ns, "Run", f"{self.id}/{run_id}")

    def __contains__(self, run_id: object) -> bool:
        try:
            self[str(run_id)]
        except MetaflowNotFound:
            return False
        return True

    def is_in_namespace(self) -> bool:
        """Whether the flow has a run in the current namespace."""
        ns = get_namespace()
        return ns is None or self._first_visible(_call(self._reader.run_ids(self.id)), ns) is not None

    def _ipython_key_completions_(self) -> list[str]:
        return [run.id for run in self]


class Run(MetaflowObject):
    """One run of a flow: its steps, newest first, and the end step's data."""

    _NAME = "run"
    _record: RunRecord
    _final: RunProgress | None
    _param_values: dict[str, Any] | None

    def __init__(self, pathspec: str, *, _namespace_check: bool = True,
                 _current_namespace: str | None = None) -> None:
        flow, run_id = _parse(pathspec, 2)
        ns = _namespace_for(_namespace_check, _current_namespace)
        found = Run._lookup(_reader(), flow, run_id, ns, "Run", pathspec)
        self.__dict__.update(found.__dict__)
        self._run = self

    @classmethod
    def _lookup(cls, reader: RunReader, flow: str, run_id: str, ns: str | None, kind: str, pathspec: str) -> Run:
        """The run, for looking up the ``kind`` object at ``pathspec`` in it."""
        record = _call(reader.run(flow, run_id))
        if record is None:
            raise MetaflowNotFound(f"{kind}('{pathspec}') does not exist: run {flow}/{run_id} is not recorded",
                                   pathspec)
        if not _visible(record, ns):
            raise _mismatch(kind, pathspec, record, ns)
        return cls._of(reader, record, ns)

    @classmethod
    def _of(cls, reader: RunReader, record: RunRecord, ns: str | None) -> Run:
        run = cls.__new__(cls)
        run._reader = reader
        run._ns = ns
        run._record = record
        run._run = run
        run.id = record.run_id
        run._pathspec = f"{record.flow}/{record.run_id}"
        run._final = None
        run._param_values = None
        return run

    # ----------------------------------------------------------------- what the run record says
    @property
    def parent(self) -> Flow:
        """The run's flow."""
        return Flow._of(self._reader, self._record.flow, self._ns)

    @property
    def user(self) -> str:
        """The OS account that started the run."""
        return self._record.owner

    @property
    def created_at(self) -> datetime | None:
        """When the daemon accepted the run."""
        return _datetime(self._record.created_at)

    @property
    def origin_pathspec(self) -> str | None:
        """``Flow/run`` of the run this one resumed, if it did."""
        origin = self._record.origin_run_id
        return f"{self._record.flow}/{origin}" if origin else None

    @property
    def code(self) -> None:
        """Not available yet: the code package is not exposed through the client."""
        return None

    @property
    def trigger(self) -> None:
        """Not available yet: runs are not started by events."""
        return None

    # ----------------------------------------------------------------- scheduler state
    def _progress(self) -> RunProgress | None:
        if self._final is not None:
            return self._final
        progress = _call(self._reader.progress(self._record.flow, self.id))
        if progress is not None and progress.finished:
            self._final = progress  # an ended run's checkpoint no longer changes
        return progress

    def _steps(self) -> dict[str, list[TaskEntry]]:
        """Each step that has tasks, in the order its first task was created."""
        steps: dict[str, list[TaskEntry]] = {}
        progress = self._progress()
        for entry in progress.tasks if progress else ():
            # A task exists once an attempt was launched; planned tasks are not shown.
            if entry.attempts:
                steps.setdefault(entry.step, []).append(entry)
        return steps

    def _params(self) -> dict[str, Any]:
        if self._param_values is None:
            from millstream.flow.parameters import decode_value

            raw = _call(self._reader.params(self._record.flow, self.id))
            self._param_values = {name: decode_value(value) for name, value in raw.items()}
        return self._param_values

    @property
    def status(self) -> str:
        """``running``, ``ok``, ``failed`` or ``cancelled`` (millstream's, not Metaflow's)."""
        progress = self._progress()
        return progress.status if progress else "running"

    @property
    def message(self) -> str | None:
        """Why the run failed or was cancelled (millstream's, not Metaflow's)."""
        progress = self._progress()
        return progress.message if progress else None

    @property
    def end_task(self) -> Task | None:
        """The end step's task, once it has started."""
        # The end step runs once, outside any foreach, so its task is always "0".
        return Task._find(self, "end", "0")

    @property
    def data(self) -> MetaflowData | None:
        """The end step's artifacts (None before it runs): ``run.data.name``."""
        end = self.end_task
        return end.data if end else None

    @property
    def successful(self) -> bool:
        """True if the end step succeeded."""
        end = self.end_task
        return end.successful if end else False

    @property
    def finished(self) -> bool:
        """True if the end step finished (a failed or cancelled run never does)."""
        end = self.end_task
        return end.finished if end else False

    @property
    def finished_at(self) -> datetime | None:
        """When the end step finished."""
        end = self.end_task
        return end.finished_at if end else None

    # ----------------------------------------------------------------- steps
    def __iter__(self) -> Iterator[Step]:
        """The steps that ran, the last one first."""
        for name in reversed(list(self._steps())):
            yield Step._of(self, name)

    def steps(self, *tags: str) -> Iterator[Step]:
        """The steps, if the run has every one of ``tags``."""
        return (step for step in self if all(tag in step.tags for tag in tags))

    def __getitem__(self, name: str) -> Step:
        if name not in self._steps():
            raise MetaflowNotFound(f"Step('{self.pathspec}/{name}') does not exist: no task of it has run",
                                   f"{self.pathspec}/{name}")
        return Step._of(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self._steps()

    def _ipython_key_completions_(self) -> list[str]:
        return list(self._steps())


class Step(MetaflowObject):
    """One step of a run: its tasks, the last created first."""

    _NAME = "step"
    _run: Run

    def __init__(self, pathspec: str, *, _namespace_check: bool = True,
                 _current_namespace: str | None = None) -> None:
        flow, run_id, name = _parse(pathspec, 3)
        ns = _namespace_for(_namespace_check, _current_namespace)
        run = Run._lookup(_reader(), flow, run_id, ns, "Step", pathspec)
        self.__dict__.update(run[name].__dict__)

    @classmethod
    def _of(cls, run: Run, name: str) -> Step:
        step = cls.__new__(cls)
        step._run = run
        step._reader = run._reader
        step._ns = run._ns
        step.id = name
        step._pathspec = f"{run.pathspec}/{name}"
        return step

    def _entries(self) -> list[TaskEntry]:
        return self._run._steps().get(self.id, [])

    @property
    def parent(self) -> Run:
        """The step's run."""
        return self._run

    @property
    def created_at(self) -> datetime | None:
        """When the step's first task started."""
        times = [e.started_at for e in self._entries() if e.started_at is not None]
        return _datetime(min(times)) if times else None

    @property
    def finished_at(self) -> datetime | None:
        """When the step's last task finished; None while any task has not."""
        times = [task.finished_at for task in self]
        if not times or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)

    def __iter__(self) -> Iterator[Task]:
        """The step's tasks, the last created first (for a foreach: the last split first)."""
        for entry in reversed(self._entries()):
            yield Task._of(self._run, entry)

    def tasks(self, *tags: str) -> Iterator[Task]:
        """The tasks, if the run has every one of ``tags``."""
        return (task for task in self if all(tag in task.tags for tag in tags))

    @property
    def task(self) -> Task | None:
        """The first task iterated: the only one of a step outside a foreach."""
        return next(iter(self), None)

    def __getitem__(self, task_id: str) -> Task:
        for entry in self._entries():
            if entry.task_id == str(task_id):
                return Task._of(self._run, entry)
        raise MetaflowNotFound(f"Task('{self.pathspec}/{task_id}') does not exist", f"{self.pathspec}/{task_id}")

    def __contains__(self, task_id: object) -> bool:
        return any(entry.task_id == str(task_id) for entry in self._entries())

    def _ipython_key_completions_(self) -> list[str]:
        return [entry.task_id for entry in self._entries()]


class Task(MetaflowObject):
    """One task of a step: its artifacts, logs and outcome, for its latest attempt by default."""

    _NAME = "task"
    _run: Run
    _step: str
    _entry: TaskEntry | None
    _latest: int
    _outcomes: dict[int, AttemptOutcome]
    _artifact_cache: dict[str, DataArtifact] | None

    def __init__(self, pathspec: str, attempt: int | None = None, *, _namespace_check: bool = True,
                 _current_namespace: str | None = None) -> None:
        flow, run_id, step, task_id = _parse(pathspec, 4)
        number = _check_attempt(attempt)
        ns = _namespace_for(_namespace_check, _current_namespace)
        run = Run._lookup(_reader(), flow, run_id, ns, "Task", pathspec)
        task = Task._find(run, step, task_id, number)
        if task is None:
            which = f"Task('{pathspec}', attempt={number})" if number is not None else f"Task('{pathspec}')"
            raise MetaflowNotFound(f"{which} does not exist: no attempt of it has started", pathspec)
        self.__dict__.update(task.__dict__)

    @classmethod
    def _of(cls, run: Run, entry: TaskEntry) -> Task:
        return cls._make(run, entry.step, entry.task_id, None, entry, entry.attempts - 1)

    @classmethod
    def _find(cls, run: Run, step: str, task_id: str, attempt: int | None = None) -> Task | None:
        """The task if any of its attempts left a record (and ``attempt`` is one of them)."""
        found = _call(run._reader.attempts(run._record.flow, run.id, step, task_id))
        if not found or (attempt is not None and attempt not in found):
            return None
        return cls._make(run, step, task_id, attempt, None, found[-1])

    @classmethod
    def _make(cls, run: Run, step: str, task_id: str, attempt: int | None, entry: TaskEntry | None,
              latest: int) -> Task:
        task = cls.__new__(cls)
        task._run = run
        task._reader = run._reader
        task._ns = run._ns
        task._step = step
        task.id = task_id
        task._pathspec = f"{run.pathspec}/{step}/{task_id}"
        task._attempt = attempt
        task._entry = entry
        task._latest = latest
        task._outcomes = {}
        task._artifact_cache = None
        return task

    def _key(self) -> tuple[str, str, str, str]:
        return self._run._record.flow, self._run.id, self._step, self.id

    def _outcome(self, attempt: int | None = None) -> AttemptOutcome | None:
        number = self.current_attempt if attempt is None else attempt
        if number not in self._outcomes:
            outcome = _call(self._reader.outcome(*self._key(), number))
            if outcome is None:
                return None  # still running: ask again next time
            self._outcomes[number] = outcome  # done markers are written once
        return self._outcomes[number]

    @property
    def parent(self) -> Step:
        """The task's step."""
        return Step._of(self._run, self._step)

    @property
    def origin_pathspec(self) -> str | None:
        """The same task in the run this one resumed, if it did."""
        origin = self._run.origin_pathspec
        return f"{origin}/{self._step}/{self.id}" if origin else None

    @property
    def current_attempt(self) -> int:
        """The attempt this object shows: the one asked for, else the latest started."""
        return self._attempt if self._attempt is not None else self._latest

    @property
    def index(self) -> int | None:
        """The task's index in its innermost foreach, None outside any foreach."""
        entry = self._entry
        if entry is None:
            entry = next((e for e in self._run._steps().get(self._step, []) if e.task_id == self.id), None)
        if entry is not None:
            return entry.index[-1] if entry.index else None
        outcome = self._outcome()
        stack = outcome.foreach_stack if outcome else ()
        return int(stack[-1]["index"]) if stack else None

    @property
    def created_at(self) -> datetime | None:
        """When the task's first attempt started."""
        if self._entry is not None and self._entry.started_at is not None:
            return _datetime(self._entry.started_at)
        first = self._outcome(0)
        return _datetime(first.started_at) if first else None

    @property
    def finished(self) -> bool:
        """True once the attempt ended, successfully or not."""
        return self._outcome() is not None

    @property
    def successful(self) -> bool:
        """True if the attempt succeeded."""
        outcome = self._outcome()
        return outcome is not None and outcome.status == "ok"

    @property
    def finished_at(self) -> datetime | None:
        """When the attempt ended."""
        outcome = self._outcome()
        return _datetime(outcome.finished_at) if outcome else None

    @property
    def exception(self) -> TaskFailure | None:
        """What failed the attempt (its type, message and traceback), None if nothing did."""
        outcome = self._outcome()
        return outcome.exception if outcome else None

    @property
    def stdout(self) -> str:
        """The attempt's standard output, stored when it ended."""
        return self._log("stdout")

    @property
    def stderr(self) -> str:
        """The attempt's standard error, stored when it ended."""
        return self._log("stderr")

    def _log(self, stream: str) -> str:
        data = _call(self._reader.log(*self._key(), self.current_attempt, stream))
        return data.decode("utf-8", errors="replace")

    # ----------------------------------------------------------------- artifacts
    def _artifacts(self) -> dict[str, DataArtifact]:
        """Every artifact by name: the run's parameters, then what the attempt stored."""
        if self._artifact_cache is not None:
            return self._artifact_cache
        outcome = self._outcome()
        found = {name: DataArtifact._param(self, name, value) for name, value in self._run._params().items()}
        for name, ref in (outcome.artifacts if outcome else {}).items():
            found[name] = DataArtifact._stored(self, name, ref)
        artifacts = dict(sorted(found.items()))
        if outcome is not None:
            self._artifact_cache = artifacts
        return artifacts

    @property
    def data(self) -> MetaflowData:
        """The artifacts' values by attribute: ``task.data.name`` (each loaded on first use)."""
        return MetaflowData(self)

    @property
    def artifacts(self) -> tuple[DataArtifact, ...]:
        """The artifacts as a named tuple of :class:`DataArtifact`: ``task.artifacts.name.sha``."""
        arts = list(self)
        fields = namedtuple("MetaflowArtifacts", [a.id for a in arts], rename=True)  # type: ignore[misc]
        return fields._make(arts)

    def __iter__(self) -> Iterator[DataArtifact]:
        """The artifacts, except private ones (names starting with ``_``)."""
        return (art for name, art in self._artifacts().items() if not name.startswith("_"))

    def __getitem__(self, name: str) -> DataArtifact:
        art = self._artifacts().get(name)
        if art is None:
            raise MetaflowNotFound(f"DataArtifact('{self.pathspec}/{name}') does not exist",
                                   f"{self.pathspec}/{name}")
        return art

    def __contains__(self, name: object) -> bool:
        return name in self._artifacts()

    def _ipython_key_completions_(self) -> list[str]:
        return list(self._artifacts())


class DataArtifact(MetaflowObject):
    """One named value a task stored (or a parameter of its run); loaded on first ``.data``."""

    _NAME = "artifact"
    _task: Task
    _ref: ArtifactRef | None
    _value: Any
    _loaded: bool

    def __init__(self, pathspec: str, attempt: int | None = None, *, _namespace_check: bool = True,
                 _current_namespace: str | None = None) -> None:
        parts = _parse(pathspec, 5)
        task = Task("/".join(parts[:4]), attempt, _namespace_check=_namespace_check,
                    _current_namespace=_current_namespace)
        self.__dict__.update(task[parts[4]].__dict__)

    @classmethod
    def _stored(cls, task: Task, name: str, ref: ArtifactRef) -> DataArtifact:
        art = cls._new(task, name)
        art._ref = ref
        return art

    @classmethod
    def _param(cls, task: Task, name: str, value: Any) -> DataArtifact:
        art = cls._new(task, name)
        art._value = value
        art._loaded = True
        return art

    @classmethod
    def _new(cls, task: Task, name: str) -> DataArtifact:
        art = cls.__new__(cls)
        art._task = task
        art._run = task._run
        art._reader = task._reader
        art._ns = task._ns
        art._attempt = task._attempt
        art.id = name
        art._pathspec = f"{task.pathspec}/{name}"
        art._ref = None
        art._value = None
        art._loaded = False
        return art

    @property
    def data(self) -> Any:
        """The value, unpickled from the datastore on first use."""
        if not self._loaded:
            assert self._ref is not None
            self._value = _call(self._reader.artifact(self._task._run._record.flow, self._ref.sha))
            self._loaded = True
        return self._value

    @property
    def sha(self) -> str:
        """The artifact's id: the sha256 of its pickle."""
        if self._ref is not None:
            return self._ref.sha
        return serialize(self._value)[0]

    @property
    def size(self) -> int:
        """The stored size in bytes."""
        if self._ref is not None:
            return self._ref.size
        return len(serialize(self._value)[1])

    @property
    def type_name(self) -> str:
        """``module.QualName`` of the value's type (just the name for builtins)."""
        return self._ref.type_name if self._ref is not None else type_name(self._value)

    @property
    def parent(self) -> Task:
        """The task that stored the artifact."""
        return self._task

    @property
    def finished_at(self) -> datetime | None:
        """When the task that stored it finished."""
        return self._task.finished_at

    @property
    def created_at(self) -> datetime | None:
        """Alias of :attr:`finished_at`, as in Metaflow."""
        return self.finished_at


class MetaflowData:
    """A task's artifacts by attribute: ``task.data.name``; ``"name" in task.data``."""

    def __init__(self, task: Task) -> None:
        self._artifacts = {art.id: art for art in task}

    def __getattr__(self, name: str) -> Any:
        artifacts = self.__dict__.get("_artifacts", {})
        if name not in artifacts:
            raise AttributeError(f"no artifact named {name!r}; the task has: {', '.join(artifacts) or 'none'}")
        return artifacts[name].data

    def __contains__(self, name: object) -> bool:
        return name in self._artifacts

    def __dir__(self) -> list[str]:
        return sorted(self._artifacts)

    def __repr__(self) -> str:
        return f"<MetaflowData: {', '.join(self._artifacts)}>"
