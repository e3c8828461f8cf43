"""LocalStore specifics: crash atomicity, cross-process races, temp files, the root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from millstream.datastore.local import LocalStore
from millstream.datastore.storage import DEFAULT_CHUNK_BYTES, TEMP_PREFIX
from millstream.errors import DatastoreError, NotFound

from ._support import REPO_ROOT, WORKER, wait_until


def _worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TEMP_PREFIX}*") if p.is_file()]


async def test_writer_killed_mid_write_leaves_nothing_visible(tmp_path: Path) -> None:
    root = tmp_path / "store"
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), "put_file", str(root), "big/object", str(fifo),
        env=_worker_env())
    try:
        fd = -1

        def open_write_end() -> bool:
            # Non-blocking open fails with ENXIO until the worker opens the read end.
            nonlocal fd
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return False
            return True

        await wait_until(open_write_end)
        os.set_blocking(fd, True)
        # The worker copies whole chunks: feed one and a half, so it writes one chunk to
        # its temp file and then blocks waiting for the rest.
        await asyncio.to_thread(os.write, fd, b"\xab" * (DEFAULT_CHUNK_BYTES * 3 // 2))
        await wait_until(
            lambda: any(p.stat().st_size >= DEFAULT_CHUNK_BYTES for p in _temps(root)))
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if fd >= 0:
            os.close(fd)

    store = LocalStore(root)
    assert not await store.exists("big/object")
    with pytest.raises(NotFound):
        await store.get("big/object")
    assert await store.list("") == []
    assert len(_temps(root)) == 1  # the kill really landed mid-write
    assert await store.remove_stale_temps(older_than_s=0) == 1
    assert _temps(root) == []


async def test_put_if_absent_has_one_winner_across_processes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    n_procs, n_keys = 6, 40
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER), "race", str(root), str(n_keys), f"writer-{i}",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=_worker_env())
        for i in range(n_procs)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"ready\n"
    # Release every writer at once: all of them are parked on stdin.
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
    outputs = [await proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * n_procs
    wins = [json.loads(stdout) for stdout, _ in outputs]

    store = LocalStore(root)
    for key_index in range(n_keys):
        winners = [i for i in range(n_procs) if wins[i][key_index]]
        assert len(winners) == 1, f"race/{key_index}: winners {winners}"
        assert await store.get(f"race/{key_index}") == f"writer-{winners[0]}".encode()
    assert _temps(root) == []


async def test_listing_and_reads_ignore_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put("a/real", b"1")
    (tmp_path / "a" / f"{TEMP_PREFIX}deadbeef").write_bytes(b"partial")
    assert await store.list("") == ["a/real"]
    assert await store.list("a/") == ["a/real"]
    with pytest.raises(DatastoreError):
        await store.get(f"a/{TEMP_PREFIX}deadbeef")


async def test_remove_stale_temps_spares_fresh_ones(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    stale = tmp_path / f"{TEMP_PREFIX}old"
    fresh = tmp_path / "x" / f"{TEMP_PREFIX}new"
    fresh.parent.mkdir()
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    os.utime(stale, (0, 0))
    assert await store.remove_stale_temps(older_than_s=3600) == 1
    assert not stale.exists()
    assert fresh.exists()


async def test_writes_stay_inside_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("../outside", "a/../../outside", str(tmp_path / "outside")):
        with pytest.raises(DatastoreError):
            await store.put(key, b"x")
    assert os.listdir(tmp_path) == []


async def test_a_key_cannot_also_be_a_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put("a/b", b"file")
    with pytest.raises(DatastoreError, match="clashes"):
        await store.put("a/b/c", b"x")
    await store.put("p/q/r", b"x")
    with pytest.raises(DatastoreError, match="clashes"):
        await store.put("p/q", b"x")
    with pytest.raises(DatastoreError, match="clashes"):
        await store.put_if_absent("p/q", b"x")
    assert await store.list("") == ["a/b", "p/q/r"]


async def test_missing_root_reads_as_empty(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "not-yet")
    assert await store.list("") == []
    assert not await store.exists("k")


async def test_non_durable_store_writes_the_same(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, durable=False)
    await store.put("x/y", b"1")
    assert await store.put_if_absent("x/z", b"2")
    assert await store.list("x/") == ["x/y", "x/z"]


async def test_os_errors_become_datastore_errors(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(DatastoreError):
        await store.put_file("k", tmp_path / "no-such-source")
    assert await store.list("") == []



def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_stream_closes_its_file_when_abandoned(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put("big", os.urandom(1 << 20))
    baseline = _open_fds()

    async with contextlib.aclosing(store.stream("big", chunk_size=1024)) as chunks:
        async for _ in chunks:
            break
    assert _open_fds() == baseline


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_stream_cancelled_mid_read_closes_only_after_the_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    await store.put("big", os.urandom(1 << 10))
    baseline = _open_fds()
    real_read = os.read
    in_read, release = threading.Event(), threading.Event()

    def slow_read(fd: int, n: int) -> bytes:
        if n == 7:  # only the stream under test uses this chunk size
            in_read.set()
            release.wait(timeout=10)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", slow_read)

    async def consume() -> None:
        async for _ in store.stream("big", chunk_size=7):
            pass

    consumer = asyncio.create_task(consume())
    try:
        await wait_until(in_read.is_set)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        # The read is still running in its thread, so the descriptor must stay open.
        assert _open_fds() == baseline + 1
    finally:
        release.set()
    await wait_until(lambda: _open_fds() == baseline)
