"""Metaflow-style progress lines, rendered from lists of events."""

from __future__ import annotations

import io
from typing import Any

import pytest

from millstream.client.http import DaemonClient, DaemonUnavailable
from millstream.client.progress import follow_run, format_ts, render_events, task_label
from tests.client.conftest import CHUNKED_HEAD, LAST_CHUNK, CannedServer, chunk

T0 = 1796284800.0  # 2026-12-03 08:00:00 UTC

pytestmark = pytest.mark.usefixtures("utc")


def ev(seq: int, event: str, dt: float, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "ts": T0 + dt, "event": event, **fields}


RUN_OK = [
    ev(0, "run_started", 0.123, flow="HelloFlow", run_id="5"),
    ev(1, "task_started", 0.130, pathspec="HelloFlow/5/start/0", step="start", task_id="0",
       attempt=0, pid=1234),
    ev(2, "log", 0.2, pathspec="HelloFlow/5/start/0", attempt=0, stream="stdout", line="hello\n"),
    ev(3, "log", 0.21, pathspec="HelloFlow/5/start/0", attempt=0, stream="stderr", line="careful"),
    ev(4, "task_finished", 0.25, pathspec="HelloFlow/5/start/0", attempt=0, status="ok",
       exit_code=0, message=None, retrying=False),
    ev(5, "run_finished", 1.02, status="ok", message=None),
]

RUN_FAILED = [
    ev(0, "run_started", 0, flow="F", run_id="6"),
    ev(1, "task_started", 1, pathspec="F/6/train/3", step="train", task_id="3", attempt=0, pid=10),
    ev(2, "task_finished", 2, pathspec="F/6/train/3", attempt=0, status="failed", exit_code=1,
       message="ZeroDivisionError: division by zero", retrying=True),
    ev(3, "task_started", 3, pathspec="F/6/train/3", step="train", task_id="3", attempt=1, pid=11),
    ev(4, "log", 3.5, pathspec="F/6/train/3", attempt=1, stream="stdout", line="again"),
    ev(5, "task_finished", 4, pathspec="F/6/train/3", attempt=1, status="failed", exit_code=1,
       message="ZeroDivisionError: division by zero\n  in train", retrying=False),
    ev(6, "run_finished", 5, status="failed", message="step train failed"),
]


def render(events: list[dict[str, Any]], **kwargs: Any) -> tuple[str | None, list[str]]:
    out = io.StringIO()
    status = render_events(events, out=out, **kwargs)
    return status, out.getvalue().splitlines()


def test_timestamps_are_local_with_milliseconds() -> None:
    assert format_ts(T0 + 0.123) == "2026-12-03 08:00:00.123"


def test_task_label_drops_the_flow() -> None:
    assert task_label("HelloFlow/5/start/0") == "5/start/0"
    assert task_label("odd") == "odd"


def test_successful_run() -> None:
    status, lines = render(RUN_OK)
    assert status == "ok"
    assert lines == [
        "2026-12-03 08:00:00.123 Workflow starting (run-id 5):",
        "2026-12-03 08:00:00.130 [5/start/0 (pid 1234)] Task is starting.",
        "2026-12-03 08:00:00.200 [5/start/0 (pid 1234)] hello",
        "2026-12-03 08:00:00.210 [5/start/0 (pid 1234)] careful",
        "2026-12-03 08:00:00.250 [5/start/0 (pid 1234)] Task finished successfully.",
        "2026-12-03 08:00:01.020 Done!",
    ]


def test_failed_run_with_a_retry() -> None:
    status, lines = render(RUN_FAILED)
    assert status == "failed"
    assert lines == [
        "2026-12-03 08:00:00.000 Workflow starting (run-id 6):",
        "2026-12-03 08:00:01.000 [6/train/3 (pid 10)] Task is starting.",
        "2026-12-03 08:00:02.000 [6/train/3 (pid 10)] Task failed. ZeroDivisionError: division by zero (retrying)",
        "2026-12-03 08:00:03.000 [6/train/3 (pid 11)] Task is starting (retry 1).",
        "2026-12-03 08:00:03.500 [6/train/3 (pid 11)] again",
        "2026-12-03 08:00:04.000 [6/train/3 (pid 11)] Task failed. ZeroDivisionError: division by zero",
        "2026-12-03 08:00:04.000 [6/train/3 (pid 11)]   in train",
        "2026-12-03 08:00:05.000 Workflow failed: step train failed",
    ]


def test_quiet_prints_only_errors_and_the_final_line() -> None:
    assert render(RUN_OK, quiet=True)[1] == ["2026-12-03 08:00:01.020 Done!"]
    lines = render(RUN_FAILED, quiet=True)[1]
    assert [line[24:] for line in lines] == [
        "[6/train/3 (pid 10)] Task failed. ZeroDivisionError: division by zero (retrying)",
        "[6/train/3 (pid 11)] Task failed. ZeroDivisionError: division by zero",
        "[6/train/3 (pid 11)]   in train",
        "Workflow failed: step train failed",
    ]


def test_cancelled_and_messageless_endings() -> None:
    events = [ev(0, "task_finished", 0, pathspec="F/1/a/0", attempt=0, status="failed", exit_code=3,
                 message=None, retrying=False),
              ev(1, "run_finished", 1, status="cancelled", message=None)]
    status, lines = render(events)
    assert status == "cancelled"
    assert [line[24:] for line in lines] == ["[1/a/0] Task failed. exit code 3", "Workflow cancelled."]


def test_repeated_and_unknown_events_are_skipped() -> None:
    events = [RUN_OK[0], RUN_OK[0], ev(1, "something_new", 0.5), RUN_OK[-1]]
    status, lines = render(events)
    assert status == "ok"
    assert len(lines) == 2


def test_no_run_finished_means_no_status() -> None:
    assert render(RUN_OK[:-1])[0] is None


def ndjson(events: list[dict[str, Any]]) -> bytes:
    return b"".join(chunk((__import__("json").dumps(e) + "\n").encode()) for e in events)


def test_follow_run_reconnects_where_the_stream_broke(server: CannedServer) -> None:
    # The first stream breaks off after two events; the second repeats the last one seen.
    server.add("GET", "/v1/runs/HelloFlow/5/events?since=0&follow=1", CHUNKED_HEAD, ndjson(RUN_OK[:2]))
    server.add("GET", "/v1/runs/HelloFlow/5/events?since=1&follow=1", CHUNKED_HEAD,
               ndjson(RUN_OK[1:]), LAST_CHUNK)
    out = io.StringIO()
    status = follow_run(DaemonClient(server.socket_path), "HelloFlow", "5", quiet=True, out=out)
    assert status == "ok"
    assert out.getvalue().splitlines() == ["2026-12-03 08:00:01.020 Done!"]
    assert [r["path"] for r in server.requests] == [
        "/v1/runs/HelloFlow/5/events?since=0&follow=1", "/v1/runs/HelloFlow/5/events?since=1&follow=1"]


def test_follow_run_gives_up_when_the_daemon_stays_away(server: CannedServer) -> None:
    server.add("GET", "/v1/runs/F/1/events?since=0&follow=1", CHUNKED_HEAD, LAST_CHUNK)
    with pytest.raises(DaemonUnavailable, match="lost the daemon"):
        follow_run(DaemonClient(server.socket_path), "F", "1", quiet=True, out=io.StringIO(),
                   reconnect_timeout_s=0.3)
