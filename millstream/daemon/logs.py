"""Tail the stdout/stderr files of running attempts into their runs' event logs."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from millstream.daemon.events import EventLog

POLL_INTERVAL_S = 0.2
# A line longer than this is emitted in pieces rather than held.
MAX_LINE_BYTES = 64 * 1024


@dataclass
class _Watched:
    events: EventLog
    pathspec: str
    attempt: int
    paths: dict[str, str]
    offsets: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    partial: dict[str, bytes] = field(default_factory=lambda: {"stdout": b"", "stderr": b""})


class LogTailer:
    """One poller for every running attempt's log files; emits complete lines as events."""

    def __init__(self) -> None:
        self._watched: dict[Any, _Watched] = {}

    def watch(self, ident: Any, events: EventLog, pathspec: str, attempt: int, stdout: str, stderr: str) -> None:
        """Start following an attempt's files."""
        self._watched[ident] = _Watched(events, pathspec, attempt, {"stdout": stdout, "stderr": stderr})

    def _pump(self, w: _Watched, final: bool) -> None:
        for stream, path in w.paths.items():
            try:
                with open(path, "rb") as f:
                    f.seek(w.offsets[stream])
                    data = f.read(1 << 20)
            except FileNotFoundError:
                continue
            if not data and not (final and w.partial[stream]):
                continue
            w.offsets[stream] += len(data)
            buf = w.partial[stream] + data
            lines = buf.split(b"\n")
            rest = lines.pop()
            if len(rest) > MAX_LINE_BYTES or final:
                if rest:
                    lines.append(rest)
                rest = b""
            w.partial[stream] = rest
            for line in lines:
                w.events.emit(
                    "log",
                    pathspec=w.pathspec,
                    attempt=w.attempt,
                    stream=stream,
                    line=line.decode("utf-8", errors="replace"),
                )

    async def finish(self, ident: Any) -> None:
        """Emit what is left of an attempt's output and stop following it."""
        w = self._watched.pop(ident, None)
        if w is not None:
            # Read until the end: a big final burst may exceed one read.
            for _ in range(64):
                before = dict(w.offsets)
                self._pump(w, final=False)
                if w.offsets == before:
                    break
            self._pump(w, final=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            for w in list(self._watched.values()):
                self._pump(w, final=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
