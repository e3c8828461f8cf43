"""The metadata store protocol: what the daemon, the CLI and the Client API need.

Two implementations: :mod:`millstream.metadata.sqlite` (embedded, the default) and
:mod:`millstream.metadata.client` (HTTP client of the metadata service,
:mod:`millstream.metadata.service`, on PostgreSQL). Every method is idempotent where
it creates or records something: a retried call never duplicates.

Errors: :class:`millstream.errors.MetadataError` for a store that cannot answer
(``retryable`` true for a connection problem), :class:`MetadataNotFound` for a
missing run or task, :class:`MetadataConflict` for a request that contradicts what is
stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from millstream.metadata.model import ArtifactRecord, AttemptRecord, Page, RunRecord, TaskRecord


class MetadataStore(Protocol):
    """Runs, tasks, attempts, artifacts, tags and metadata of every flow."""

    async def open(self) -> None:
        """Connect, and create or migrate the schema."""

    async def close(self) -> None:
        """Release connections."""

    # ----------------------------------------------------------------- runs
    async def create_run(self, flow: str, *, user: str, params: Mapping[str, Any] | None = None,
                         tags: Sequence[str] = (), system_tags: Sequence[str] = (),
                         daemon_id: str | None = None, origin_run_id: str | None = None,
                         request_id: str | None = None, now: float | None = None) -> RunRecord:
        """Allocate the flow's next run id (monotonic per flow, never shared by two
        callers, even concurrent ones on other hosts) and record the run as running.
        A repeated call with the same ``request_id`` returns the same run."""

    async def get_run(self, flow: str, run_id: str) -> RunRecord:
        """One run; raises MetadataNotFound."""

    async def list_runs(self, *, flow: str | None = None, status: str | None = None,
                        user: str | None = None, tags: Sequence[str] = (),
                        created_after: float | None = None, created_before: float | None = None,
                        limit: int = 50, cursor: str | None = None) -> Page[RunRecord]:
        """Runs newest first (created_at, then run id), filtered; a run matches ``tags`` when it
        has all of them (user or system). Costs a bounded number of queries whatever the page size."""

    async def list_flows(self) -> list[str]:
        """Names of all flows with at least one run, sorted."""

    async def finish_run(self, flow: str, run_id: str, *, status: str, message: str | None = None,
                         now: float | None = None) -> RunRecord:
        """Record a run's end status (ok, failed, cancelled)."""

    async def heartbeat_run(self, flow: str, run_id: str, *, now: float | None = None) -> None:
        """The run's daemon is alive."""

    async def add_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Add user tags."""

    async def remove_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Remove user tags (system tags cannot be removed)."""

    # ----------------------------------------------------------------- tasks
    async def record_task(self, flow: str, run_id: str, step: str, task_id: str, *,
                          foreach_index: Sequence[int] = (), parents: Sequence[str] = (),
                          origin: str | None = None, now: float | None = None) -> None:
        """A task exists (pending). Idempotent."""

    async def record_attempt(self, flow: str, run_id: str, step: str, task_id: str,
                             attempt: AttemptRecord) -> None:
        """Create or update an attempt (its status, times, exit code, handle); the task's
        status follows its latest attempt."""

    async def get_task(self, flow: str, run_id: str, step: str, task_id: str) -> TaskRecord:
        """One task with its attempts; raises MetadataNotFound."""

    async def list_tasks(self, flow: str, run_id: str, *, step: str | None = None) -> list[TaskRecord]:
        """Every task of a run (of one step), with attempts, in a bounded number of queries."""

    # ----------------------------------------------------------------- artifacts and metadata
    async def record_artifacts(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                               artifacts: Sequence[ArtifactRecord]) -> None:
        """The artifact index of a finished attempt. Idempotent."""

    async def get_artifacts(self, flow: str, run_id: str, step: str, task_id: str,
                            attempt: int | None = None) -> list[ArtifactRecord]:
        """The artifacts of an attempt (default: the successful one, else the latest)."""

    async def set_metadata(self, flow: str, run_id: str, step: str, task_id: str,
                           fields: Mapping[str, str]) -> None:
        """Free-form string fields of a task (merged with what is there)."""

    async def get_metadata(self, flow: str, run_id: str, step: str, task_id: str) -> dict[str, str]:
        """The free-form fields of a task."""
