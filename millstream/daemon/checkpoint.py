"""Coalesced checkpoints of run state to the datastore.

Every state transition marks its run dirty; one writer task per daemon writes the
latest state of each dirty run, so a burst of a thousand transitions costs a handful
of writes. Correctness never depends on the newest checkpoint: recovery reconciles
whatever it reads against the attempt records in the datastore (see ``docs/recovery.md``
and the recovery part of :mod:`millstream.daemon.engine`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from millstream.datastore import layout
from millstream.datastore.storage import ObjectStore

log = structlog.get_logger(__name__)


def run_record_key(flow: str, run_id: str) -> str:
    """Where a run's submission (graph, parameters, options) is kept."""
    return f"{layout.run_prefix(flow, run_id)}_run/run.json"


def clones_key(flow: str, run_id: str) -> str:
    """Where a resumed run maps its cloned tasks to the origin's attempts."""
    return f"{layout.run_prefix(flow, run_id)}_run/clones.json"


def summary_key(daemon_id: str, flow: str, run_id: str) -> str:
    """Where the daemon keeps a run's one-line summary."""
    return (
        f"daemon/{layout.check_daemon_id(daemon_id)}/runs/{layout.check_flow(flow)}/{layout.check_run_id(run_id)}.json"
    )


def dumps(data: Any) -> bytes:
    """Compact JSON."""
    return json.dumps(data, separators=(",", ":"), default=str).encode()


class Checkpointer:
    """Writes dirty runs' state and the active-run index, coalescing bursts."""

    def __init__(
        self,
        store: ObjectStore,
        daemon_id: str,
        snapshot: Callable[[str], tuple[str, str, dict[str, Any]] | None],
        active: Callable[[], list[list[str]]],
        *,
        interval_s: float = 0.05,
    ) -> None:
        self.store = store
        self.daemon_id = daemon_id
        self.snapshot = snapshot
        self.active = active
        self.interval_s = interval_s
        self._dirty: set[str] = set()
        self._index_dirty = False
        self._wake = asyncio.Event()
        self.writes = 0
        self.last_flush_s = 0.0

    def mark(self, run_key: str, *, index: bool = False) -> None:
        """Note that a run changed (and, with ``index``, that the active set changed)."""
        self._dirty.add(run_key)
        self._index_dirty = self._index_dirty or index
        self._wake.set()

    async def flush(self) -> None:
        """Write everything dirty now."""
        dirty, self._dirty = self._dirty, set()
        for run_key in dirty:
            snap = self.snapshot(run_key)
            if snap is None:
                continue
            flow, run_id, state = snap
            await self.store.put(layout.checkpoint_key(flow, run_id), dumps(state))
            self.writes += 1
        if self._index_dirty:
            self._index_dirty = False
            await self.store.put(layout.active_runs_key(self.daemon_id), dumps({"runs": self.active()}))
            self.writes += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Write dirty state until ``stop`` is set, then once more."""
        while not stop.is_set():
            self._wake.clear()
            started = time.monotonic()
            try:
                await self.flush()
            except Exception:
                log.exception("checkpoint_failed")
            self.last_flush_s = time.monotonic() - started
            # Back off while writes are slow (a big run): checkpoints cost at most ~1/4 of the loop.
            pause = max(self.interval_s, 3 * self.last_flush_s)
            waiter = asyncio.create_task(self._wake.wait())
            stopper = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            await asyncio.sleep(pause)
        await self.flush()
