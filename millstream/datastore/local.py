"""The local-disk object store: one file per key under a root directory.

Every write goes to a temporary file (``.tmp-<random>``) in the key's own directory and
is then renamed over the final name, so a reader never sees a partial value, even if
the writer is killed. ``put_if_absent`` uses ``os.link`` instead of the rename: linking
fails with ``FileExistsError`` for every writer but the first, which gives exactly one
winner across threads and processes. With ``durable=True`` the data and the directory
entry are fsynced before a write or delete returns, so it survives a power cut.
A killed writer can leave a temporary file behind; listings skip them and
:meth:`LocalStore.remove_stale_temps` reclaims them.

Each operation is one blocking function run in the default thread pool
(``asyncio.to_thread``), so the whole per-call overhead is one thread hop. Measured on
the development VM (2 vCPU, ext4; medians of 5 x 300 sequential calls, 100-byte values):

    =======================================  ==============  ==============
    LocalStore call                          durable=False   durable=True
    =======================================  ==============  ==============
    put, attempt folder already exists       0.25 ms         0.70 ms
    put into a new attempt folder            0.44 ms         1.25 ms
    put_if_absent                            0.29 ms         0.74 ms
    get / exists                             0.16 ms         0.16 ms
    =======================================  ==============  ==============

The same put written with aiofiles, which pays a thread hop for each of open, write,
flush and close, took 1.3-2.3 ms (non-durable) and 2.2-3.3 ms (durable): two to five
times slower, so aiofiles is not used. Blocking calls made straight on the event loop
would save the ~0.15 ms hop but stall every other coroutine for an fsync (~0.5 ms here,
far more on a busy disk or a network filesystem).

A cancelled call cannot stop its thread: a cancelled ``put`` may still land, just as a
cancelled S3 request may.

Deleting a key does not remove the directories above it: S3 has no directories to
remove, and pruning here would race with a concurrent ``put`` into the same folder.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TypeVar

from millstream.datastore.storage import (
    DEFAULT_CHUNK_BYTES,
    TEMP_PREFIX,
    check_key,
    check_prefix,
    check_range,
)
from millstream.errors import DatastoreError, NotFound

_T = TypeVar("_T")

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class LocalStore:
    """An :class:`~millstream.datastore.storage.ObjectStore` on a local directory."""

    def __init__(self, root: Path, *, durable: bool = True, inline: bool = False) -> None:
        # abspath rather than resolve(): construction does no I/O.
        self.root = Path(os.path.abspath(root))
        self.durable = durable
        # inline: run each operation on the calling thread. A task process has nothing
        # else on its loop to stall, and a fresh fork pays ~3 ms to start a thread pool.
        self.inline = inline
        self._root = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self._root!r}, durable={self.durable})"

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically, replacing any old value."""
        path = self._path(key)
        # bytes() snapshots a bytearray the caller might change while the thread writes.
        await self._run("put", key, _put, path, bytes(data), self.durable)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` unless it exists; True only for the writer that created it."""
        path = self._path(key)
        return await self._run("put_if_absent", key, _put_if_absent, path, bytes(data),
                               self.durable)

    async def get(self, key: str) -> bytes:
        """Return the value under ``key``; raise ``NotFound`` if there is none."""
        path = self._path(key)
        return await self._run("get", key, _read, path, key)

    async def get_range(self, key: str, start: int, end: int | None = None) -> bytes:
        """Return bytes ``[start, end)`` of the value, cut short at its end."""
        check_range(start, end)
        path = self._path(key)
        return await self._run("get_range", key, _read_range, path, key, start, end)

    async def stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_BYTES
                     ) -> AsyncGenerator[bytes, None]:
        """Yield the value under ``key`` in chunks of at most ``chunk_size`` bytes."""
        if chunk_size <= 0:
            raise DatastoreError(f"chunk_size must be positive, got {chunk_size}")
        path = self._path(key)
        fd = await self._run("stream", key, _open_read, path, key)
        loop = asyncio.get_running_loop()
        reading: asyncio.Future[bytes] | None = None
        try:
            while True:
                reading = loop.run_in_executor(None, os.read, fd, chunk_size)
                try:
                    chunk = await asyncio.shield(reading)
                except OSError as exc:
                    raise DatastoreError(f"stream {key!r} in {self._root}: {exc}") from exc
                reading = None
                if not chunk:
                    return
                yield chunk
        finally:
            if reading is None or reading.done():
                os.close(fd)
            else:
                # Cancelled mid-read: closing now could let the still-running read hit
                # a descriptor number reused by another file, so close once it ends.
                reading.add_done_callback(lambda done: _close_after(done, fd))

    async def put_file(self, key: str, path: Path) -> None:
        """Upload the local file at ``path`` to ``key`` in chunks, atomically."""
        dest = self._path(key)
        await self._run("put_file", key, _put_file, dest, os.fspath(path), self.durable)

    async def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` to ``path`` via a temporary file, so failures leave nothing."""
        src = self._path(key)
        await self._run("get_file", key, _get_file, src, key, os.fspath(path))

    async def exists(self, key: str) -> bool:
        """Tell whether an object is stored under exactly ``key``."""
        path = self._path(key)
        return await self._run("exists", key, os.path.isfile, path)

    async def list(self, prefix: str) -> builtins.list[str]:
        """Return all keys that start with ``prefix``, sorted, skipping temporary files."""
        parts = check_prefix(prefix)
        return await self._run("list", prefix, _list, self._root, parts)

    async def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        path = self._path(key)
        await self._run("delete", key, _delete, path, self.durable)

    async def size(self, key: str) -> int:
        """Return the length of the value under ``key``; raise ``NotFound`` if missing."""
        path = self._path(key)
        return await self._run("size", key, _size, path, key)

    async def remove_stale_temps(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by killed writers; return how many were removed."""
        cutoff = time.time() - older_than_s
        return await self._run("remove_stale_temps", "", _remove_temps, self._root, cutoff)

    def _path(self, key: str) -> str:
        return os.path.join(self._root, *check_key(key))

    async def _run(self, op: str, key: str, fn: Callable[..., _T], *args: object) -> _T:
        """Run one blocking operation in a thread, turning OS errors into ours."""
        try:
            if self.inline:
                return fn(*args)
            return await asyncio.to_thread(fn, *args)
        except DatastoreError:
            raise
        except OSError as exc:
            raise DatastoreError(f"{op} {key!r} in {self._root}: {exc}") from exc


def _put(path: str, data: bytes, durable: bool) -> None:
    tmp = _write_temp(path, lambda fd: _write_all(fd, data), durable)
    _commit(tmp, path, durable)


def _put_if_absent(path: str, data: bytes, durable: bool) -> bool:
    tmp = _write_temp(path, lambda fd: _write_all(fd, data), durable)
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        if os.path.isdir(path):
            raise _prefix_conflict(path) from None
        return False
    finally:
        _unlink_quietly(tmp)
    if durable:
        _fsync_dir(os.path.dirname(path))
    return True


def _put_file(dest: str, src: str, durable: bool) -> None:
    # Open the source first so a bad source path fails before any temp file exists.
    with open(src, "rb") as source:
        def fill(fd: int) -> None:
            while chunk := source.read(DEFAULT_CHUNK_BYTES):
                _write_all(fd, chunk)

        tmp = _write_temp(dest, fill, durable)
    _commit(tmp, dest, durable)


def _get_file(src: str, key: str, dest: str) -> None:
    source_fd = _open_read(src, key)
    with open(source_fd, "rb") as source:
        directory = os.path.dirname(os.path.abspath(dest))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        try:
            with open(tmp, "xb") as target:
                shutil.copyfileobj(source, target, DEFAULT_CHUNK_BYTES)
            os.replace(tmp, dest)
        except BaseException:
            _unlink_quietly(tmp)
            raise


def _commit(tmp: str, path: str, durable: bool) -> None:
    """Rename a filled temp file over ``path``: the one step that makes a write visible."""
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink_quietly(tmp)
        if isinstance(exc, IsADirectoryError):
            raise _prefix_conflict(path) from exc
        raise
    if durable:
        _fsync_dir(os.path.dirname(path))


def _prefix_conflict(path: str) -> DatastoreError:
    # S3 can hold both "a/b" and "a/b/c"; a filesystem cannot, so say which one clashed.
    return DatastoreError(f"{path} clashes with another key: on a local store one key "
                          "cannot also be the folder of another")


def _write_temp(path: str, fill: Callable[[int], None], durable: bool) -> str:
    """Create a temp file next to ``path``, fill it, fsync it and return its name."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
    try:
        fd = os.open(tmp, _CREATE_FLAGS, 0o644)
    except FileNotFoundError:
        # The common case on a hot path is an existing folder, so only create on a miss.
        _make_dirs(directory, durable)
        fd = os.open(tmp, _CREATE_FLAGS, 0o644)
    except NotADirectoryError:
        raise _prefix_conflict(path) from None
    try:
        fill(fd)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _make_dirs(directory: str, durable: bool) -> None:
    """Create ``directory`` and its missing parents, fsyncing each new entry if durable."""
    missing: builtins.list[str] = []
    current = directory
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for new_dir in reversed(missing):
        try:
            os.mkdir(new_dir)
        except FileExistsError:
            continue  # a concurrent writer made it first; checked below
        except NotADirectoryError:
            raise _prefix_conflict(new_dir) from None
        if durable:
            _fsync_dir(os.path.dirname(new_dir))
    if not os.path.isdir(directory):
        raise _prefix_conflict(directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_after(done: asyncio.Future[bytes], fd: int) -> None:
    if not done.cancelled():
        done.exception()  # the reader is gone; mark any error as seen
    os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _open_read(path: str, key: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except _MISSING:
        raise NotFound(key) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        # os.open succeeds on a directory, but a folder is not an object.
        os.close(fd)
        raise NotFound(key)
    return fd


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except _MISSING:
        raise NotFound(key) from None


def _read_range(path: str, key: str, start: int, end: int | None) -> bytes:
    fd = _open_read(path, key)
    try:
        stop = os.fstat(fd).st_size if end is None else end
        pieces: builtins.list[bytes] = []
        offset = start
        while offset < stop:
            piece = os.pread(fd, min(stop - offset, DEFAULT_CHUNK_BYTES * 64), offset)
            if not piece:
                break
            pieces.append(piece)
            offset += len(piece)
        return b"".join(pieces)
    finally:
        os.close(fd)


def _size(path: str, key: str) -> int:
    try:
        st = os.stat(path)
    except _MISSING:
        raise NotFound(key) from None
    if not stat.S_ISREG(st.st_mode):
        raise NotFound(key)
    return st.st_size


def _delete(path: str, durable: bool) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return
    except PermissionError:
        # macOS reports EPERM, not EISDIR, for unlinking a folder.
        if os.path.isdir(path):
            return
        raise
    if durable:
        _fsync_dir(os.path.dirname(path))


def _list(root: str, parts: builtins.list[str]) -> builtins.list[str]:
    """Walk only the folder the prefix names and keep the keys that match it."""
    *dirs, partial = parts or [""]
    base = os.path.join(root, *dirs)
    base_key = "/".join(dirs) + "/" if dirs else ""
    keys: builtins.list[str] = []
    stack = [(base, base_key, partial)]
    while stack:
        directory, key_prefix, name_prefix = stack.pop()
        try:
            entries = os.scandir(directory)
        except _MISSING:
            continue
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith(TEMP_PREFIX) or not name.startswith(name_prefix):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, f"{key_prefix}{name}/", ""))
                elif entry.is_file():
                    keys.append(key_prefix + name)
    keys.sort()
    return keys


def _remove_temps(root: str, cutoff: float) -> int:
    removed = 0
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(directory, name)
            try:
                if os.lstat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue  # finished or cleaned up by someone else meanwhile
    return removed
