"""Attempt records: the small JSON files that say an attempt started and how it ended.

``done.json`` is the single source of truth of an attempt's outcome. It is written last,
after artifacts and logs, and with ``put_if_absent``, so an attempt has at most one
outcome even if a zombie and its replacement both try to finish it. Records are
compact JSON with sorted keys, so equal records are equal bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from millstream.datastore import layout
from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError, NotFound


@dataclass(frozen=True, slots=True)
class AttemptKey:
    """Names one attempt of one task: (flow, run, step, task, attempt)."""

    flow: str
    run: str
    step: str
    task: str
    attempt: int

    def __post_init__(self) -> None:
        layout.check_flow(self.flow)
        layout.check_run_id(self.run)
        layout.check_step(self.step)
        layout.check_task_id(self.task)
        layout.check_attempt(self.attempt)

    @property
    def pathspec(self) -> str:
        """The task's ``flow/run/step/task`` pathspec (without the attempt)."""
        return f"{self.flow}/{self.run}/{self.step}/{self.task}"

    @property
    def started_key(self) -> str:
        """The store key of this attempt's start record."""
        return layout.started_key(self.flow, self.run, self.step, self.task, self.attempt)

    @property
    def done_key(self) -> str:
        """The store key of this attempt's done marker."""
        return layout.done_key(self.flow, self.run, self.step, self.task, self.attempt)

    @property
    def stdout_key(self) -> str:
        """The store key of this attempt's standard output."""
        return layout.stdout_key(self.flow, self.run, self.step, self.task, self.attempt)

    @property
    def stderr_key(self) -> str:
        """The store key of this attempt's standard error."""
        return layout.stderr_key(self.flow, self.run, self.step, self.task, self.attempt)


def encode_record(record: dict[str, Any]) -> bytes:
    """Encode a record as compact, key-sorted, strict JSON (no NaN or Infinity)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_record(data: bytes, key: str) -> dict[str, Any]:
    """Decode a record read from ``key``; raise ``DatastoreError`` if it is not a JSON object."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatastoreError(f"corrupt record {key}: {exc}") from exc
    if not isinstance(record, dict):
        raise DatastoreError(f"corrupt record {key}: expected a JSON object")
    return record


async def write_started(store: ObjectStore, key: AttemptKey, info: dict[str, Any]) -> None:
    """Record that an attempt started (overwriting is harmless: it is not the outcome)."""
    await store.put(key.started_key, encode_record(info))


async def write_done(store: ObjectStore, key: AttemptKey, done: dict[str, Any]) -> bool:
    """Record an attempt's outcome once; False if an outcome was already recorded."""
    return await store.put_if_absent(key.done_key, encode_record(done))


async def read_started(store: ObjectStore, key: AttemptKey) -> dict[str, Any] | None:
    """Return the attempt's start record, or None if it has not started."""
    return await _read(store, key.started_key)


async def read_done(store: ObjectStore, key: AttemptKey) -> dict[str, Any] | None:
    """Return the attempt's outcome, or None if it has not finished."""
    return await _read(store, key.done_key)


async def list_attempts(store: ObjectStore, flow: str, run: str, step: str,
                        task: str) -> list[int]:
    """Return the numbers of every attempt of a task that has left any record, sorted."""
    prefix = layout.task_prefix(flow, run, step, task)
    attempts: set[int] = set()
    for stored in await store.list(prefix):
        head = stored[len(prefix):].split("/", 1)[0]
        # Only canonical numbers: "01" is not a key the layout would ever write.
        if head.isascii() and head.isdigit() and str(int(head)) == head:
            attempts.add(int(head))
    return sorted(attempts)


async def _read(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        data = await store.get(key)
    except NotFound:
        return None
    return decode_record(data, key)
