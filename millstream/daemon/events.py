"""A run's event log: an ordered list that API clients read and follow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

# A follower that falls this far behind is dropped rather than let memory grow.
MAX_EVENTS = 200_000


class EventLog:
    """Append-only events of one run with sequence numbers; followers wait for more."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self._changed = asyncio.Event()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append an event and wake followers."""
        record = {"seq": len(self.events), "ts": time.time(), "event": event, **fields}
        if len(self.events) < MAX_EVENTS or event == "run_finished":
            self.events.append(record)
        if event == "run_finished":
            self.closed = True
        self._changed.set()
        return record

    async def follow(self, since: int = 0, *, follow: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Yield events from ``since``; with ``follow``, wait for new ones until the run ends."""
        position = max(0, since)
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
