"""The ObjectStore contract, run against every backend in ``conftest.BACKENDS``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError, NotFound


async def test_backend_satisfies_the_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


async def test_put_then_get_returns_the_bytes(store: ObjectStore) -> None:
    await store.put("a/b/c.bin", b"hello")
    assert await store.get("a/b/c.bin") == b"hello"


async def test_put_overwrites(store: ObjectStore) -> None:
    await store.put("k", b"old value")
    await store.put("k", b"new")
    assert await store.get("k") == b"new"


async def test_empty_value_round_trips(store: ObjectStore) -> None:
    await store.put("empty", b"")
    assert await store.get("empty") == b""
    assert await store.size("empty") == 0


async def test_get_missing_raises_not_found_which_is_a_key_error(store: ObjectStore) -> None:
    with pytest.raises(NotFound) as caught:
        await store.get("no/such/key")
    assert isinstance(caught.value, KeyError)
    assert str(caught.value) == "no/such/key"


async def test_a_folder_is_not_an_object(store: ObjectStore) -> None:
    await store.put("folder/inner", b"x")
    assert not await store.exists("folder")
    with pytest.raises(NotFound):
        await store.get("folder")
    with pytest.raises(NotFound):
        await store.size("folder")


async def test_exists_and_size(store: ObjectStore) -> None:
    assert not await store.exists("x/y")
    await store.put("x/y", b"12345")
    assert await store.exists("x/y")
    assert await store.size("x/y") == 5
    with pytest.raises(NotFound):
        await store.size("x/z")


async def test_delete_removes_and_tolerates_missing(store: ObjectStore) -> None:
    await store.put("d/k", b"v")
    await store.delete("d/k")
    assert not await store.exists("d/k")
    await store.delete("d/k")
    await store.delete("never/was")


@pytest.mark.parametrize(("start", "end", "expected"), [
    (0, 4, b"0123"),
    (3, 7, b"3456"),
    (5, None, b"56789"),
    (8, 100, b"89"),
    (10, None, b""),
    (42, 50, b""),
    (4, 4, b""),
])
async def test_get_range(store: ObjectStore, start: int, end: int | None,
                         expected: bytes) -> None:
    await store.put("r", b"0123456789")
    assert await store.get_range("r", start, end) == expected


@pytest.mark.parametrize(("start", "end"), [(-1, None), (5, 2)])
async def test_get_range_rejects_bad_ranges(store: ObjectStore, start: int,
                                            end: int | None) -> None:
    await store.put("r", b"0123456789")
    with pytest.raises(DatastoreError):
        await store.get_range("r", start, end)


async def test_get_range_missing_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.get_range("missing", 0, 1)


async def test_stream_yields_bounded_chunks(store: ObjectStore) -> None:
    data = os.urandom(10_000)
    await store.put("s", data)
    chunks = [chunk async for chunk in store.stream("s", chunk_size=4096)]
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [4096, 4096, 1808]


async def test_stream_missing_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        async for _ in store.stream("missing"):
            pass


async def test_put_file_and_get_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    data = os.urandom((3 << 20) + 17)  # more than one chunk
    source.write_bytes(data)
    await store.put_file("files/blob", source)
    assert await store.size("files/blob") == len(data)

    target = tmp_path / "out" / "nested" / "blob"
    await store.get_file("files/blob", target)
    assert target.read_bytes() == data


async def test_get_file_of_missing_key_leaves_no_file(store: ObjectStore,
                                                      tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(NotFound):
        await store.get_file("missing", target)
    assert not target.exists()


async def test_list_is_recursive_sorted_and_prefix_based(store: ObjectStore) -> None:
    keys = ["f/r1/s/1/0/done.json", "f/r1/s/1/0/started.json", "f/r1/a", "f/r10/x",
            "f/r2/y", "g/z"]
    for key in reversed(keys):
        await store.put(key, b"")
    assert await store.list("f/r1/") == ["f/r1/a", "f/r1/s/1/0/done.json",
                                         "f/r1/s/1/0/started.json"]
    # A plain string prefix, as on S3: "f/r1" also matches "f/r10".
    assert await store.list("f/r1") == ["f/r1/a", "f/r1/s/1/0/done.json",
                                        "f/r1/s/1/0/started.json", "f/r10/x"]
    assert await store.list("") == sorted(keys)
    assert await store.list("f/r1/s/1/0/d") == ["f/r1/s/1/0/done.json"]
    assert await store.list("nothing/") == []
    assert await store.list("f/r1/a") == ["f/r1/a"]


async def test_put_if_absent_creates_once(store: ObjectStore) -> None:
    assert await store.put_if_absent("once", b"first")
    assert not await store.put_if_absent("once", b"second")
    assert await store.get("once") == b"first"


async def test_put_if_absent_has_one_winner_among_concurrent_writers(
        store: ObjectStore) -> None:
    payloads = [f"writer-{i}".encode() * 100 for i in range(20)]
    results = await asyncio.gather(*(store.put_if_absent("contested", p) for p in payloads))
    assert results.count(True) == 1
    assert await store.get("contested") == payloads[results.index(True)]
    assert await store.list("") == ["contested"]


@pytest.mark.parametrize("key", [
    "", "/etc/passwd", "../escape", "a/../../b", "a/./b", "a//b", "a/", ".", "..",
    "a\x00b", "line\nbreak", "a/.tmp-123", "x" * 1025, "a/" + "y" * 256, "bad\udc80",
])
async def test_unsafe_keys_are_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(DatastoreError):
        await store.put(key, b"x")
    with pytest.raises(DatastoreError):
        await store.get(key)
    with pytest.raises(DatastoreError):
        await store.put_if_absent(key, b"x")
    with pytest.raises(DatastoreError):
        await store.delete(key)


@pytest.mark.parametrize("prefix", ["/abs", "../", "a/..", "a/../b/", "a//"])
async def test_unsafe_prefixes_are_rejected(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(DatastoreError):
        await store.list(prefix)


async def test_keys_may_hold_unicode_and_dots(store: ObjectStore) -> None:
    await store.put("flöw/run.1/a-b_c/..x", b"ok")
    assert await store.list("flöw/") == ["flöw/run.1/a-b_c/..x"]
