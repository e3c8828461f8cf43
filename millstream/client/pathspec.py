"""Pathspecs as users type them: ``Flow/run/step/task``, or ``run/step/task`` in a flow's CLI."""

from __future__ import annotations

from typing import NamedTuple

from millstream.errors import MillstreamError


class PathspecError(MillstreamError, ValueError):
    """A pathspec on the command line is malformed."""


class Pathspec(NamedTuple):
    """The parts of a pathspec; the ones not given are None."""

    flow: str
    run_id: str | None = None
    step: str | None = None
    task_id: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in self if p is not None)


def parse_pathspec(text: str, *, flow: str | None = None) -> Pathspec:
    """Parse ``Flow[/run[/step[/task]]]``; with ``flow`` given, ``run[/step[/task]]`` too."""
    parts = text.strip().strip("/").split("/")
    if not parts or any(not p for p in parts):
        raise PathspecError(f"pathspec {text!r} has an empty part")
    if flow is not None and parts[0] != flow:
        parts.insert(0, flow)
    if len(parts) > 4:
        raise PathspecError(f"pathspec {text!r} has too many parts: use Flow/run/step/task")
    return Pathspec(*parts)
