"""Attempt records: started/done JSON, first-writer-wins outcomes, attempt listing."""

from __future__ import annotations

import asyncio

import pytest

from millstream.datastore import records
from millstream.datastore.records import AttemptKey
from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError

KEY = AttemptKey("MyFlow", "42", "train", "7", 0)


def test_attempt_key_pathspec_and_keys() -> None:
    assert KEY.pathspec == "MyFlow/42/train/7"
    assert KEY.started_key == "MyFlow/42/train/7/0/started.json"
    assert KEY.done_key == "MyFlow/42/train/7/0/done.json"
    assert KEY.stdout_key == "MyFlow/42/train/7/0/stdout"
    assert KEY.stderr_key == "MyFlow/42/train/7/0/stderr"


@pytest.mark.parametrize("fields", [
    ("my-flow", "1", "s", "1", 0), ("F", "..", "s", "1", 0), ("F", "1", "s", "a/b", 0),
    ("F", "1", "s", "1", -1),
])
def test_attempt_key_validates(fields: tuple[str, str, str, str, int]) -> None:
    with pytest.raises(DatastoreError):
        AttemptKey(*fields)


async def test_records_round_trip_as_compact_sorted_json(store: ObjectStore) -> None:
    await records.write_started(store, KEY, {"pid": 12, "host": "h", "é": [1, 2]})
    assert await store.get(KEY.started_key) == '{"host":"h","pid":12,"é":[1,2]}'.encode()
    assert await records.read_started(store, KEY) == {"pid": 12, "host": "h", "é": [1, 2]}


async def test_missing_records_read_as_none(store: ObjectStore) -> None:
    assert await records.read_started(store, KEY) is None
    assert await records.read_done(store, KEY) is None


async def test_done_is_written_once(store: ObjectStore) -> None:
    assert await records.write_done(store, KEY, {"ok": True})
    assert not await records.write_done(store, KEY, {"ok": False})
    assert await records.read_done(store, KEY) == {"ok": True}


async def test_concurrent_done_writers_agree_on_one_outcome(store: ObjectStore) -> None:
    results = await asyncio.gather(
        *(records.write_done(store, KEY, {"writer": i}) for i in range(20)))
    assert results.count(True) == 1
    assert await records.read_done(store, KEY) == {"writer": results.index(True)}


async def test_non_json_values_are_refused(store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        await records.write_done(store, KEY, {"loss": float("nan")})
    assert await records.read_done(store, KEY) is None


async def test_corrupt_record_raises(store: ObjectStore) -> None:
    await store.put(KEY.done_key, b"{not json")
    with pytest.raises(DatastoreError, match="corrupt"):
        await records.read_done(store, KEY)
    await store.put(KEY.done_key, b"[1]")
    with pytest.raises(DatastoreError, match="JSON object"):
        await records.read_done(store, KEY)


async def test_list_attempts(store: ObjectStore) -> None:
    assert await records.list_attempts(store, "MyFlow", "42", "train", "7") == []
    for attempt in (0, 2, 10):
        await records.write_started(store, AttemptKey("MyFlow", "42", "train", "7", attempt), {})
    await records.write_done(store, AttemptKey("MyFlow", "42", "train", "7", 2), {})
    # Neighbours that share a string prefix must not leak in.
    await records.write_started(store, AttemptKey("MyFlow", "42", "train", "70", 5), {})
    await store.put("MyFlow/42/train/7/junk/x", b"")
    assert await records.list_attempts(store, "MyFlow", "42", "train", "7") == [0, 2, 10]
