"""The compute backend protocol: launch, wait for, cancel and re-attach attempts.

A handle is the JSON a backend returns from :meth:`ComputeBackend.launch`; it is
checkpointed, and its ``"backend"`` key (absent for local processes) names the backend
that owns it, so a restarted daemon routes it back (:mod:`millstream.compute.router`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from millstream.task.spec import TaskSpec


@dataclass(frozen=True)
class LaunchRequest:
    """One attempt to start, with where its output goes and what it needs."""

    spec: TaskSpec
    stdout_path: str
    stderr_path: str
    python: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # the submitter's working directory (default: the code package)
    cpu: float = 0.5
    memory_mb: int = 0
    timeout_s: float | None = None
    owner_uid: int | None = None  # the submitting user's uid, whom a local task runs as where it can
    gpu: int = 0
    package: str = ""  # the code package's sha (a Batch container fetches it)
    # Set for a step that runs on AWS Batch: its @batch attributes (see compute/batch.py).
    batch: dict[str, Any] | None = None
    # The splits of one foreach that may share one Batch array job: the group's key and
    # how many members it has.
    array_key: str | None = None
    array_size: int = 0


@dataclass(frozen=True)
class ExitReason:
    """Why an attempt ended, as its backend saw it (beyond the exit code)."""

    message: str
    kind: str | None = None  # "user" or "infra": what the scheduler should take it for


class ComputeBackend(Protocol):
    """What the daemon needs of a place that runs attempts."""

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Start the attempt; returns its handle (JSON, checkpointed)."""

    async def wait(self, handle: dict[str, Any]) -> int | None:
        """Wait for the attempt to end; its exit code, or None where it is unknown."""

    def exit_reason(self, handle: dict[str, Any]) -> ExitReason | None:
        """After :meth:`wait` returned: the backend's account of the end, if it has one."""

    async def cancel(self, handle: dict[str, Any], *, grace_s: float) -> None:
        """Stop the attempt: politely, then for good after ``grace_s``."""

    async def reattach(self, handle: dict[str, Any]) -> bool:
        """After a daemon restart: is the attempt behind this handle still running?"""

    async def close(self) -> None:
        """Release what the backend holds (running attempts carry on)."""
