"""What the metadata store records: runs, tasks, attempts, artifacts, tags, metadata.

Plain frozen dataclasses with JSON forms (``to_dict``/``from_dict``), shared by the
embedded SQLite store, the metadata service and its HTTP client.

Statuses: a run is ``running``, ``ok``, ``failed`` or ``cancelled``; a task and an
attempt are ``pending``, ``running``, ``ok``, ``failed`` or ``cancelled``. A run whose
heartbeat is older than the store's ``dead_after_s`` while ``running`` is reported as
``failed`` with the message "the daemon driving this run stopped sending heartbeats".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

RUN_STATUSES = ("running", "ok", "failed", "cancelled")
TASK_STATUSES = ("pending", "running", "ok", "failed", "cancelled")
DEAD_RUN_MESSAGE = "the daemon driving this run stopped sending heartbeats"

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class RunRecord:
    """One run of a flow."""

    flow: str
    run_id: str
    user: str
    status: str = "running"
    created_at: float = 0.0
    finished_at: float | None = None
    heartbeat_at: float | None = None
    message: str | None = None
    tags: tuple[str, ...] = ()
    system_tags: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    daemon_id: str | None = None
    origin_run_id: str | None = None

    @property
    def pathspec(self) -> str:
        """``flow/run_id``."""
        return f"{self.flow}/{self.run_id}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = dict(self.__dict__)
        d["tags"], d["system_tags"] = list(self.tags), list(self.system_tags)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["tags"] = tuple(data.get("tags") or ())
        data["system_tags"] = tuple(data.get("system_tags") or ())
        return _from_dict(cls, data)


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt of a task."""

    attempt: int
    status: str = "running"
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    message: str | None = None
    handle: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttemptRecord:
        """Inverse of :meth:`to_dict`."""
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TaskRecord:
    """One task of a run, with its attempts in order."""

    flow: str
    run_id: str
    step: str
    task_id: str
    status: str = "pending"
    foreach_index: tuple[int, ...] = ()
    parents: tuple[str, ...] = ()  # "step/task_id" of the tasks it started from
    attempts: tuple[AttemptRecord, ...] = ()
    origin: str | None = None  # "flow/run/step/task" of the task a resume cloned
    created_at: float = 0.0

    @property
    def pathspec(self) -> str:
        """``flow/run/step/task``."""
        return f"{self.flow}/{self.run_id}/{self.step}/{self.task_id}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = dict(self.__dict__)
        d["foreach_index"], d["parents"] = list(self.foreach_index), list(self.parents)
        d["attempts"] = [a.to_dict() for a in self.attempts]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["foreach_index"] = tuple(data.get("foreach_index") or ())
        data["parents"] = tuple(data.get("parents") or ())
        data["attempts"] = tuple(AttemptRecord.from_dict(a) for a in data.get("attempts") or ())
        return _from_dict(cls, data)


@dataclass(frozen=True)
class ArtifactRecord:
    """One artifact of an attempt: where its bytes are in the datastore."""

    name: str
    sha: str
    size: int
    type_name: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactRecord:
        """Inverse of :meth:`to_dict`."""
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next_cursor`` back for the next one (None: the last)."""

    items: list[T]
    next_cursor: str | None = None
