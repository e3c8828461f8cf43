"""Cron arithmetic for daemon schedules: pure functions of (expression, zone, times).

Times are aware datetimes; the expression is read in the schedule's time zone
(default UTC) with croniter. Around daylight-saving changes the rules are Vixie cron's:

- spring forward: an instant that does not exist locally (02:30 when clocks jump from
  02:00 to 03:00) fires at the first moment after the gap (03:00), once;
- fall back: a schedule at a fixed hour (``30 2 * * *``) fires once, at the first of
  the two 02:30s; one whose hour field is ``*`` or ``*/n`` fires at every real instant.

Missed instants (the daemon was down) are handled by a catch-up policy:
``latest`` (default: fire the most recent missed instant only), ``all`` (every missed
instant, at most ``MAX_CATCHUP``), ``none`` (skip them; fire only instants not older
than ``grace_s``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterNotAlphaError, croniter

from millstream.errors import SchedulerError

CATCHUP_POLICIES = ("latest", "all", "none")
MAX_CATCHUP = 100
DEFAULT_GRACE_S = 60.0


def zone(name: str | None) -> ZoneInfo:
    """The time zone of a schedule; a clear error for an unknown name."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise SchedulerError(f"unknown time zone {name!r} (use an IANA name like Europe/Berlin)") from None


def validate(expression: str) -> str:
    """Return a five-field cron expression unchanged, or raise with the reason."""
    fields = expression.split()
    if len(fields) != 5:
        raise SchedulerError(f"cron {expression!r} must have five fields (minute hour day month weekday)")
    try:
        croniter(expression)
    except (CroniterBadCronError, CroniterNotAlphaError, ValueError) as exc:
        raise SchedulerError(f"cron {expression!r} is invalid: {exc}") from None
    return expression


def _fixed_hour(expression: str) -> bool:
    hour = expression.split()[1]
    return not (hour == "*" or hour.startswith("*/"))


def instants(
    expression: str, tz_name: str | None, after: datetime, until: datetime, limit: int = MAX_CATCHUP + 1
) -> list[datetime]:
    """Fire instants in ``(after, until]``, in UTC, oldest first, at most ``limit``."""
    tz = zone(tz_name)
    it = croniter(validate(expression), after.astimezone(tz))
    found: list[datetime] = []
    # Seeded with the wall time of `after`, so a tick just after the first 02:30 of a
    # fall-back night does not fire the second one.
    last_wall: datetime | None = after.astimezone(tz).replace(tzinfo=None, fold=0)
    fixed = _fixed_hour(expression)
    try:
        while len(found) < limit:
            local = it.get_next(datetime)
            moment = local.astimezone(UTC)
            if moment > until:
                break
            wall = local.replace(tzinfo=None, fold=0)
            if fixed and wall == last_wall:
                continue  # the second 02:30 of a fall-back night
            last_wall = wall
            found.append(moment)
    except CroniterBadDateError:
        pass
    return found


def next_instant(expression: str, tz_name: str | None, after: datetime) -> datetime:
    """The first fire instant after ``after`` (UTC)."""
    found = instants(expression, tz_name, after, after + timedelta(days=400 * 5), limit=1)
    if not found:
        raise SchedulerError(f"cron {expression!r} never fires")
    return found[0]


def due(
    expression: str,
    tz_name: str | None,
    last_fired: datetime,
    now: datetime,
    *,
    catchup: str = "latest",
    grace_s: float = DEFAULT_GRACE_S,
) -> list[datetime]:
    """The instants to fire now, given the last one fired (or the schedule's creation)."""
    if catchup not in CATCHUP_POLICIES:
        raise SchedulerError(f"catch-up policy {catchup!r} is not one of {', '.join(CATCHUP_POLICIES)}")
    missed = instants(expression, tz_name, last_fired, now)
    if not missed:
        return []
    if catchup == "all":
        return missed[:MAX_CATCHUP]
    if catchup == "none":
        return [t for t in missed if (now - t).total_seconds() <= grace_s][-1:]
    return missed[-1:]
