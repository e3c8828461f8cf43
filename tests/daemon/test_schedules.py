"""Schedules fire exactly once per instant, across restarts, with a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from millstream.daemon.schedules import Schedule, ScheduleBook
from millstream.datastore.local import LocalStore
from millstream.errors import SchedulerError


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


class FakeDaemon:
    """Stands for the engine: remembers run keys, starts each once (as request ids do)."""

    def __init__(self) -> None:
        self.started: dict[str, dict[str, Any]] = {}
        self.attempts: list[str] = []
        self.fail_next = 0

    async def submit(self, schedule: Schedule, key: str, extra: dict[str, Any]) -> str | None:
        self.attempts.append(key)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("metadata store unavailable")
        if key in self.started:
            return None
        self.started[key] = extra
        return str(len(self.started))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _book(tmp_path: Path, daemon: FakeDaemon, clock: Clock) -> ScheduleBook:
    return ScheduleBook(LocalStore(tmp_path / "ds", durable=False), "test", daemon.submit, clock=clock)


def _schedule(**kw: Any) -> Schedule:
    base: dict[str, Any] = {
        "name": "nightly",
        "flow": "HelloFlow",
        "owner": "alice",
        "owner_uid": 1000,
        "submission": {"flow": "HelloFlow"},
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
    }
    base.update(kw)
    return Schedule(**base)


async def test_fires_on_time_across_dst_and_restarts(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 10, 24, 12))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule())
    for hour in range(12, 24):  # ticks every hour of the afternoon: nothing due
        clock.now = ts(2026, 10, 24, hour)
        assert await book.tick() == []
    clock.now = ts(2026, 10, 25, 0, 30)  # 02:30 CEST: fires
    assert [k for _, k in await book.tick()] == ["schedule:nightly:2026-10-25T00:30:00+00:00"]
    clock.now = ts(2026, 10, 25, 1, 30)  # the second 02:30 (CET): a daily job does not fire again
    assert await book.tick() == []
    # The daemon restarts: a new book over the same datastore fires nothing twice.
    book = _book(tmp_path, daemon, clock)
    await book.load()
    assert await book.tick() == []
    clock.now = ts(2026, 10, 26, 1, 30)  # next day, 02:30 CET
    assert [k for _, k in await book.tick()] == ["schedule:nightly:2026-10-26T01:30:00+00:00"]
    assert len(daemon.started) == 2


async def test_missed_instants_latest_only(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 5, 1))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule(cron="0 * * * *", timezone=None))
    clock.now = ts(2026, 5, 1, 6, 20)  # the daemon was down from 00:00 to 06:20
    book = _book(tmp_path, daemon, clock)
    await book.load()
    assert [k for _, k in await book.tick()] == ["schedule:nightly:2026-05-01T06:00:00+00:00"]


async def test_missed_instants_all(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 5, 1))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule(cron="0 * * * *", timezone=None, catchup="all"))
    clock.now = ts(2026, 5, 1, 3, 5)
    assert len(await book.tick()) == 3


async def test_crash_between_start_and_record_never_double_fires(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 5, 1))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule(cron="0 * * * *", timezone=None))
    clock.now = ts(2026, 5, 1, 1, 0, 5)
    await daemon.submit(book.get("nightly"), "schedule:nightly:2026-05-01T01:00:00+00:00", {})  # started, not recorded
    assert await book.tick() == []  # the same key: the run exists, nothing new starts
    assert list(daemon.started) == ["schedule:nightly:2026-05-01T01:00:00+00:00"]


async def test_a_failed_fire_is_retried_on_the_next_tick(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 5, 1))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule(cron="0 * * * *", timezone=None))
    clock.now = ts(2026, 5, 1, 1, 0, 5)
    daemon.fail_next = 1
    assert await book.tick() == []
    clock.now += 1
    assert [k for _, k in await book.tick()] == ["schedule:nightly:2026-05-01T01:00:00+00:00"]


async def test_pause_and_resume_skip_what_was_missed(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 5, 1))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule(cron="0 * * * *", timezone=None))
    await book.set_paused("nightly", True)
    clock.now = ts(2026, 5, 1, 5, 30)
    assert await book.tick() == []
    await book.set_paused("nightly", False)
    assert await book.tick() == []
    assert book.get("nightly").next_fire(clock.now) == ts(2026, 5, 1, 6)


async def test_triggers_start_once_per_successful_upstream_run(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 5, 1))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule(name="after-etl", cron=None, triggers=["EtlFlow"]))
    assert await book.on_run_finished("EtlFlow", "7", "failed") == []
    assert await book.on_run_finished("OtherFlow", "7", "ok") == []
    assert len(await book.on_run_finished("EtlFlow", "7", "ok")) == 1
    assert await book.on_run_finished("EtlFlow", "7", "ok") == []  # reported twice: one run
    assert daemon.started["trigger:after-etl:EtlFlow/7"]["trigger"]["pathspec"] == "EtlFlow/7"


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"cron": None, "triggers": []}, "needs a cron"),
        ({"cron": "99 * * * *"}, "invalid"),
        ({"timezone": "Nowhere/City"}, "unknown time zone"),
        ({"catchup": "some"}, "catch-up policy"),
        ({"name": "../x"}, "schedule name"),
    ],
)
async def test_bad_schedules_are_refused(tmp_path: Path, kw: dict[str, Any], fragment: str) -> None:
    book = _book(tmp_path, FakeDaemon(), Clock(ts(2026, 5, 1)))
    with pytest.raises(SchedulerError, match=fragment):
        await book.put(_schedule(**kw))


async def test_a_schedule_whose_cron_breaks_does_not_stop_the_others(tmp_path: Path) -> None:
    daemon, clock = FakeDaemon(), Clock(ts(2026, 3, 1, 12))
    book = _book(tmp_path, daemon, clock)
    await book.put(_schedule(name="hourly", cron="0 * * * *", timezone="UTC"))
    # Saved before validation refused it (February 31st never comes): loaded as it is.
    book.schedules["never"] = _schedule(name="never", cron="0 0 31 2 *", timezone="UTC")
    with pytest.raises(Exception):  # noqa: B017 - whatever croniter raises
        book.schedules["never"].next_fire(clock.now)
    assert book._upcoming(clock.now) == [ts(2026, 3, 1, 13)]
    clock.now = ts(2026, 3, 1, 13, 0, 5)
    assert [name for name, _ in await book.tick()] == ["hourly"]
