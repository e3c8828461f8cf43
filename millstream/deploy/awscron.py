"""Our five-field cron (``@schedule``) to an EventBridge rule's ``cron(...)`` expression.

A pure function of (expression, time zone). AWS validates schedule expressions weakly
(moto not at all), so everything AWS would refuse, or would read differently, is
refused here with the field and the reason:

- AWS has six fields, ``minutes hours day-of-month month day-of-week year``, and needs
  ``?`` in exactly one of day-of-month and day-of-week. Classic cron fires when *either*
  restricted day field matches; AWS cannot say that, so a schedule that restricts both
  is refused.
- Day-of-week is 0-7 (0 and 7 Sunday) in cron but 1-7 (1 Sunday) in AWS. It is
  expanded to the set of days it names and written as AWS day names (``MON,WED``), so
  ranges, steps and names all convert exactly.
- ``*/n`` becomes ``0/n`` (minutes, hours) or ``1/n`` (day of month, month), the form
  AWS documents. ``L``, ``W``, ``#`` and ``?`` are not five-field cron and are refused.

Time zones. EventBridge rules fire in UTC. A zone whose offset from UTC never changes
is converted exactly: offset 0 (``UTC``, ``Etc/UTC``, ``GMT``) as is; another fixed
offset of whole hours (``Asia/Tokyo``, ``Etc/GMT+5``) by shifting literal hours, as
long as the shift moves no firing across midnight while a day field is restricted
(that would change which day fires). Everything else, a zone with daylight saving
time above all (``Europe/Berlin``), is refused: no single UTC expression fires at the
same local time all year. The error says what to do instead: give the hours in UTC,
or let the millstream daemon run the schedule (``millstream schedule create``), which
keeps local time across DST changes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from millstream.errors import DeployError

DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")  # AWS: 1..7 = SUN..SAT
MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")

# (name, lowest, highest, names accepted, what */n starts from)
_FIELDS = (
    ("minute", 0, 59, (), 0),
    ("hour", 0, 23, (), 0),
    ("day-of-month", 1, 31, (), 1),
    ("month", 1, 12, MONTH_NAMES, 1),
    ("day-of-week", 0, 7, DAY_NAMES, 0),
)
_ITEM = re.compile(r"^(?:(\*)|([0-9A-Za-z]+)(?:-([0-9A-Za-z]+))?)(?:/([0-9]+))?$")
# Years sampled to decide whether a zone's offset ever changes (a pure function reads no clock).
_SAMPLE_YEARS = range(2000, 2040)


def _value(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    upper = text.upper()
    if upper in names:
        # Month names count from 1 (JAN); day names from 0 (SUN), as in cron.
        return names.index(upper) + (1 if name == "month" else 0)
    if not text.isdigit():
        hint = " (L and W are not five-field cron)" if re.fullmatch(r"[0-9]*[LW]", upper) else ""
        raise DeployError(f"cron {name} field: {text!r} is not a number{' or a name' if names else ''}{hint}")
    number = int(text)
    if not low <= number <= high:
        raise DeployError(f"cron {name} field: {number} is outside {low}-{high}")
    return number


def _expand(field: str, name: str, low: int, high: int, names: tuple[str, ...]) -> set[int]:
    """The values one cron field matches; raises naming the field for bad syntax."""
    if not field:
        raise DeployError(f"cron {name} field is empty")
    values: set[int] = set()
    for item in field.split(","):
        match = _ITEM.match(item)
        if not match:
            hint = " (L, W, # and ? are not five-field cron)" if re.search(r"[LW#?]", item) else ""
            raise DeployError(f"cron {name} field: cannot read {item!r}{hint}")
        star, first, last, step = match.groups()
        if star:
            start, stop = low, high
        else:
            start = _value(first, name, low, high, names)
            stop = _value(last, name, low, high, names) if last else (high if step else start)
        if start > stop:
            raise DeployError(f"cron {name} field: range {item!r} runs backwards")
        stride = int(step) if step else 1
        if stride == 0:
            raise DeployError(f"cron {name} field: step 0 in {item!r}")
        values.update(range(start, stop + 1, stride))
    return values


def _aws_field(field: str, start: int) -> str:
    """An already validated field in AWS syntax: ``*/n`` becomes ``start/n``."""
    return ",".join(f"{start}/{item[2:]}" if item.startswith("*/") else item.upper() for item in field.split(","))


def fixed_offset_hours(timezone: str | None) -> int:
    """The zone's constant offset from UTC in whole hours, or a DeployError saying why not."""
    if timezone is None:
        return 0
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise DeployError(f"unknown time zone {timezone!r} (use an IANA name like Europe/Berlin)") from None
    offsets = {
        datetime(year, month, 15, 12, tzinfo=UTC).astimezone(tz).utcoffset() or timedelta(0)
        for year in _SAMPLE_YEARS
        for month in (1, 4, 7, 10)
    }
    advice = ("EventBridge rules fire in UTC: write the schedule in UTC (timezone='UTC'), "
              "or run it with the millstream daemon (millstream schedule create), which keeps local time")
    if len(offsets) > 1:
        raise DeployError(f"time zone {timezone!r} changes its UTC offset (daylight saving time); {advice}")
    (offset,) = offsets
    if offset % timedelta(hours=1):
        raise DeployError(f"time zone {timezone!r} is {offset} from UTC, not a whole number of hours; {advice}")
    return int(offset / timedelta(hours=1))


def to_aws_cron(expression: str, timezone: str | None = None) -> str:
    """``cron(m h dom mon dow year)`` for a five-field cron expression read in ``timezone``."""
    if not isinstance(expression, str):
        raise DeployError(f"a cron expression must be a string, got {expression!r}")
    fields = expression.split()
    if len(fields) != 5:
        raise DeployError(
            f"cron {expression!r} has {len(fields)} fields; expected 5: minute hour day-of-month month day-of-week")
    expanded = [_expand(f, name, low, high, names) for f, (name, low, high, names, _) in zip(fields, _FIELDS,
                                                                                            strict=True)]
    minute, hour, dom, month, _ = fields
    days = {d % 7 for d in expanded[4]}
    dom_all = dom == "*" or expanded[2] == set(range(1, 32))
    dow_all = len(days) == 7
    if not dom_all and not dow_all:
        raise DeployError(
            f"cron {expression!r} restricts both day-of-month and day-of-week; cron fires when either matches, "
            "which AWS cannot express (it needs '?' in one of them): keep one and use '*' for the other")
    shift = fixed_offset_hours(timezone)
    aws_hour = _aws_field(hour, 0)
    if shift:
        if not re.fullmatch(r"[0-9]+(,[0-9]+)*", hour):
            raise DeployError(
                f"cron {expression!r} in {timezone}: only literal hours (like 9 or 9,17) can be moved to UTC; "
                f"write the schedule in UTC (timezone='UTC')")
        local = sorted(expanded[1])
        utc = [h - shift for h in local]
        crosses = any(not 0 <= h <= 23 for h in utc)
        if crosses and not (dom_all and dow_all and month == "*"):
            raise DeployError(
                f"cron {expression!r} in {timezone}: in UTC some firings fall on another day, and the schedule "
                "restricts its days; write the schedule in UTC (timezone='UTC')")
        aws_hour = ",".join(str(h) for h in sorted({h % 24 for h in utc}))
    if dow_all:
        aws_dom, aws_dow = ("*" if dom_all else _aws_field(dom, 1)), "?"
    else:
        aws_dom, aws_dow = "?", ",".join(DAY_NAMES[d] for d in sorted(days))
    return f"cron({_aws_field(minute, 0)} {aws_hour} {aws_dom} {_aws_field(month, 1)} {aws_dow} *)"
