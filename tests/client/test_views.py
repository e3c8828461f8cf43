"""Pathspecs, tables and the run reports of ``runs`` and ``status``."""

from __future__ import annotations

import pytest

from millstream.client.console import format_duration, table, truncate
from millstream.client.pathspec import Pathspec, PathspecError, parse_pathspec
from millstream.client.runview import run_report, runs_table, step_report, task_report

DETAIL = {
    "flow": "F", "run_id": "3", "status": "failed", "owner": "alice", "created_at": 100.0,
    "finished_at": 165.0, "message": "step b failed", "tags": ["x"], "params": {"n": 2},
    "steps": {"a": {"pending": 0, "running": 0, "ok": 2, "failed": 0, "cancelled": 0},
              "b": {"pending": 0, "running": 0, "ok": 0, "failed": 1, "cancelled": 0}},
    "tasks": [
        {"step": "a", "task_id": "0", "pathspec": "F/3/a/0", "status": "ok",
         "attempts": [{"number": 0, "status": "ok", "started_at": 101.0, "finished_at": 102.0,
                       "exit_code": 0, "message": None, "handle": {}}]},
        {"step": "b", "task_id": "1", "pathspec": "F/3/b/1", "status": "failed",
         "attempts": [{"number": 0, "status": "failed", "started_at": 103.0, "finished_at": 104.0,
                       "exit_code": 1, "message": "boom", "handle": {}},
                      {"number": 1, "status": "failed", "started_at": 105.0, "finished_at": 106.0,
                       "exit_code": 1, "message": "ValueError: bad\nmore", "handle": {}}]},
    ],
}


def test_pathspecs() -> None:
    assert parse_pathspec("F/3/a/0") == Pathspec("F", "3", "a", "0")
    assert parse_pathspec("F") == Pathspec("F")
    assert parse_pathspec("3/a", flow="F") == Pathspec("F", "3", "a")
    assert parse_pathspec("F/3", flow="F") == Pathspec("F", "3")
    assert str(Pathspec("F", "3")) == "F/3"
    with pytest.raises(PathspecError):
        parse_pathspec("F//a")
    with pytest.raises(PathspecError):
        parse_pathspec("F/1/a/0/x")


def test_table_and_durations() -> None:
    assert table(("A", "LONGER"), [("xyz", 1), (None, "z")]) == "A    LONGER\nxyz  1\n     z\n"
    assert format_duration(0, 5.25) == "5.2s"
    assert format_duration(0, 125) == "2m05s"
    assert format_duration(0, 3725) == "1h02m05s"
    assert format_duration(None, 1) == "-"
    assert truncate("a long line\nsecond", 6) == "a l..."


def test_runs_table() -> None:
    text = runs_table([DETAIL])
    header, row = text.splitlines()
    assert header.split() == ["FLOW", "RUN", "STATUS", "OWNER", "STARTED", "DURATION", "TAGS", "MESSAGE"]
    assert row.split()[:4] == ["F", "3", "failed", "alice"] and "1m05s" in row and "step b failed" in row


def test_run_report_counts_steps_and_shows_failed_tasks() -> None:
    text = run_report(DETAIL)
    assert text.startswith("F/3  failed\n")
    assert "  params    n=2\n" in text
    assert "STEP  PENDING  RUNNING  OK  FAILED  CANCELLED\nb     0        0        0   1       0\n" in text.replace(
        "a     0        0        2   0       0\n", "")
    assert "  F/3/b/1 (attempt 1, exit code 1)\n      ValueError: bad\n      more\n" in text


def test_step_and_task_reports() -> None:
    assert "1     failed  2" in step_report(DETAIL, "b")
    assert step_report(DETAIL, "c").endswith("no tasks yet\n")
    task = task_report(DETAIL, Pathspec("F", "3", "b", "1"))
    assert task.startswith("F/3/b/1  failed\n") and "ValueError: bad" in task
