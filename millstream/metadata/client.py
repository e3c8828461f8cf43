"""The MetadataStore over HTTP: a client of the metadata service (:mod:`millstream.metadata.service`).

One long-lived aiohttp ``ClientSession`` (made in :meth:`ServiceMetadataStore.open`,
closed in :meth:`~ServiceMetadataStore.close`) carries ``Authorization: Bearer <key>``.
Every call of the protocol is idempotent, ``create_run`` included: it sends a
``request_id`` (a fresh one per call when the caller gives none) and reuses it on every
retry, so a POST whose answer was lost never makes a second run.

HTTP outcomes become the project's errors in one place, :func:`_raise_for`:

======================================  ==============================================
404                                     MetadataNotFound
409                                     MetadataConflict
429, 502, 503, 504, connection errors,  retried with jittered exponential backoff, then
timeouts                                MetadataError(retryable=True)
401, 403                                MetadataError (a wrong or missing API key)
other 4xx, 500                          MetadataError(retryable=False)
======================================  ==============================================

``timeout_s`` bounds each HTTP request; ``retries`` is how many more times a retryable
failure is tried, so a call gives up after about ``(retries + 1) * timeout_s`` at worst.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from millstream.errors import MetadataConflict, MetadataError, MetadataNotFound
from millstream.metadata.model import ArtifactRecord, AttemptRecord, Page, RunRecord, TaskRecord

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 2.0
MAX_CONNECTIONS = 32


def _seg(value: str) -> str:
    """One path segment, percent-encoded; the service validates the name itself."""
    if not isinstance(value, str) or not value:
        raise MetadataError(f"bad name {value!r}: a non-empty string")
    return quote(value, safe="")


def _raise_for(status: int, text: str, what: str) -> None:
    """Turn an HTTP error answer into the project's error."""
    try:
        body = json.loads(text)
        message = f"{body.get('error', 'error')}: {body.get('message', '')}"
    except (ValueError, AttributeError):
        message = f"HTTP {status}: {text[:200]}"
    if status == 404:
        raise MetadataNotFound(f"{what}: {message}")
    if status == 409:
        raise MetadataConflict(f"{what}: {message}")
    if status in (401, 403):
        raise MetadataError(f"{what}: the metadata service refused the API key ({message})")
    raise MetadataError(f"{what}: {message}", retryable=status in RETRY_STATUSES)


class ServiceMetadataStore:
    """MetadataStore talking to the metadata service over HTTP."""

    def __init__(self, url: str, *, api_key: str, timeout_s: float = 10.0, retries: int = 3) -> None:
        self.url = url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._retries = retries
        self._session: aiohttp.ClientSession | None = None

    # ----------------------------------------------------------------- transport
    async def open(self) -> None:
        """Start the session and check that the service answers and takes the key."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS))
        try:
            await self._call("GET", "/v1/version", what="the metadata service")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> ServiceMetadataStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def version(self) -> dict[str, Any]:
        """The service's and the schema's versions."""
        return await self._call("GET", "/v1/version", what="the metadata service")  # type: ignore[no-any-return]

    async def _call(self, method: str, path: str, *, body: Any = None,
                    params: Sequence[tuple[str, str]] | None = None, what: str) -> Any:
        """One API call, retried on connection failures and 429/502/503/504; None for 204."""
        if self._session is None:
            raise MetadataError("the metadata client is not open; call open() first")
        url = URL(self.url + path, encoded=True)
        last: MetadataError | None = None
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt)))
            try:
                async with self._session.request(method, url, json=body, params=params) as resp:
                    text = await resp.text()
                    if resp.status < 400:
                        return None if resp.status == 204 or not text else json.loads(text)
                    try:
                        _raise_for(resp.status, text, what)
                    except MetadataError as exc:
                        if not exc.retryable:
                            raise
                        last = exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                kind = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                last = MetadataError(f"{what}: the metadata service at {self.url} is unreachable ({kind})",
                                     retryable=True)
            except ValueError as exc:  # a 2xx whose body is not JSON: not our service
                raise MetadataError(f"{what}: the metadata service answered malformed JSON: {exc}") from None
        assert last is not None
        raise last

    @staticmethod
    def _run_path(flow: str, run_id: str) -> str:
        return f"/v1/flows/{_seg(flow)}/runs/{_seg(run_id)}"

    def _task_path(self, flow: str, run_id: str, step: str, task_id: str) -> str:
        return f"{self._run_path(flow, run_id)}/steps/{_seg(step)}/tasks/{_seg(task_id)}"

    # ----------------------------------------------------------------- runs
    async def create_run(self, flow: str, *, user: str, params: Mapping[str, Any] | None = None,
                         tags: Sequence[str] = (), system_tags: Sequence[str] = (),
                         daemon_id: str | None = None, origin_run_id: str | None = None,
                         request_id: str | None = None, now: float | None = None) -> RunRecord:
        """Allocate the flow's next run id; retries reuse one request_id, so never duplicate."""
        body = {"user": user, "params": dict(params or {}), "tags": list(tags), "system_tags": list(system_tags),
                "daemon_id": daemon_id, "origin_run_id": origin_run_id,
                "request_id": request_id or uuid.uuid4().hex, "now": now}
        data = await self._call("POST", f"/v1/flows/{_seg(flow)}/runs", body=body, what=f"create a run of {flow}")
        return RunRecord.from_dict(data)

    async def get_run(self, flow: str, run_id: str) -> RunRecord:
        """One run; raises MetadataNotFound."""
        data = await self._call("GET", self._run_path(flow, run_id), what=f"run {flow}/{run_id}")
        return RunRecord.from_dict(data)

    async def list_runs(self, *, flow: str | None = None, status: str | None = None,
                        user: str | None = None, tags: Sequence[str] = (),
                        created_after: float | None = None, created_before: float | None = None,
                        limit: int = 50, cursor: str | None = None) -> Page[RunRecord]:
        """Runs newest first, filtered, one page."""
        params = [("limit", str(limit))]
        for name, value in (("flow", flow), ("status", status), ("user", user), ("cursor", cursor)):
            if value is not None:
                params.append((name, value))
        for name, number in (("created_after", created_after), ("created_before", created_before)):
            if number is not None:
                params.append((name, repr(float(number))))
        params.extend(("tag", t) for t in tags)
        data = await self._call("GET", "/v1/runs", params=params, what="list runs")
        return Page([RunRecord.from_dict(r) for r in data["runs"]], data["next_cursor"])

    async def list_flows(self) -> list[str]:
        """Names of all flows with at least one run, sorted."""
        data = await self._call("GET", "/v1/flows", what="list flows")
        return list(data["flows"])

    async def finish_run(self, flow: str, run_id: str, *, status: str, message: str | None = None,
                         now: float | None = None) -> RunRecord:
        """Record a run's end status (ok, failed, cancelled)."""
        data = await self._call("POST", self._run_path(flow, run_id) + "/finish",
                                body={"status": status, "message": message, "now": now},
                                what=f"finish run {flow}/{run_id}")
        return RunRecord.from_dict(data)

    async def heartbeat_run(self, flow: str, run_id: str, *, now: float | None = None) -> None:
        """The run's daemon is alive."""
        await self._call("POST", self._run_path(flow, run_id) + "/heartbeat", body={"now": now},
                         what=f"heartbeat run {flow}/{run_id}")

    async def add_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Add user tags."""
        data = await self._call("PATCH", self._run_path(flow, run_id) + "/tags", body={"add": list(tags)},
                                what=f"tag run {flow}/{run_id}")
        return RunRecord.from_dict(data)

    async def remove_tags(self, flow: str, run_id: str, tags: Sequence[str]) -> RunRecord:
        """Remove user tags (system tags cannot be removed)."""
        data = await self._call("PATCH", self._run_path(flow, run_id) + "/tags", body={"remove": list(tags)},
                                what=f"untag run {flow}/{run_id}")
        return RunRecord.from_dict(data)

    # ----------------------------------------------------------------- tasks
    async def record_task(self, flow: str, run_id: str, step: str, task_id: str, *,
                          foreach_index: Sequence[int] = (), parents: Sequence[str] = (),
                          origin: str | None = None, now: float | None = None) -> None:
        """A task exists (pending). Idempotent."""
        await self._call("PUT", self._task_path(flow, run_id, step, task_id),
                         body={"foreach_index": list(foreach_index), "parents": list(parents), "origin": origin,
                               "now": now},
                         what=f"record task {flow}/{run_id}/{step}/{task_id}")

    async def record_attempt(self, flow: str, run_id: str, step: str, task_id: str,
                             attempt: AttemptRecord) -> None:
        """Create or update an attempt."""
        await self._call("PUT", f"{self._task_path(flow, run_id, step, task_id)}/attempts/{attempt.attempt}",
                         body=attempt.to_dict(),
                         what=f"record attempt {attempt.attempt} of {flow}/{run_id}/{step}/{task_id}")

    async def get_task(self, flow: str, run_id: str, step: str, task_id: str) -> TaskRecord:
        """One task with its attempts; raises MetadataNotFound."""
        data = await self._call("GET", self._task_path(flow, run_id, step, task_id),
                                what=f"task {flow}/{run_id}/{step}/{task_id}")
        return TaskRecord.from_dict(data)

    async def list_tasks(self, flow: str, run_id: str, *, step: str | None = None) -> list[TaskRecord]:
        """Every task of a run (of one step), with attempts."""
        path = self._run_path(flow, run_id) + (f"/steps/{_seg(step)}/tasks" if step is not None else "/tasks")
        data = await self._call("GET", path, what=f"list tasks of {flow}/{run_id}")
        return [TaskRecord.from_dict(t) for t in data["tasks"]]

    # ----------------------------------------------------------------- artifacts and metadata
    async def record_artifacts(self, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                               artifacts: Sequence[ArtifactRecord]) -> None:
        """The artifact index of a finished attempt. Idempotent."""
        await self._call("PUT", f"{self._task_path(flow, run_id, step, task_id)}/attempts/{attempt}/artifacts",
                         body={"artifacts": [a.to_dict() for a in artifacts]},
                         what=f"record artifacts of {flow}/{run_id}/{step}/{task_id}/{attempt}")

    async def get_artifacts(self, flow: str, run_id: str, step: str, task_id: str,
                            attempt: int | None = None) -> list[ArtifactRecord]:
        """The artifacts of an attempt (default: the successful one, else the latest)."""
        path = self._task_path(flow, run_id, step, task_id)
        path += "/artifacts" if attempt is None else f"/attempts/{attempt}/artifacts"
        data = await self._call("GET", path, what=f"artifacts of {flow}/{run_id}/{step}/{task_id}")
        return [ArtifactRecord.from_dict(a) for a in data["artifacts"]]

    async def set_metadata(self, flow: str, run_id: str, step: str, task_id: str,
                           fields: Mapping[str, str]) -> None:
        """Free-form string fields of a task (merged with what is there)."""
        await self._call("PATCH", self._task_path(flow, run_id, step, task_id) + "/metadata",
                         body={"fields": dict(fields)}, what=f"set metadata of {flow}/{run_id}/{step}/{task_id}")

    async def get_metadata(self, flow: str, run_id: str, step: str, task_id: str) -> dict[str, str]:
        """The free-form fields of a task."""
        data = await self._call("GET", self._task_path(flow, run_id, step, task_id) + "/metadata",
                                what=f"metadata of {flow}/{run_id}/{step}/{task_id}")
        return dict(data["fields"])
