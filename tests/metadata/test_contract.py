"""The MetadataStore contract: every implementation (SQLite, the service over HTTP) passes it.

Times are passed as ``now=`` so the suite needs no control of a server's clock. Runs meant
to be alive are stamped at or after the real present (whole seconds, which every backend
stores exactly); runs meant to be dead are stamped two days ago. That assumes only that
the store's ``dead_after_s`` lies between a minute and a day.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from millstream.errors import MetadataConflict, MetadataError, MetadataNotFound
from millstream.metadata.model import DEAD_RUN_MESSAGE, ArtifactRecord, AttemptRecord, RunRecord
from millstream.metadata.store import MetadataStore

LONG_AGO_S = 2 * 86400.0


def present() -> float:
    """The current time in whole seconds."""
    return float(int(time.time()))


def ids(runs: list[RunRecord]) -> list[str]:
    """Run ids, in listing order."""
    return [r.run_id for r in runs]


async def make_task(store: MetadataStore, step: str = "start", task_id: str = "1") -> str:
    """A run of F with one recorded task; returns the run id."""
    run = await store.create_run("F", user="ann")
    await store.record_task("F", run.run_id, step, task_id)
    return run.run_id


# ----------------------------------------------------------------- create and get


async def test_create_run_allocates_ids_per_flow(store: MetadataStore) -> None:
    now = present()
    first = await store.create_run("A", user="ann", params={"alpha": 0.5, "n": [1, 2]}, tags=["t1"],
                                   system_tags=["user:ann"], daemon_id="d1", origin_run_id="7", now=now)
    assert first.run_id == "1"
    assert (first.flow, first.user, first.status, first.created_at) == ("A", "ann", "running", now)
    assert first.params == {"alpha": 0.5, "n": [1, 2]}
    assert (first.tags, first.system_tags) == (("t1",), ("user:ann",))
    assert (first.daemon_id, first.origin_run_id, first.finished_at) == ("d1", "7", None)
    assert [(await store.create_run("A", user="ann")).run_id for _ in range(2)] == ["2", "3"]
    assert (await store.create_run("B", user="bob")).run_id == "1"
    assert (await store.create_run("A", user="ann")).run_id == "4"
    assert await store.get_run("A", "1") == first


async def test_concurrent_creates_get_distinct_consecutive_ids(store: MetadataStore) -> None:
    runs = await asyncio.gather(*(store.create_run("F", user="ann") for _ in range(20)))
    assert sorted(int(r.run_id) for r in runs) == list(range(1, 21))


async def test_repeated_request_id_returns_the_same_run(store: MetadataStore) -> None:
    first = await store.create_run("F", user="ann", request_id="req-1")
    again = await store.create_run("F", user="ann", request_id="req-1")
    assert again == first
    racing = await asyncio.gather(*(store.create_run("F", user="ann", request_id="req-2") for _ in range(5)))
    assert {r.run_id for r in racing} == {"2"}
    assert (await store.create_run("F", user="ann", request_id="req-3")).run_id == "3"
    with pytest.raises(MetadataConflict):  # request ids are unique across flows
        await store.create_run("G", user="ann", request_id="req-1")
    assert len((await store.list_runs(flow="F")).items) == 3
    assert await store.list_flows() == ["F"]


async def test_get_run_not_found(store: MetadataStore) -> None:
    await store.create_run("F", user="ann")
    for flow, run_id in [("F", "2"), ("G", "1"), ("F", "abc")]:
        with pytest.raises(MetadataNotFound):
            await store.get_run(flow, run_id)


async def test_list_flows(store: MetadataStore) -> None:
    assert await store.list_flows() == []
    for flow in ["Zeta", "Alpha", "Mid", "Alpha"]:
        await store.create_run(flow, user="ann")
    assert await store.list_flows() == ["Alpha", "Mid", "Zeta"]


# ----------------------------------------------------------------- listing


async def test_list_runs_newest_first_then_by_run_id(store: MetadataStore) -> None:
    now = present()
    for offset in [1, 3, 2, 2]:  # runs 1..4; runs 3 and 4 share a creation time
        await store.create_run("F", user="ann", now=now + offset)
    await store.create_run("G", user="ann", now=now + 10)
    assert ids((await store.list_runs(flow="F")).items) == ["2", "4", "3", "1"]
    everything = (await store.list_runs()).items
    assert [(r.flow, r.run_id) for r in everything] == [("G", "1"), ("F", "2"), ("F", "4"), ("F", "3"), ("F", "1")]


async def test_list_runs_filters(store: MetadataStore) -> None:
    now = present()
    one = await store.create_run("F", user="ann", tags=["red", "big"], system_tags=["user:ann"], now=now)
    two = await store.create_run("F", user="bob", tags=["red"], system_tags=["user:bob", "big"], now=now + 1)
    three = await store.create_run("F", user="ann", tags=["blue"], now=now + 2)
    await store.create_run("G", user="ann", tags=["red", "big"], now=now + 3)
    await store.finish_run("F", two.run_id, status="ok", now=now + 5)
    await store.finish_run("F", three.run_id, status="cancelled", now=now + 5)

    async def listed(**filters: object) -> list[str]:
        return ids((await store.list_runs(flow="F", **filters)).items)  # type: ignore[arg-type]

    assert await listed(status="running") == [one.run_id]
    assert await listed(status="ok") == [two.run_id]
    assert await listed(status="cancelled") == [three.run_id]
    assert await listed(status="failed") == []
    assert await listed(user="ann") == [three.run_id, one.run_id]
    assert await listed(user="nobody") == []
    assert await listed(tags=["red"]) == [two.run_id, one.run_id]
    assert await listed(tags=["red", "big"]) == [two.run_id, one.run_id]  # "big" is a system tag of run 2
    assert await listed(tags=["red", "blue"]) == []
    assert await listed(tags=["user:bob"]) == [two.run_id]
    assert await listed(user="ann", tags=["red"], status="running") == [one.run_id]
    assert len((await store.list_runs(tags=["red", "big"])).items) == 3  # across flows


async def test_list_runs_time_range_is_half_open(store: MetadataStore) -> None:
    now = present()
    for offset in range(5):
        await store.create_run("F", user="ann", now=now + offset)
    assert ids((await store.list_runs(flow="F", created_after=now + 1)).items) == ["5", "4", "3", "2"]
    assert ids((await store.list_runs(flow="F", created_before=now + 1)).items) == ["1"]
    assert ids((await store.list_runs(flow="F", created_after=now + 1, created_before=now + 3)).items) == ["3", "2"]
    assert (await store.list_runs(flow="F", created_after=now + 10)).items == []


async def test_pagination_through_120_runs(store: MetadataStore) -> None:
    now = present()
    for offset in range(120):
        await store.create_run("F", user="ann", now=now + offset)
    await store.create_run("Other", user="ann", now=now + 500)
    pages, cursor = [], None
    while True:
        page = await store.list_runs(flow="F", limit=50, cursor=cursor)
        pages.append(ids(page.items))
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [len(p) for p in pages] == [50, 50, 20]
    assert [run_id for p in pages for run_id in p] == [str(n) for n in range(120, 0, -1)]


async def test_pagination_across_flows_with_equal_times(store: MetadataStore) -> None:
    now = present()
    for n in range(15):
        for flow in ("A", "B"):
            await store.create_run(flow, user="ann", now=now + n // 2)
    seen: list[tuple[str, str]] = []
    page = await store.list_runs(limit=3)  # odd: pages end between A/n and B/n
    seen += [(r.flow, r.run_id) for r in page.items]
    while page.next_cursor is not None:
        page = await store.list_runs(limit=3, cursor=page.next_cursor)
        seen += [(r.flow, r.run_id) for r in page.items]
    assert len(seen) == len(set(seen)) == 30
    assert seen == [(r.flow, r.run_id) for r in (await store.list_runs(limit=100)).items]


async def test_pagination_with_a_filter(store: MetadataStore) -> None:
    now = present()
    for n in range(30):
        await store.create_run("F", user="ann", tags=["even"] if n % 2 == 0 else [], now=now + n)
    first = await store.list_runs(flow="F", tags=["even"], limit=10)
    second = await store.list_runs(flow="F", tags=["even"], limit=10, cursor=first.next_cursor)
    assert ids(first.items + second.items) == [str(n) for n in range(29, 0, -2)]
    assert second.next_cursor is None


# ----------------------------------------------------------------- lifecycle


async def test_finish_run(store: MetadataStore) -> None:
    now = present()
    run = await store.create_run("F", user="ann", now=now)
    done = await store.finish_run("F", run.run_id, status="failed", message="step b failed", now=now + 9)
    assert (done.status, done.message, done.finished_at) == ("failed", "step b failed", now + 9)
    assert await store.get_run("F", run.run_id) == done
    assert await store.finish_run("F", run.run_id, status="failed", now=now + 20) == done  # a retried call
    with pytest.raises(MetadataConflict):
        await store.finish_run("F", run.run_id, status="ok")
    assert await store.get_run("F", run.run_id) == done
    with pytest.raises(MetadataNotFound):
        await store.finish_run("F", "99", status="ok")


async def test_dead_runs_read_as_failed_until_they_beat(store: MetadataStore) -> None:
    long_ago = time.time() - LONG_AGO_S
    silent = await store.create_run("F", user="ann", now=long_ago)
    beat_long_ago = await store.create_run("F", user="ann", now=long_ago)
    await store.heartbeat_run("F", beat_long_ago.run_id, now=long_ago + 60)
    revived = await store.create_run("F", user="ann", now=long_ago)
    await store.heartbeat_run("F", revived.run_id)
    finished = await store.create_run("F", user="ann", now=long_ago)
    await store.finish_run("F", finished.run_id, status="ok", now=long_ago + 1)
    fresh = await store.create_run("F", user="ann")

    for run_id in (silent.run_id, beat_long_ago.run_id):
        dead = await store.get_run("F", run_id)
        assert (dead.status, dead.message) == ("failed", DEAD_RUN_MESSAGE)
    assert (await store.get_run("F", revived.run_id)).status == "running"
    assert (await store.get_run("F", revived.run_id)).heartbeat_at is not None
    assert (await store.get_run("F", finished.run_id)).status == "ok"
    assert (await store.get_run("F", fresh.run_id)).status == "running"
    assert set(ids((await store.list_runs(flow="F", status="failed")).items)) == {silent.run_id,
                                                                                  beat_long_ago.run_id}
    assert set(ids((await store.list_runs(flow="F", status="running")).items)) == {revived.run_id, fresh.run_id}
    listed = {r.run_id: r for r in (await store.list_runs(flow="F")).items}
    assert listed[silent.run_id].message == DEAD_RUN_MESSAGE

    await store.heartbeat_run("F", silent.run_id)  # its daemon was only paused
    assert (await store.get_run("F", silent.run_id)).status == "running"
    await store.heartbeat_run("F", finished.run_id)  # a late beat does not reopen a finished run
    assert (await store.get_run("F", finished.run_id)).status == "ok"
    with pytest.raises(MetadataNotFound):
        await store.heartbeat_run("F", "99")


async def test_tags(store: MetadataStore) -> None:
    # Tags are sets: the contract fixes membership and uniqueness, not order.
    run = await store.create_run("F", user="ann", tags=["a"], system_tags=["user:ann", "runtime:x"])
    tagged = await store.add_tags("F", run.run_id, ["b", "c", "a"])
    assert sorted(tagged.tags) == ["a", "b", "c"]
    untagged = await store.remove_tags("F", run.run_id, ["b", "user:ann", "missing"])
    assert (sorted(untagged.tags), sorted(untagged.system_tags)) == (["a", "c"], ["runtime:x", "user:ann"])
    assert await store.get_run("F", run.run_id) == untagged
    assert ids((await store.list_runs(tags=["c"])).items) == [run.run_id]
    assert (await store.list_runs(tags=["b"])).items == []
    with pytest.raises(MetadataNotFound):
        await store.add_tags("F", "99", ["x"])


# ----------------------------------------------------------------- tasks and attempts


async def test_record_task_is_idempotent_and_refuses_another_shape(store: MetadataStore) -> None:
    run = await store.create_run("F", user="ann")
    now = present()
    for _ in range(2):
        await store.record_task("F", run.run_id, "a", "2", foreach_index=[0, 3], parents=["start/1"],
                                origin="F/1/a/2", now=now)
    task = await store.get_task("F", run.run_id, "a", "2")
    assert (task.status, task.foreach_index, task.parents, task.origin) == ("pending", (0, 3), ("start/1",),
                                                                            "F/1/a/2")
    assert (task.attempts, task.created_at, task.pathspec) == ((), now, f"F/{run.run_id}/a/2")
    assert len(await store.list_tasks("F", run.run_id)) == 1
    with pytest.raises(MetadataConflict):
        await store.record_task("F", run.run_id, "a", "2", foreach_index=[0, 4], parents=["start/1"],
                                origin="F/1/a/2")
    assert await store.get_task("F", run.run_id, "a", "2") == task
    with pytest.raises(MetadataNotFound):
        await store.record_task("F", "99", "a", "1")
    with pytest.raises(MetadataNotFound):
        await store.get_task("F", run.run_id, "a", "3")


async def test_record_attempt_creates_then_updates(store: MetadataStore) -> None:
    now = present()
    run_id = await make_task(store)
    await store.record_attempt("F", run_id, "start", "1", AttemptRecord(
        attempt=0, status="running", started_at=now, handle={"pid": 42, "start_time": 7}))
    assert (await store.get_task("F", run_id, "start", "1")).status == "running"
    await store.record_attempt("F", run_id, "start", "1", AttemptRecord(
        attempt=0, status="failed", finished_at=now + 5, exit_code=1, message="boom"))
    await store.record_attempt("F", run_id, "start", "1", AttemptRecord(attempt=1, status="running",
                                                                        started_at=now + 6))
    task = await store.get_task("F", run_id, "start", "1")
    assert task.status == "running"
    assert task.attempts == (
        AttemptRecord(attempt=0, status="failed", started_at=now, finished_at=now + 5, exit_code=1,
                      message="boom", handle={"pid": 42, "start_time": 7}),
        AttemptRecord(attempt=1, status="running", started_at=now + 6),
    )
    await store.record_attempt("F", run_id, "start", "1", AttemptRecord(attempt=1, status="ok", exit_code=0))
    task = await store.get_task("F", run_id, "start", "1")
    assert (task.status, task.attempts[1].started_at, task.attempts[1].exit_code) == ("ok", now + 6, 0)
    with pytest.raises(MetadataNotFound):
        await store.record_attempt("F", run_id, "start", "2", AttemptRecord(attempt=0))


async def test_list_tasks_with_attempts(store: MetadataStore) -> None:
    run = await store.create_run("F", user="ann")
    other = await store.create_run("F", user="ann")
    now = present()
    layout = [("start", "1"), ("a", "2"), ("a", "3"), ("join", "4")]
    for n, (step, task_id) in enumerate(layout):
        await store.record_task("F", run.run_id, step, task_id, now=now + n)
        for attempt in range(n % 3):  # the last attempt of each task succeeds
            status = "ok" if attempt == n % 3 - 1 else "failed"
            await store.record_attempt("F", run.run_id, step, task_id, AttemptRecord(attempt=attempt, status=status))
    await store.record_task("F", other.run_id, "a", "2")
    tasks = await store.list_tasks("F", run.run_id)
    assert [(t.step, t.task_id) for t in tasks] == layout
    assert [[a.attempt for a in t.attempts] for t in tasks] == [[], [0], [0, 1], []]
    assert [t.status for t in tasks] == ["pending", "ok", "ok", "pending"]
    assert tasks[1] == await store.get_task("F", run.run_id, "a", "2")
    a_tasks = await store.list_tasks("F", run.run_id, step="a")
    assert [(t.task_id, len(t.attempts)) for t in a_tasks] == [("2", 1), ("3", 2)]
    assert await store.list_tasks("F", run.run_id, step="nope") == []
    assert [t.task_id for t in await store.list_tasks("F", other.run_id)] == ["2"]
    assert await store.list_tasks("F", (await store.create_run("F", user="ann")).run_id) == []
    with pytest.raises(MetadataNotFound):
        await store.list_tasks("F", "99")


# ----------------------------------------------------------------- artifacts and metadata


async def test_artifacts(store: MetadataStore) -> None:
    run_id = await make_task(store)
    x0 = ArtifactRecord(name="x", sha="aa", size=1, type_name="int")
    x1 = ArtifactRecord(name="x", sha="bb", size=2, type_name="int")
    y1 = ArtifactRecord(name="y", sha="cc", size=3, type_name="str")
    assert await store.get_artifacts("F", run_id, "start", "1") == []
    await store.record_attempt("F", run_id, "start", "1", AttemptRecord(attempt=0, status="failed"))
    await store.record_artifacts("F", run_id, "start", "1", 0, [x0])
    assert await store.get_artifacts("F", run_id, "start", "1") == [x0]  # no ok attempt: the latest
    await store.record_attempt("F", run_id, "start", "1", AttemptRecord(attempt=1, status="ok"))
    for _ in range(2):
        await store.record_artifacts("F", run_id, "start", "1", 1, [y1, x1])
    # A later attempt that did not succeed (a duplicate a recovery cancelled) does not hide the ok one.
    await store.record_attempt("F", run_id, "start", "1", AttemptRecord(attempt=2, status="cancelled"))
    await store.record_artifacts("F", run_id, "start", "1", 2, [x0])
    assert await store.get_artifacts("F", run_id, "start", "1") == [x1, y1]
    assert await store.get_artifacts("F", run_id, "start", "1", attempt=0) == [x0]
    assert await store.get_artifacts("F", run_id, "start", "1", attempt=5) == []
    with pytest.raises(MetadataConflict):  # an attempt's artifacts never change
        await store.record_artifacts("F", run_id, "start", "1", 1, [ArtifactRecord("y", "dd", 3, "str")])
    with pytest.raises(MetadataError):
        await store.record_artifacts("F", run_id, "start", "1", 3, [x0, x1])  # two values named x
    assert await store.get_artifacts("F", run_id, "start", "1", attempt=1) == [x1, y1]
    assert await store.get_artifacts("F", run_id, "start", "1", attempt=3) == []
    with pytest.raises(MetadataNotFound):
        await store.record_artifacts("F", run_id, "start", "9", 0, [x0])
    with pytest.raises(MetadataNotFound):
        await store.get_artifacts("F", run_id, "end", "1")


async def test_metadata_merges(store: MetadataStore) -> None:
    run_id = await make_task(store)
    assert await store.get_metadata("F", run_id, "start", "1") == {}
    await store.set_metadata("F", run_id, "start", "1", {"host": "h1", "python": "3.11"})
    await store.set_metadata("F", run_id, "start", "1", {"host": "h2", "log": "s3://b/k"})
    assert await store.get_metadata("F", run_id, "start", "1") == {"host": "h2", "python": "3.11", "log": "s3://b/k"}
    with pytest.raises(MetadataNotFound):
        await store.set_metadata("F", run_id, "start", "2", {"a": "b"})
    with pytest.raises(MetadataNotFound):
        await store.get_metadata("F", run_id, "start", "2")


# ----------------------------------------------------------------- bad input


async def test_bad_input_is_refused_without_side_effects(store: MetadataStore) -> None:
    run_id = await make_task(store)
    before = await store.get_run("F", run_id)
    for status in ("bogus", "running"):
        with pytest.raises(MetadataError):
            await store.finish_run("F", run_id, status=status)
    assert await store.get_run("F", run_id) == before
    with pytest.raises(MetadataError):
        await store.record_attempt("F", run_id, "start", "1", AttemptRecord(attempt=-1))
    with pytest.raises(MetadataError):
        await store.record_attempt("F", run_id, "start", "1", AttemptRecord(attempt=0, status="bogus"))
    with pytest.raises(MetadataError):
        await store.record_artifacts("F", run_id, "start", "1", -1, [])
    assert (await store.get_task("F", run_id, "start", "1")).attempts == ()
    with pytest.raises(MetadataError):
        await store.create_run("", user="ann")
    with pytest.raises(MetadataError):
        await store.list_runs(status="bogus")
    with pytest.raises(MetadataError):
        await store.list_runs(limit=0)
    with pytest.raises(MetadataError):
        await store.list_runs(cursor="not-a-cursor")
    assert await store.list_flows() == ["F"]
    assert (await store.create_run("F", user="ann")).run_id == str(int(run_id) + 1)
