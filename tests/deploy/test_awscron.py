"""Five-field cron to EventBridge's six-field cron(...): a conversion table and bad input."""

from __future__ import annotations

import pytest

from millstream.deploy.awscron import fixed_offset_hours, to_aws_cron
from millstream.errors import DeployError


@pytest.mark.parametrize(("cron", "timezone", "expected"), [
    ("0 0 * * *", None, "cron(0 0 * * ? *)"),  # @schedule(daily=True)
    ("0 * * * *", None, "cron(0 * * * ? *)"),  # hourly
    ("0 0 * * 0", None, "cron(0 0 ? * SUN *)"),  # weekly: cron's 0 is Sunday
    ("30 2 * * 7", "UTC", "cron(30 2 ? * SUN *)"),  # 7 is Sunday too
    ("*/15 9-17 * * 1-5", None, "cron(0/15 9-17 ? * MON,TUE,WED,THU,FRI *)"),
    ("0 12 1 * *", None, "cron(0 12 1 * ? *)"),  # day of month: '?' goes to day of week
    ("0 6 */2 * *", None, "cron(0 6 1/2 * ? *)"),
    ("5 4 * jan,Jul *", "Etc/UTC", "cron(5 4 * JAN,JUL ? *)"),
    ("0 8 * * sat,sun", None, "cron(0 8 ? * SUN,SAT *)"),
    ("0 8 * * */2", None, "cron(0 8 ? * SUN,TUE,THU,SAT *)"),  # AWS has no step in day-of-week
    ("0 0 * * 0-6", None, "cron(0 0 * * ? *)"),  # every day is no restriction
    ("0 9 * * *", "Asia/Tokyo", "cron(0 0 * * ? *)"),  # fixed +9: hours move to UTC
    ("0 0,9 * * *", "Asia/Tokyo", "cron(0 0,15 * * ? *)"),  # crosses midnight, every day: fine
    ("0 0 * JAN *", "Etc/GMT+5", "cron(0 5 * JAN ? *)"),  # Etc/GMT+5 is UTC-5
    ("0 12 1 * *", "GMT", "cron(0 12 1 * ? *)"),
])
def test_conversion_table(cron: str, timezone: str | None, expected: str) -> None:
    assert to_aws_cron(cron, timezone) == expected


@pytest.mark.parametrize(("cron", "timezone", "message"), [
    ("0 0 * *", None, "has 4 fields; expected 5"),
    ("0 0 * * * *", None, "has 6 fields"),
    ("0 25 * * *", None, "hour field: 25 is outside 0-23"),
    ("60 0 * * *", None, "minute field: 60 is outside 0-59"),
    ("0 0 0 * *", None, "day-of-month field: 0 is outside 1-31"),
    ("0 0 * 13 *", None, "month field: 13 is outside 1-12"),
    ("0 0 * * 8", None, "day-of-week field: 8 is outside 0-7"),
    ("0 0 * * MOX", None, "day-of-week field: 'MOX' is not a number or a name"),
    ("5-1 * * * *", None, "range '5-1' runs backwards"),
    ("*/0 * * * *", None, "step 0"),
    ("0 0 L * *", None, "L and W are not five-field cron"),
    ("0 0 ? * 1", None, "cannot read '?'"),
    ("0 0 1 * 1", None, "restricts both day-of-month and day-of-week"),
    ("0 0 * * *", "Europe/Berlin", "changes its UTC offset (daylight saving time)"),
    ("0 0 * * *", "America/New_York", "write the schedule in UTC"),
    ("0 9 * * *", "Asia/Kolkata", "not a whole number of hours"),
    ("0 3 * * 1", "Asia/Tokyo", "some firings fall on another day"),
    ("0 */2 * * *", "Asia/Tokyo", "only literal hours"),
    ("0 0 * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("", None, "has 0 fields"),
])
def test_bad_input_is_refused_with_the_reason(cron: str, timezone: str | None, message: str) -> None:
    with pytest.raises(DeployError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
                       .replace("*", r"\*")):
        to_aws_cron(cron, timezone)


def test_not_a_string() -> None:
    with pytest.raises(DeployError, match="must be a string"):
        to_aws_cron(5)  # type: ignore[arg-type]


def test_fixed_offsets() -> None:
    assert fixed_offset_hours(None) == 0
    assert fixed_offset_hours("UTC") == 0
    assert fixed_offset_hours("Asia/Tokyo") == 9
    assert fixed_offset_hours("Etc/GMT-3") == 3


@pytest.mark.parametrize(("attributes", "expected"), [
    ({}, "cron(0 0 * * ? *)"),
    ({"hourly": True}, "cron(0 * * * ? *)"),
    ({"weekly": True}, "cron(0 0 ? * SUN *)"),
    ({"cron": "15 6 * * 1", "timezone": "UTC"}, "cron(15 6 ? * MON *)"),
])
def test_schedule_decorator_forms(attributes: dict[str, object], expected: str) -> None:
    from millstream.deploy.export import schedule_expression
    from millstream.flow.decorators import ScheduleDecorator

    graph = {"flow_decorators": {"schedule": ScheduleDecorator(**attributes).to_dict()}}
    assert schedule_expression(graph) == expected
    assert schedule_expression({"flow_decorators": {}}) is None
