"""How the command line writes to the terminal: tables, times and error exits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click

from millstream.errors import ApiError, FlowValidationError, MillstreamError


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table with left-aligned columns, two spaces apart."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join(lines) + "\n"


def format_time(ts: float | None) -> str:
    """An epoch time as local ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def format_duration(start: float | None, end: float | None, *, now: float | None = None) -> str:
    """``1h02m03s`` between two epoch times; a running one counts up to ``now``."""
    if start is None:
        return "-"
    stop = end if end is not None else (now if now is not None else time.time())
    seconds = max(0.0, stop - start)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def truncate(text: str | None, width: int) -> str:
    """The first line of ``text``, cut to ``width`` characters."""
    first = (text or "").splitlines()[0] if text else ""
    return first if len(first) <= width else first[: width - 3] + "..."


def error_text(exc: MillstreamError) -> str:
    """What the command line says about an error."""
    if isinstance(exc, ApiError):
        return f"{exc.message} ({exc.code})"
    return str(exc)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn millstream's own errors into a one-paragraph message and exit code 1."""
    try:
        yield
    except FlowValidationError as exc:
        raise click.ClickException(f"the flow is invalid:\n{exc}") from exc
    except MillstreamError as exc:
        raise click.ClickException(error_text(exc)) from exc
