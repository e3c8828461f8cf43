"""Follow a run's event stream and print it the way Metaflow prints a run.

    2026-12-03 08:00:00.123 Workflow starting (run-id 5):
    2026-12-03 08:00:00.130 [5/start/1 (pid 1234)] Task is starting.
    2026-12-03 08:00:00.211 [5/start/1 (pid 1234)] hello
    2026-12-03 08:00:00.250 [5/start/1 (pid 1234)] Task finished successfully.
    2026-12-03 08:00:01.020 Done!

Formatting (:class:`EventPrinter`) is separate from reading (:func:`follow_run`), so
it is a function of a list of events. Timestamps are the daemon's, in local time.
With ``quiet`` only failed tasks and the final line are printed.

The daemon is built to survive a crash, so a stream that breaks off before
``run_finished`` is not the end of the run: :func:`follow_run` reconnects with
``since=<last seq seen>`` and drops events it has already printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import click

from millstream.client.http import DaemonClient, DaemonUnavailable, api_path

RECONNECT_TIMEOUT_S = 30.0
RECONNECT_INTERVAL_S = 0.2


def format_ts(ts: float) -> str:
    """``YYYY-MM-DD HH:MM:SS.mmm`` in local time, as Metaflow stamps its lines."""
    seconds, millis = divmod(round(ts * 1000), 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) + f".{millis:03d}"


def task_label(pathspec: str) -> str:
    """``run/step/task`` of a ``flow/run/step/task`` pathspec, as Metaflow labels tasks."""
    parts = pathspec.split("/")
    return "/".join(parts[1:]) if len(parts) == 4 else pathspec


class EventPrinter:
    """Prints events as Metaflow-style lines and remembers how far the run got."""

    def __init__(self, out: TextIO, *, quiet: bool = False, color: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.color = color
        self.last_seq = -1
        self.status: str | None = None
        self.message: str | None = None
        self._pids: dict[tuple[str, int], int] = {}

    def feed(self, event: dict[str, Any]) -> None:
        """Print one event (unless it was printed already or is not shown in quiet mode)."""
        seq = event.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return
            self.last_seq = seq
        handler = getattr(self, f"_on_{event.get('event')}", None)
        if handler is not None:  # events this client does not know yet are skipped
            handler(event, format_ts(float(event.get("ts") or time.time())))

    # ----------------------------------------------------------------- events
    def _on_run_started(self, event: dict[str, Any], ts: str) -> None:
        if not self.quiet:
            self._line(ts, f"Workflow starting (run-id {event.get('run_id')}):", bold=True)

    def _on_task_started(self, event: dict[str, Any], ts: str) -> None:
        attempt = int(event.get("attempt") or 0)
        if event.get("pid") is not None:
            self._pids[(str(event.get("pathspec")), attempt)] = int(event["pid"])
        if not self.quiet:
            text = "Task is starting." if attempt == 0 else f"Task is starting (retry {attempt})."
            self._line(ts, self._head(event) + text)

    def _on_log(self, event: dict[str, Any], ts: str) -> None:
        if self.quiet:
            return
        line = str(event.get("line", "")).rstrip("\r\n")
        self._line(ts, self._head(event) + line, bad=event.get("stream") == "stderr")

    def _on_task_finished(self, event: dict[str, Any], ts: str) -> None:
        status = event.get("status")
        head = self._head(event)
        if status == "ok":
            if not self.quiet:
                self._line(ts, head + "Task finished successfully.")
            return
        lines = str(event.get("message") or "").splitlines() or [""]
        if status == "failed" and not lines[0] and event.get("exit_code") not in (None, 0):
            lines[0] = f"exit code {event['exit_code']}"
        first = "Task failed." if status == "failed" else "Task cancelled."
        if lines[0]:
            first += f" {lines[0]}"
        if event.get("retrying"):
            first += " (retrying)"
        self._line(ts, head + first, bad=status == "failed")
        for rest in lines[1:]:
            self._line(ts, head + rest, bad=status == "failed")

    def _on_run_finished(self, event: dict[str, Any], ts: str) -> None:
        self.status = str(event.get("status"))
        self.message = event.get("message") or None
        if self.status == "ok":
            self._line(ts, "Done!", bold=True)
            return
        word = "cancelled" if self.status == "cancelled" else "failed"
        text = f"Workflow {word}: {self.message}" if self.message else f"Workflow {word}."
        self._line(ts, text, bold=True, bad=True)

    # ----------------------------------------------------------------- output
    def note(self, text: str) -> None:
        """Print a line of the client's own, stamped now."""
        self._line(format_ts(time.time()), text)

    def _head(self, event: dict[str, Any]) -> str:
        pathspec = str(event.get("pathspec", ""))
        pid = self._pids.get((pathspec, int(event.get("attempt") or 0)))
        if pid is None and event.get("pid") is not None:
            pid = int(event["pid"])
        label = task_label(pathspec)
        return f"[{label} (pid {pid})] " if pid is not None else f"[{label}] "

    def _line(self, ts: str, text: str, *, bold: bool = False, bad: bool = False) -> None:
        if self.color:
            text = click.style(text, bold=bold, fg="red" if bad else None)
        self.out.write(f"{ts} {text}\n")
        self.out.flush()


def render_events(events: Iterable[dict[str, Any]], *, quiet: bool = False, out: TextIO,
                  color: bool = False) -> str | None:
    """Print every event; the run's final status, or None if ``run_finished`` never came."""
    printer = EventPrinter(out, quiet=quiet, color=color)
    for event in events:
        printer.feed(event)
        if printer.status is not None:
            break
    return printer.status


def follow_run(client: DaemonClient, flow: str, run_id: str | int, *, quiet: bool,
               out: TextIO = sys.stdout, reconnect_timeout_s: float = RECONNECT_TIMEOUT_S) -> str:
    """Print a run's events until it finishes and return its final status."""
    printer = EventPrinter(out, quiet=quiet, color=_isatty(out))
    lost_since: float | None = None
    while True:
        path = api_path("runs", flow, run_id, "events", since=max(printer.last_seq, 0), follow=1)
        try:
            for event in client.stream_ndjson(path):
                lost_since = None
                printer.feed(event)
                if printer.status is not None:
                    return printer.status
        except DaemonUnavailable as exc:
            reason = exc.message
        else:
            reason = "the event stream ended before the run did"
        now = time.monotonic()
        if lost_since is None:
            lost_since = now
            if not quiet:
                printer.note("Lost the connection to the daemon; reconnecting...")
        elif now - lost_since > reconnect_timeout_s:
            raise DaemonUnavailable(
                f"lost the daemon for {reconnect_timeout_s:.0f} s ({reason}); the run goes on "
                f"when it is back: millstream status {flow}/{run_id}")
        time.sleep(RECONNECT_INTERVAL_S)


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
