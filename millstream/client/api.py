"""The notebook Client API: Metaflow's ``Metaflow``, ``Flow``, ``Run``, ``Step``, ``Task``, ``DataArtifact``.

Results of past and running runs, in the shape Metaflow's client has::

    from millstream import Flow, namespace
    run = Flow("ForeachFlow").latest_successful_run
    run.data.total                       # the end step's artifacts (and the parameters)
    [t.data.value for t in run["square"]]
    run.add_tag("reviewed")              # user tags; system tags never change
    task = run["square"].task
    task.stdout, task.exception, task.metadata_dict, list(task.parent_tasks)

Objects read through a :class:`~millstream.client.datastore_view.RunReader`: the
metadata store (with the datastore for artifact values, exceptions and logs) whenever
one is configured, else the datastore alone (see :func:`~millstream.client.datastore_view.reader_for`).
Everything is synchronous, safe to call inside Jupyter's running loop too (see
:func:`~millstream.client.datastore_view.run_sync`).

Orders follow Metaflow's: children come newest first, so a flow yields its latest run
first and a run its ``end`` step first, and ``Step.task`` is the first task iterated.
A flow's runs are read a page at a time (:data:`PAGE_SIZES`), so ``latest_run`` costs
one small listing and iterating 1,000 runs a handful.

Namespaces are tags, as in Metaflow. Every run carries the system tags ``user:<owner>``
(its owner is the OS account that submitted it) and ``runtime:millstream`` besides its
user tags (``--tag`` and :meth:`Run.add_tag`). The default namespace is
``user:<your account>``; ``namespace(None)`` shows every run. Objects keep the
namespace in force when they were made, and their children inherit it. Only a run's
owner (or root) may change its tags.

Errors::

    MillstreamError
    ├── MetaflowNotFound (also KeyError)     no object has this pathspec
    │   └── MetaflowNamespaceMismatch         it exists, outside the current namespace
    ├── MetaflowTaggingError                  a tag change that is not allowed, or a bad tag
    └── PathspecError (also ValueError)
        └── MetaflowInvalidPathspec           the pathspec is malformed
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections import namedtuple
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from millstream.client.datastore_view import (
    CLONE_FIELDS,
    FINAL_STATUSES,
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
from millstream.errors import ApiError, DatastoreError, MetadataError, MillstreamError

if TYPE_CHECKING:
    from millstream.config.settings import Settings

__all__ = [
    "DataArtifact", "Flow", "Metadata", "Metaflow", "MetaflowData", "MetaflowInvalidPathspec",
    "MetaflowNamespaceMismatch", "MetaflowNotFound", "MetaflowObject", "MetaflowTaggingError", "Run", "Step",
    "Task", "TaskFailure", "default_namespace", "get_namespace", "namespace", "use_reader",
]

# A flow's runs are listed a page at a time, each page ten times the last up to the stores'
# largest (1,000): ``latest_run`` reads one run, iterating 1,000 runs takes four pages, and
# a reader that pays per run (the datastore alone) never reads ten times what is used.
PAGE_SIZES = (1, 10, 100, 1000)
MAX_TAG_LENGTH = 500  # characters, as Metaflow's limit

Metadata = namedtuple("Metadata", ["name", "value", "created_at", "type", "task"])
Metadata.__doc__ = "One metadata field of a task, as Metaflow's: created_at in epoch milliseconds."

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


class MetaflowTaggingError(MillstreamError):
    """A tag change that is not allowed (a system tag, someone else's run) or a malformed tag."""


class MetaflowInvalidPathspec(PathspecError):
    """A pathspec does not have the shape the object needs, or a part is not a valid name."""


# ----------------------------------------------------------------- the reader


_override: RunReader | None = None
_override_settings: Settings | None = None


def use_reader(reader: RunReader | None, *, settings: Settings | None = None) -> None:
    """Make every new object read through ``reader``; None goes back to the configured datastore.

    ``settings`` name the daemon that mediates changes (tags) for that reader;
    without them, changes go to the reader's store directly.
    """
    global _override, _override_settings  # noqa: PLW0603 - a process-wide switch, like namespace()
    _override = reader
    _override_settings = settings if reader is not None else None


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


def _may_retag(owner: str) -> bool:
    """Whether this process may change the tags of ``owner``'s runs: it is the owner, or root."""
    return os.getuid() == 0 or _username() == owner


def _daemon_retag(flow: str, run_id: str, *, add: Sequence[str], remove: Sequence[str]) -> tuple[str, ...] | None:
    """Change tags through the configured daemon when one answers: the run's user tags, or None.

    On a shared host the daemon decides who may (the owner or an admin, by the
    caller's uid) and is the one writer of the metadata store; without a daemon, or
    with one that keeps another datastore or does not know the run, the change goes
    straight to the store, for the owner or root.
    """
    from millstream.client.http import DaemonClient, api_path
    from millstream.config.settings import load_settings
    from millstream.datastore.backends import store_fingerprint

    if _override is not None and _override_settings is None:
        return None
    settings = _override_settings or load_settings(os.environ)
    client = DaemonClient(settings.daemon.socket)
    health = client.health()
    if health is None or health.get("store") != store_fingerprint(dataclasses.asdict(settings.datastore)):
        return None
    try:
        _, answer = client.request("POST", api_path("runs", flow, run_id, "tags"),
                                   json_body={"add": list(add), "remove": list(remove)})
    except ApiError as exc:
        if exc.status in (400, 403):
            raise MetaflowTaggingError(exc.message) from exc
        if exc.status == 404:
            # That daemon keeps another metadata store than the one this run was read from.
            return None
        raise
    return tuple(answer["tags"])


def _namespace_for(check: bool, given: str | None) -> str | None:
    """The namespace a new object is checked against; None for no check."""
    if not check:
        return None
    return given or get_namespace()


def _run_tags(record: RunRecord) -> tuple[frozenset[str], frozenset[str]]:
    """``(user tags, system tags)`` of a run (a reader that keeps no system tags implies ``user:<owner>``)."""
    if record.system_tags is not None:
        system = frozenset(record.system_tags)
    else:
        system = frozenset({f"user:{record.owner}"} if record.owner else ())
    return frozenset(record.tags), system


def _ns_tags(ns: str | None) -> tuple[str, ...]:
    """The tags a listing filters on for namespace ``ns``."""
    return () if ns is None else (ns,)


def _check_tags(tags: Iterable[str]) -> list[str]:
    """The tags as a list, each a non-empty string of at most MAX_TAG_LENGTH characters."""
    if isinstance(tags, (str, bytes)):
        raise MetaflowTaggingError(f"tags must be a list of strings, not the string {tags!r}")
    found = list(tags)
    for tag in found:
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG_LENGTH:
            raise MetaflowTaggingError(
                f"bad tag {tag!r}: a tag is a non-empty string of at most {MAX_TAG_LENGTH} characters")
    return found


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
        """The run's user tags: given with ``--tag``, changed with :meth:`Run.add_tag` and the like."""
        return _run_tags(self._run._record)[0] if self._run is not None else frozenset()

    @property
    def system_tags(self) -> frozenset[str]:
        """The tags millstream gives the run, which never change: ``user:<owner>``, ``runtime:millstream``."""
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
        for name in _call(self._reader.flows()):
            flow = Flow._of(self._reader, name, self._ns)
            if self._ns is None or flow._first(self._ns) is not None:
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
        if self._first(self._ns) is None:
            if self._ns is None or self._first(None) is None:
                raise MetaflowNotFound(f"Flow('{flow}') does not exist: no run of it is recorded", flow)
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

    def _first(self, ns: str | None) -> RunRecord | None:
        """The newest run in namespace ``ns``: one listing of one run."""
        page = _call(self._reader.list_runs(self.id, tags=_ns_tags(ns), limit=1))
        return page.items[0] if page.items else None

    def _records(self, *tags: str) -> Iterator[RunRecord]:
        """The runs in the namespace that have every one of ``tags``, newest first, a page at a time."""
        wanted = tuple(dict.fromkeys((*_ns_tags(self._ns), *tags)))
        cursor: str | None = None
        for number in itertools.count():
            limit = PAGE_SIZES[min(number, len(PAGE_SIZES) - 1)]
            page = _call(self._reader.list_runs(self.id, tags=wanted, limit=limit, cursor=cursor))
            yield from page.items
            cursor = page.next_cursor
            if cursor is None:
                return

    def __iter__(self) -> Iterator[Run]:
        """The flow's runs in the namespace, newest first."""
        for record in self._records():
            yield Run._of(self._reader, record, self._ns)

    def runs(self, *tags: str) -> Iterator[Run]:
        """The runs in the namespace that have every one of ``tags``, newest first."""
        for record in self._records(*tags):
            yield Run._of(self._reader, record, self._ns)

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
        return ns is None or self._first(ns) is not None

    def _ipython_key_completions_(self) -> list[str]:
        return [run.id for run in self]


class Run(MetaflowObject):
    """One run of a flow: its steps, newest first, the end step's data, and its tags."""

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

    # ----------------------------------------------------------------- tags
    def add_tag(self, tag: str) -> None:
        """Add one user tag."""
        self._retag(add=_check_tags([tag]))

    def add_tags(self, tags: Iterable[str]) -> None:
        """Add user tags."""
        self._retag(add=_check_tags(tags))

    def remove_tag(self, tag: str) -> None:
        """Remove one user tag; a system tag cannot be removed."""
        self._retag(remove=_check_tags([tag]))

    def remove_tags(self, tags: Iterable[str]) -> None:
        """Remove user tags; system tags cannot be removed."""
        self._retag(remove=_check_tags(tags))

    def replace_tag(self, tag_to_remove: str, tag_to_add: str) -> None:
        """Remove one user tag, then add another."""
        self._retag(remove=_check_tags([tag_to_remove]), add=_check_tags([tag_to_add]))

    def replace_tags(self, tags_to_remove: Iterable[str], tags_to_add: Iterable[str]) -> None:
        """Remove user tags, then add others (a tag in both ends up present)."""
        self._retag(remove=_check_tags(tags_to_remove), add=_check_tags(tags_to_add))

    def _retag(self, *, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
        owner = self._record.owner
        system = sorted(set(remove) & self.system_tags)
        if system:
            raise MetaflowTaggingError(f"cannot remove system tags of Run('{self.pathspec}'): {', '.join(system)}")
        tags = _daemon_retag(self._record.flow, self.id, add=add, remove=remove)
        if tags is not None:
            self._record = dataclasses.replace(self._record, tags=tags)
            return
        if not _may_retag(owner):
            raise MetaflowTaggingError(f"only {owner or 'its owner'} (or root) may change the tags of "
                                       f"Run('{self.pathspec}'); you are {_username()}")
        record = self._record
        try:
            if remove:
                record = _call(self._reader.remove_tags(record.flow, self.id, list(remove)))
            if add:
                record = _call(self._reader.add_tags(record.flow, self.id, list(add)))
        except MetadataError as exc:
            raise MetaflowTaggingError(str(exc)) from exc
        self._record = record

    # ----------------------------------------------------------------- status
    def _fresh(self) -> RunRecord:
        """The run record, read again while the run's status can still change."""
        record = self._record
        if record.status is not None and record.status not in FINAL_STATUSES:
            fresh = _call(self._reader.run(record.flow, self.id))
            if fresh is not None:
                self._record = record = fresh
        return record

    def _progress(self) -> RunProgress | None:
        if self._final is not None:
            return self._final
        progress = _call(self._reader.progress(self._record.flow, self.id))
        if progress is not None and progress.finished:
            self._final = progress  # an ended run's tasks no longer change
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

    def _entry(self, step: str, task_id: str) -> TaskEntry | None:
        return next((e for e in self._steps().get(step, []) if e.task_id == task_id), None)

    def _params(self) -> dict[str, Any]:
        if self._param_values is None:
            from millstream.flow.parameters import decode_value

            raw = self._record.params
            if raw is None:
                raw = _call(self._reader.params(self._record.flow, self.id))
            self._param_values = {name: decode_value(value) for name, value in raw.items()}
        return self._param_values

    @property
    def status(self) -> str:
        """``running``, ``ok``, ``failed`` or ``cancelled`` (millstream's, not Metaflow's)."""
        record = self._fresh()
        if record.status is not None:
            return record.status
        progress = self._progress()
        return progress.status if progress else "running"

    @property
    def message(self) -> str | None:
        """Why the run failed or was cancelled (millstream's, not Metaflow's)."""
        record = self._fresh()
        if record.status is not None:
            return record.message
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
        if self._record.status == "ok":  # recorded only after the end step succeeded
            return True
        end = self.end_task
        return end.successful if end else False

    @property
    def finished(self) -> bool:
        """True if the end step finished (a failed or cancelled run never does)."""
        if self._record.status == "ok":
            return True
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
    """One task of a step: its artifacts, logs, metadata and outcome, for its latest attempt by default."""

    _NAME = "task"
    _run: Run
    _step: str
    _entry: TaskEntry
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
        return cls._make(run, entry, None)

    @classmethod
    def _find(cls, run: Run, step: str, task_id: str, attempt: int | None = None) -> Task | None:
        """The task if any of its attempts started (and ``attempt`` is one of them)."""
        entry = _call(run._reader.task(run._record.flow, run.id, step, task_id))
        if entry is None or not entry.attempts or (attempt is not None and entry.attempt(attempt) is None):
            return None
        return cls._make(run, entry, attempt)

    @classmethod
    def _make(cls, run: Run, entry: TaskEntry, attempt: int | None) -> Task:
        task = cls.__new__(cls)
        task._run = run
        task._reader = run._reader
        task._ns = run._ns
        task._step = entry.step
        task.id = entry.task_id
        task._pathspec = f"{run.pathspec}/{entry.step}/{entry.task_id}"
        task._attempt = attempt
        task._entry = entry
        task._outcomes = {}
        task._artifact_cache = None
        return task

    def _key(self) -> tuple[str, str, str, str]:
        return self._run._record.flow, self._run.id, self._step, self.id

    def _info(self) -> TaskEntry:
        """The task's fullest entry: a reader that lists attempts only leaves the rest to the run's table."""
        entry = self._entry
        if entry.index is None or entry.parents is None:
            entry = self._run._entry(self._step, self.id) or entry
        return entry

    def _outcome(self, attempt: int | None = None) -> AttemptOutcome | None:
        number = self.current_attempt if attempt is None else attempt
        if number not in self._outcomes:
            outcome = _call(self._reader.outcome(*self._key(), number))
            if outcome is None:
                return None  # still running: ask again next time
            self._outcomes[number] = outcome  # an attempt ends once
        return self._outcomes[number]

    @property
    def parent(self) -> Step:
        """The task's step."""
        return Step._of(self._run, self._step)

    @property
    def origin_pathspec(self) -> str | None:
        """The task a resume cloned this one from (``Flow/run/step/task``), None if it ran here."""
        info = self._info()
        if info.origin:
            return info.origin
        clone = info.attempts[-1].clone_of if info.attempts else None
        return f"{self._run._record.flow}/{clone[0]}/{self._step}/{self.id}" if clone else None

    @property
    def current_attempt(self) -> int:
        """The attempt this object shows: the one asked for, else the latest started."""
        return self._attempt if self._attempt is not None else self._entry.attempts[-1].number

    @property
    def index(self) -> int | None:
        """The task's index in its innermost foreach, None outside any foreach."""
        info = self._info()
        if info.index is not None:
            return info.index[-1] if info.index else None
        outcome = self._outcome()
        stack = outcome.foreach_stack if outcome else ()
        return int(stack[-1]["index"]) if stack else None

    # ----------------------------------------------------------------- the graph around it
    @property
    def parent_task_pathspecs(self) -> Iterator[str]:
        """Pathspecs of the tasks this one started from (none for ``start``)."""
        for parent in self._info().parents or ():
            yield f"{self._run.pathspec}/{parent}"

    @property
    def parent_tasks(self) -> Iterator[Task]:
        """The tasks this one started from: a join's are its inputs."""
        for parent in self._info().parents or ():
            step, task_id = parent.split("/", 1)
            entry = self._run._entry(step, task_id)
            task = Task._of(self._run, entry) if entry else Task._find(self._run, step, task_id)
            if task is not None:
                yield task

    @property
    def child_task_pathspecs(self) -> Iterator[str]:
        """Pathspecs of the tasks that started from this one."""
        for task in self.child_tasks:
            yield task.pathspec

    @property
    def child_tasks(self) -> Iterator[Task]:
        """The tasks that started from this one, found in the run's task table."""
        me = f"{self._step}/{self.id}"
        for entries in self._run._steps().values():
            for entry in entries:
                if me in (entry.parents or ()):
                    yield Task._of(self._run, entry)

    # ----------------------------------------------------------------- outcome
    @property
    def created_at(self) -> datetime | None:
        """When the task's first attempt started."""
        started = self._info().started_at
        if started is not None:
            return _datetime(started)
        first = self._outcome(self._entry.attempts[0].number)
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

    # ----------------------------------------------------------------- logs
    @property
    def stdout(self) -> str:
        """The attempt's standard output as stored (while it runs: what was copied so far)."""
        return self._log("stdout")

    @property
    def stderr(self) -> str:
        """The attempt's standard error as stored (while it runs: what was copied so far)."""
        return self._log("stderr")

    def loglines(self, stream: str, as_unicode: bool = True) -> Iterator[tuple[datetime | None, str | bytes]]:
        """``(timestamp, line)`` for each line of ``stream``; the timestamp is None, as for
        Metaflow's lines without one (millstream stores logs as the task wrote them)."""
        data = _call(self._reader.log(*self._key(), self.current_attempt, stream))
        for line in data.splitlines():
            yield None, (line.decode("utf-8", errors="replace") if as_unicode else line)

    def _log(self, stream: str) -> str:
        data = _call(self._reader.log(*self._key(), self.current_attempt, stream))
        return data.decode("utf-8", errors="replace")

    # ----------------------------------------------------------------- metadata
    @property
    def metadata(self) -> list[Metadata]:
        """The task's metadata, attempt by attempt up to this one's, then its free-form fields.

        Per attempt: ``attempt``, ``attempt_ok`` once it ended, ``exit_code``,
        ``attempt_message`` (why it failed, when the daemon knows), ``origin-run-id``,
        ``origin-task-id`` and ``origin-attempt`` for a task a resume cloned, and the backend
        handle's fields (``pid``, ... ; a Batch job's id). Then what ``set_metadata`` stored.
        """
        found: list[Metadata] = []

        def add(name: str, value: object, at: float | None, kind: str) -> None:
            found.append(Metadata(name, str(value), int(at * 1000) if at is not None else None, kind, self))

        info = self._info()
        for attempt in info.attempts:
            if attempt.number > self.current_attempt:
                break
            at = attempt.started_at
            add("attempt", attempt.number, at, "attempt")
            if attempt.status in FINAL_STATUSES:
                add("attempt_ok", attempt.status == "ok", attempt.finished_at or at, "internal_attempt_status")
            if attempt.exit_code is not None:
                add("exit_code", attempt.exit_code, attempt.finished_at or at, "exit_code")
            if attempt.message:
                add("attempt_message", attempt.message, attempt.finished_at or at, "attempt_message")
            clone = attempt.clone_of
            if clone is not None:
                add("origin-run-id", clone[0], at, "origin-run-id")
                add("origin-task-id", self.id, at, "origin-task-id")
                add("origin-attempt", clone[1], at, "origin-attempt")
            for name, value in (attempt.handle or {}).items():
                if name not in CLONE_FIELDS and value is not None:
                    add(name, value, at, "backend")
        created = info.created_at if info.created_at is not None else info.started_at
        for name, value in sorted(_call(self._reader.task_metadata(*self._key())).items()):
            add(name, value, created, "metadata")
        return found

    @property
    def metadata_dict(self) -> dict[str, str]:
        """The metadata as ``{name: value}``, the latest value of each name."""
        return {m.name: m.value for m in self.metadata}

    # ----------------------------------------------------------------- artifacts
    def _artifacts(self) -> dict[str, DataArtifact]:
        """Every artifact by name: the run's parameters, then what the attempt stored."""
        if self._artifact_cache is not None:
            return self._artifact_cache
        outcome = self._outcome()
        found = {name: DataArtifact._param(self, name, value) for name, value in self._run._params().items()}
        refs = outcome.artifacts if outcome else {}
        if refs is None:
            refs = _call(self._reader.artifacts(*self._key(), self.current_attempt))
        for name, ref in refs.items():
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
