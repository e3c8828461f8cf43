"""The object-store port: the async interface every storage backend implements.

Keys are ``/``-separated strings with S3 semantics: there are no directories, only
keys, and ``list`` matches a plain string prefix. The rules in :func:`check_key` are
shared by every backend so that a key valid on a laptop is valid on S3 and back.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from millstream.errors import DatastoreError

#: Backends write temporary objects under names with this prefix; no key part may use it.
TEMP_PREFIX = ".tmp-"

#: S3's limit on a key, so that local keys stay portable.
MAX_KEY_BYTES = 1024

#: The usual filesystem limit on one path component (NAME_MAX).
MAX_PART_BYTES = 255

DEFAULT_CHUNK_BYTES = 1 << 20


@runtime_checkable
class ObjectStore(Protocol):
    """Async key/value storage of immutable-looking blobs, addressed by ``/`` keys."""

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any old value; readers see all or nothing."""
        ...

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist; True for the one writer that created it."""
        ...

    async def get(self, key: str) -> bytes:
        """Return the whole value; raise :class:`~millstream.errors.NotFound` if missing."""
        ...

    async def get_range(self, key: str, start: int, end: int | None = None) -> bytes:
        """Return bytes ``[start, end)``; a range past the end is cut short, never an error."""
        ...

    def stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """Yield the value in chunks of at most ``chunk_size`` bytes."""
        ...

    async def put_file(self, key: str, path: Path) -> None:
        """Upload a local file without reading it whole into memory."""
        ...

    async def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` into a local file; a failed download leaves no partial file."""
        ...

    async def exists(self, key: str) -> bool:
        """Tell whether an object is stored under exactly ``key``."""
        ...

    async def list(self, prefix: str) -> builtins.list[str]:
        """Return every key starting with ``prefix``, sorted; end it with ``/`` for a folder."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""
        ...

    async def size(self, key: str) -> int:
        """Return the value's length in bytes; raise ``NotFound`` if missing."""
        ...


def check_key(key: str) -> builtins.list[str]:
    """Validate ``key`` and return its parts; raise :class:`DatastoreError` if it is unsafe."""
    if not isinstance(key, str) or not key:
        raise DatastoreError(f"invalid key {key!r}: must be a non-empty string")
    _check_text(key, key)
    if key.startswith("/"):
        raise DatastoreError(f"invalid key {key!r}: must be relative (no leading '/')")
    parts = key.split("/")
    for part in parts:
        _check_part(key, part)
    return parts


def check_prefix(prefix: str) -> builtins.list[str]:
    """Validate a listing prefix and return its parts; the last part may be partial or empty."""
    if not isinstance(prefix, str):
        raise DatastoreError(f"invalid prefix {prefix!r}: must be a string")
    if not prefix:
        return []
    _check_text(prefix, prefix)
    if prefix.startswith("/"):
        raise DatastoreError(f"invalid prefix {prefix!r}: must be relative (no leading '/')")
    *dirs, last = prefix.split("/")
    for part in dirs:
        _check_part(prefix, part)
    # A partial last part is fine, but "a/.." would still walk out of a local root.
    if last in (".", ".."):
        raise DatastoreError(f"invalid prefix {prefix!r}: '.' and '..' are not allowed")
    return [*dirs, last]


def check_range(start: int, end: int | None) -> None:
    """Validate a ``get_range`` request the same way on every backend."""
    if start < 0:
        raise DatastoreError(f"invalid range start {start}: must be >= 0")
    if end is not None and end < start:
        raise DatastoreError(f"invalid range [{start}, {end}): end is before start")


def _check_text(key: str, text: str) -> None:
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates have no UTF-8 form, so S3 could not store the key.
        raise DatastoreError(f"invalid key {key!r}: not valid UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise DatastoreError(f"invalid key {key[:80]!r}...: longer than {MAX_KEY_BYTES} bytes")
    # Control characters (NUL above all) break filesystems, logs and shell pathspecs.
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise DatastoreError(f"invalid key {key!r}: contains a control character")


def _check_part(key: str, part: str) -> None:
    if not part:
        raise DatastoreError(f"invalid key {key!r}: empty part (doubled or trailing '/')")
    if part in (".", ".."):
        raise DatastoreError(f"invalid key {key!r}: '.' and '..' are not allowed")
    if part.startswith(TEMP_PREFIX):
        raise DatastoreError(f"invalid key {key!r}: {TEMP_PREFIX!r} names are reserved")
    if len(part.encode("utf-8")) > MAX_PART_BYTES:
        raise DatastoreError(f"invalid key {key!r}: a part is longer than {MAX_PART_BYTES} bytes")
