"""Tail the CloudWatch Logs streams of running Batch jobs into local log files.

Each followed stream is read with GetLogEvents from its head, then with the
``nextForwardToken`` of the last answer (the token stays put at the end of a stream
and returns exactly the new events later). Messages are appended, one line each, to
the attempt's stdout file: the engine's :class:`~millstream.daemon.logs.LogTailer`
turns that file into log events and stores it in the datastore when the attempt
ends, exactly as for a local process. CloudWatch keeps one stream per container, so
stdout and stderr arrive interleaved in that one file.

Every GetLogEvents call takes a token of a shared :class:`TokenBucket` (AWS allows 25
per second per account), so a thousand running jobs slow each stream's refresh
rather than getting the account throttled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from millstream.compute.batch_watch import TokenBucket
from millstream.errors import ComputeError

log = structlog.get_logger(__name__)

#: ``(group, stream, token or None) -> (messages, next token)``; None when the stream is missing.
GetEvents = Callable[[str, str, str | None], Awaitable[tuple[list[str], str] | None]]

#: Pages read when draining a stream at the end of its job.
MAX_DRAIN_PAGES = 10_000


@dataclass
class _Stream:
    group: str
    name: str
    path: Path
    token: str | None = None
    lock: asyncio.Lock | None = None


class LogFollower:
    """Follows many streams from one loop; :meth:`finish` drains one to its end."""

    def __init__(self, get_events: GetEvents, rate: TokenBucket, *, interval_s: float = 1.0) -> None:
        self.get_events = get_events
        self.rate = rate
        self.interval_s = interval_s
        self.calls = 0
        self._streams: dict[str, _Stream] = {}

    def follow(self, ident: str, group: str, stream: str, path: str) -> None:
        """Start following ``stream`` into ``path`` (a no-op if it is followed already)."""
        if ident in self._streams:
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # From the head, always: after a daemon restart the file is rewritten whole.
        target.write_bytes(b"")
        self._streams[ident] = _Stream(group, stream, target, lock=asyncio.Lock())

    def following(self, ident: str) -> bool:
        """True while ``ident`` is followed."""
        return ident in self._streams

    async def _pump(self, s: _Stream) -> bool:
        """Read one page; True when it brought new events."""
        assert s.lock is not None
        async with s.lock:
            await self.rate.take()
            self.calls += 1
            page = await self.get_events(s.group, s.name, s.token)
            if page is None:
                return False
            messages, token = page
            if messages:
                with open(s.path, "ab") as f:
                    f.write("".join(m if m.endswith("\n") else m + "\n" for m in messages).encode())
            moved = token != s.token
            s.token = token
            return bool(messages) or (moved and s.token is None)

    async def finish(self, ident: str) -> None:
        """Read the stream to its end and stop following it."""
        s = self._streams.get(ident)
        if s is None:
            return
        try:
            for _ in range(MAX_DRAIN_PAGES):
                if not await self._pump(s):
                    break
        except ComputeError as exc:
            log.warning("batch_log_drain_failed", stream=s.name, error=str(exc))
        finally:
            self._streams.pop(ident, None)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every followed stream about every ``interval_s`` until ``stop``."""
        while not stop.is_set():
            for ident, s in list(self._streams.items()):
                if stop.is_set():
                    break
                if ident not in self._streams:
                    continue
                try:
                    await self._pump(s)
                except ComputeError as exc:
                    log.info("batch_log_read_failed", stream=s.name, error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)


def messages_of(response: dict[str, Any]) -> list[str]:
    """The messages of a GetLogEvents answer, oldest first."""
    return [str(e.get("message", "")) for e in response.get("events", [])]
