"""Content-addressed artifacts: framing, the compression decision, dedupe and loading."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import os
import pickle
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from millstream.datastore import artifacts, layout
from millstream.datastore.artifacts import ArtifactRef, ArtifactStore
from millstream.datastore.local import LocalStore
from millstream.datastore.storage import DEFAULT_CHUNK_BYTES, ObjectStore
from millstream.errors import DatastoreError, NotFound


@dataclass
class Point:
    """A user-defined type, to check the recorded type name."""

    x: int
    y: int


@pytest.mark.parametrize("obj", [
    None, 0, 3.5, "text", b"bytes", [1, 2, [3]], {"a": (1, 2)}, {1, 2, 3},
    Point(1, 2), list(range(20_000)),
])
def test_serialize_round_trips(obj: Any) -> None:
    sha, blob = artifacts.serialize(obj)
    assert artifacts.deserialize(blob) == obj
    assert artifacts.blob_sha(blob) == sha


def test_id_is_the_sha256_of_the_protocol_5_pickle() -> None:
    obj = {"k": [1.5, 2.5]}
    sha, _ = artifacts.serialize(obj)
    assert sha == hashlib.sha256(pickle.dumps(obj, protocol=5)).hexdigest()
    assert artifacts.serialize({"k": [1.5, 2.5]})[0] == sha
    assert artifacts.serialize({"k": [1.5, 2.6]})[0] != sha


def test_small_pickles_stay_raw() -> None:
    compressible = "a" * 4000  # compresses well, but is under the 4 KiB threshold
    _, blob = artifacts.serialize(compressible)
    assert blob[0] == artifacts.RAW


@pytest.mark.parametrize("count", [50_000, 150_000])
def test_compressible_pickles_are_compressed(count: int) -> None:
    # 150k floats pickle to over 1 MiB, so they pass the sampling probe first.
    floats = [i * 0.5 for i in range(count)]
    _, blob = artifacts.serialize(floats)
    assert blob[0] == artifacts.ZLIB
    assert len(blob) < 0.5 * len(pickle.dumps(floats, protocol=5))
    assert artifacts.deserialize(blob) == floats


@pytest.mark.parametrize("size", [8 << 10, (1 << 20) + 4096])
def test_incompressible_pickles_stay_raw(size: int) -> None:
    # The larger size goes through the sampling probe, the smaller through a full try.
    noise = os.urandom(size)
    _, blob = artifacts.serialize(noise)
    assert blob[0] == artifacts.RAW
    assert blob[1:] == pickle.dumps(noise, protocol=5)


def test_saving_under_ten_percent_is_not_kept() -> None:
    # Half random, half zeros saves ~50 %; 95 % random saves under 10 %.
    rng = random.Random(1)
    mostly_noise = rng.randbytes(9500) + bytes(500)
    assert artifacts.serialize(mostly_noise)[1][0] == artifacts.RAW
    half_noise = rng.randbytes(5000) + bytes(5000)
    assert artifacts.serialize(half_noise)[1][0] == artifacts.ZLIB


@pytest.mark.parametrize("blob", [b"", b"\x07abc", b"\x01not zlib"])
def test_corrupt_blobs_are_refused(blob: bytes) -> None:
    with pytest.raises(DatastoreError, match="corrupt"):
        artifacts.deserialize(blob)


def test_type_names() -> None:
    assert artifacts.type_name(3) == "int"
    assert artifacts.type_name(Point(0, 0)) == f"{__name__}.Point"


def test_artifact_ref_round_trips_through_json() -> None:
    ref = ArtifactRef("ab" * 32, 123, "list")
    assert ArtifactRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


@pytest.mark.parametrize("data", [
    {}, {"sha": "ab" * 32, "size": 1}, {"sha": "xyz", "size": 1, "type": "int"},
    {"sha": "ab" * 32, "size": -1, "type": "int"}, {"sha": "ab" * 32, "size": True, "type": "t"},
    {"sha": "ab" * 32, "size": 1, "type": 5}, [],
])
def test_malformed_refs_are_refused(data: Any) -> None:
    with pytest.raises(DatastoreError):
        ArtifactRef.from_dict(data)


async def test_save_and_load(store: ObjectStore) -> None:
    arts = ArtifactStore(store, "MyFlow")
    values = {"model": {"weights": [0.1] * 3000}, "n": 7, "name": "x", "point": Point(1, 2)}
    refs = await arts.save(values)
    assert set(refs) == set(values)
    assert refs["n"].type_name == "int"
    assert refs["point"].type_name == f"{__name__}.Point"
    for name, value in values.items():
        assert await arts.load(refs[name].sha) == value
        key = layout.artifact_key("MyFlow", refs[name].sha)
        assert await store.size(key) == refs[name].size


async def test_equal_values_are_stored_once(store: ObjectStore) -> None:
    arts = ArtifactStore(store, "MyFlow")
    refs = await arts.save({"a": [1, 2, 3], "b": [1, 2, 3], "c": "other"})
    assert refs["a"].sha == refs["b"].sha != refs["c"].sha
    assert len(await store.list("MyFlow/data/")) == 2
    again = await arts.save({"z": [1, 2, 3]})
    assert again["z"] == ArtifactRef(refs["a"].sha, refs["a"].size, "list")
    assert len(await store.list("MyFlow/data/")) == 2


async def test_save_blob_verifies_and_creates_once(store: ObjectStore) -> None:
    arts = ArtifactStore(store, "MyFlow")
    sha, blob = artifacts.serialize(list(range(100)))
    assert await arts.save_blob(sha, blob)
    assert not await arts.save_blob(sha, blob)
    other_sha, _ = artifacts.serialize("other")
    with pytest.raises(DatastoreError, match="hashes to"):
        await arts.save_blob(other_sha, blob)


async def test_load_detects_corruption_and_missing(store: ObjectStore) -> None:
    arts = ArtifactStore(store, "MyFlow")
    sha, _ = artifacts.serialize("genuine")
    _, forged = artifacts.serialize("forged")
    await store.put(layout.artifact_key("MyFlow", sha), forged)
    with pytest.raises(DatastoreError, match="corrupt"):
        await arts.load(sha)
    with pytest.raises(NotFound):
        await arts.load("0" * 64)


async def test_unpicklable_artifact_names_itself(store: ObjectStore) -> None:
    arts = ArtifactStore(store, "MyFlow")
    with pytest.raises(DatastoreError, match="'lock'"):
        await arts.save({"fine": 1, "lock": threading.Lock()})
    assert await store.list("") == []


class _CountingStore:
    """Wraps a store and records how many writes were in flight at once."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.in_flight = 0
        self.peak = 0

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            return await self.inner.put_if_absent(key, data)
        finally:
            self.in_flight -= 1

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(key, data)

    async def get(self, key: str) -> bytes:
        return await self.inner.get(key)

    async def get_range(self, key: str, start: int, end: int | None = None) -> bytes:
        return await self.inner.get_range(key, start, end)

    def stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_BYTES) -> AsyncIterator[bytes]:
        return self.inner.stream(key, chunk_size)

    async def put_file(self, key: str, path: Path) -> None:
        await self.inner.put_file(key, path)

    async def get_file(self, key: str, path: Path) -> None:
        await self.inner.get_file(key, path)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def list(self, prefix: str) -> builtins.list[str]:
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def size(self, key: str) -> int:
        return await self.inner.size(key)


async def test_uploads_are_concurrent_but_bounded(store: ObjectStore) -> None:
    counting = _CountingStore(store)
    arts = ArtifactStore(counting, "MyFlow", max_in_flight=3)
    refs = await arts.save({f"a{i}": i for i in range(12)})
    assert counting.peak == 3
    assert len(await store.list("MyFlow/data/")) == len(refs) == 12


async def test_a_failed_upload_raises_the_datastore_error(store: ObjectStore) -> None:
    class Failing(_CountingStore):
        async def put_if_absent(self, key: str, data: bytes) -> bool:
            raise DatastoreError("disk on fire")

    with pytest.raises(DatastoreError, match="disk on fire"):
        await ArtifactStore(Failing(store), "MyFlow").save({"a": 1, "b": 2})


def test_bad_flow_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatastoreError):
        ArtifactStore(LocalStore(tmp_path), "not-an-identifier")
