"""Opaque keyset cursors for ``list_runs``, shared by the SQLite store and the service.

Runs are listed newest first by ``(created_at, run number, flow)``; a cursor names the
last run of a page so that the next page starts strictly after it. The flow is part of
the key because a listing across flows can hold two runs with the same number and the
same ``created_at``. The text is URL-safe base64 of a small JSON array: opaque to
callers, stable across versions that keep this key.
"""

from __future__ import annotations

import base64
import binascii
import json

from millstream.errors import MetadataError

_VERSION = 1


def encode_cursor(created_at: float, run_number: int, flow: str) -> str:
    """The cursor that resumes a listing after the run ``(created_at, run_number, flow)``."""
    raw = json.dumps([_VERSION, created_at, run_number, flow], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int, str]:
    """Inverse of :func:`encode_cursor`; raises MetadataError for anything it did not make."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        version, created_at, run_number, flow = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise MetadataError(f"not a listing cursor: {cursor!r}") from exc
    if (version != _VERSION or not isinstance(created_at, int | float) or isinstance(run_number, bool)
            or not isinstance(run_number, int) or not isinstance(flow, str)):
        raise MetadataError(f"not a listing cursor: {cursor!r}")
    return float(created_at), run_number, flow
