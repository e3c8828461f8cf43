"""A run's event log: an ordered list that API clients read and follow.

Sequence numbers are microseconds since the epoch, made strictly increasing, so they
keep growing across a daemon restart: a client that reconnects with ``since`` (its
last seq + 1) after the daemon came back sees the recovered run's new events.
Events themselves are not persisted; the run's state is.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator
from typing import Any

# A follower that falls this far behind is dropped rather than let memory grow.
MAX_EVENTS = 200_000


class EventLog:
    """Append-only events of one run with sequence numbers; followers wait for more."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._seqs: list[int] = []
        self._last_seq = 0
        self.closed = False
        self._changed = asyncio.Event()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append an event and wake followers."""
        now = time.time()
        self._last_seq = max(self._last_seq + 1, int(now * 1_000_000))
        record = {"seq": self._last_seq, "ts": now, "event": event, **fields}
        if len(self.events) < MAX_EVENTS or event == "run_finished":
            self.events.append(record)
            self._seqs.append(self._last_seq)
        if event == "run_finished":
            self.closed = True
        self._changed.set()
        return record

    def close(self) -> None:
        """End every follow (the daemon is stopping); the run itself goes on elsewhere."""
        self.closed = True
        self._changed.set()

    async def follow(self, since: int = 0, *, follow: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Yield events with ``seq >= since``; with ``follow``, wait for more until the run ends."""
        position = bisect.bisect_left(self._seqs, since)
        while True:
            while position < len(self.events):
                yield self.events[position]
                position += 1
            if not follow or self.closed:
                return
            self._changed.clear()
            if position < len(self.events):
                continue
            await self._changed.wait()
