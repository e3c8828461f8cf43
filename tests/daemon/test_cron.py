"""Cron arithmetic: time zones, DST, missed instants, catch-up policies."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from millstream.daemon import cron
from millstream.errors import SchedulerError


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_daily_in_a_zone() -> None:
    got = cron.instants("0 9 * * *", "America/New_York", utc(2026, 1, 1), utc(2026, 1, 3, 23))
    assert got == [utc(2026, 1, 1, 14), utc(2026, 1, 2, 14), utc(2026, 1, 3, 14)]


def test_spring_forward_fires_once_after_the_gap() -> None:
    # Europe/Berlin jumps from 02:00 to 03:00 on 2026-03-29: 02:30 does not exist that day.
    got = cron.instants("30 2 * * *", "Europe/Berlin", utc(2026, 3, 28, 12), utc(2026, 3, 30, 12))
    assert got == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


def test_fall_back_fixed_hour_fires_once() -> None:
    # 2026-10-25 02:30 happens twice in Berlin; a daily job runs at the first.
    got = cron.instants("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_fall_back_interval_fires_at_every_real_instant() -> None:
    got = cron.instants("0 * * * *", "Europe/Berlin", utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2, 30))
    assert got == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 2)]


def test_catch_up_policies() -> None:
    last, now = utc(2026, 5, 1, 0, 0), utc(2026, 5, 1, 5, 10)
    assert cron.due("0 * * * *", None, last, now, catchup="latest") == [utc(2026, 5, 1, 5)]
    assert cron.due("0 * * * *", None, last, now, catchup="all") == [utc(2026, 5, 1, h) for h in range(1, 6)]
    assert cron.due("0 * * * *", None, last, now, catchup="none") == []
    assert cron.due("0 * * * *", None, last, utc(2026, 5, 1, 5, 0, 30), catchup="none") == [utc(2026, 5, 1, 5)]
    assert cron.due("0 * * * *", None, now, now) == []


def test_all_catch_up_is_bounded() -> None:
    got = cron.due("* * * * *", None, utc(2026, 1, 1), utc(2026, 1, 10), catchup="all")
    assert len(got) == cron.MAX_CATCHUP


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("0 9 * *", "five fields"),
        ("61 * * * *", "invalid"),
        ("0 9 * * funday", "invalid"),
    ],
)
def test_bad_expressions(expression: str, fragment: str) -> None:
    with pytest.raises(SchedulerError, match=fragment):
        cron.validate(expression)


def test_unknown_zone() -> None:
    with pytest.raises(SchedulerError, match="unknown time zone"):
        cron.instants("0 9 * * *", "Mars/Olympus", utc(2026, 1, 1), utc(2026, 1, 2))


def test_next_instant() -> None:
    assert cron.next_instant("*/15 * * * *", None, utc(2026, 1, 1, 10, 7)) == utc(2026, 1, 1, 10, 15)
