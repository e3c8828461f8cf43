"""The daemon's log format: JSON for journald and machines, console lines for people."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from millstream.daemon.main import wants_json
from tests.conftest import Daemon


@pytest.mark.parametrize(
    ("log_format", "env", "isatty", "expected"),
    [
        ("auto", {"JOURNAL_STREAM": "8:12345"}, True, True),  # systemd: journald reads stdout
        ("auto", {"INVOCATION_ID": "0f3e"}, True, True),
        ("auto", {}, True, False),  # a person at a terminal
        ("auto", {}, False, True),  # a pipe or a file
        ("json", {}, True, True),
        ("console", {"JOURNAL_STREAM": "8:1"}, False, False),
    ],
)
def test_the_format_follows_setting_systemd_and_terminal(
    log_format: str, env: dict[str, str], isatty: bool, expected: bool
) -> None:
    assert wants_json(log_format, env, isatty) is expected


def test_console_format_is_not_json_and_json_format_is(daemon_factory: Callable[..., Daemon]) -> None:
    console = daemon_factory(daemon_log_format="console")
    console.start()
    console.stop()
    first = console.logs[-1].read_text().splitlines()[0]
    assert "daemon_ready" in first
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    as_json = daemon_factory(daemon_log_format="json")
    as_json.env["INVOCATION_ID"] = "abc"
    as_json.start()
    as_json.stop()
    events = [json.loads(line) for line in as_json.logs[-1].read_text().splitlines()]
    assert [e["event"] for e in events][-2:] == ["daemon_stopping", "daemon_stopped"]
    assert events[0]["event"] == "daemon_ready" and events[0]["level"] == "info"
