"""Hand-written hostile requests: the regressions the fuzzer found, and traversal and
encoding cases ``tests/e2e/test_api_input.py`` does not cover yet."""

from __future__ import annotations

import json

import pytest

from millstream.datastore.package import build_package
from tests.conftest import EXAMPLES, Daemon
from tests.e2e.helpers import run_flow
from tests.e2e.test_api_input import _submission
from tests.host.conftest import Shared


def _assert_error(status: int, body: object, *, low: int = 400, high: int = 499) -> None:
    assert low <= status <= high, (status, body)
    assert isinstance(body, dict) and set(body) == {"error", "message"}, body


def test_a_log_offset_past_any_file_is_an_empty_answer(daemon: Daemon) -> None:
    """Found by fuzzing: seeking a local log to ~1e17 was EINVAL after the stream began."""
    run_id, proc = run_flow(daemon, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stderr
    for offset in (110883002038085664, 1 << 62, 10**12):
        status, body = daemon.request("GET", f"/v1/runs/HelloFlow/{run_id}/logs/start/0?offset={offset}")
        assert (status, body) == (200, None)
    status, body = daemon.request("GET", f"/v1/runs/HelloFlow/{run_id}/logs/start/0?offset={1 << 63}")
    _assert_error(status, body)


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "59 23 31 2,4 *"])
def test_a_cron_that_never_fires_is_refused_and_listing_still_works(daemon: Daemon, cron: str) -> None:
    """Found by fuzzing: such a schedule was saved, then every listing failed on it."""
    sha, data = build_package(EXAMPLES)
    assert daemon.request("PUT", f"/v1/packages/{sha}", raw=data)[0] == 201
    status, body = daemon.request("POST", "/v1/schedules", {"submission": _submission(package=sha), "cron": cron})
    _assert_error(status, body)
    assert body["error"] == "bad_schedule" and "never fires" in body["message"]
    status, body = daemon.request("GET", "/v1/schedules")
    assert status == 200 and body["schedules"] == []


def test_a_repeated_query_parameter_takes_the_first(shared: Shared) -> None:
    run_id, daemon = shared.run_id, shared.daemon
    status, body = daemon.request(
        "GET", f"/v1/runs/HelloFlow/{run_id}/logs/start/0?stream=stdout&stream=..%2F..%2Fetc%2Fpasswd"
    )
    assert status == 200 and isinstance(body, bytes) and b"root:" not in body


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/HelloFlow/1%00",
        "/v1/runs/Hello%00Flow/1",
        "/v1/runs/%252e%252e/1",
        "/v1/runs/HelloFlow/%252e%252e%252f",
        "/v1/runs/HelloFlow/..%5c..%5c",
        "/v1/runs/" + "A" * 5000 + "/1",
        "/v1/runs/HelloFlow/" + "9" * 5000,
        "/v1/runs/HelloFlow/1/logs/" + "s" * 300 + "/0",
        "/v1/runs/HelloFlow/1/logs/start/0?attempt=99",
        "/v1/runs/HelloFlow/1/logs/start/0?attempt=-1",
        "/v1/runs/HelloFlow/1/logs/start/" + "0" * 300,
        "/v1/runs/HelloFlow/1/events?since=-1",
        "/v1/runs/HelloFlow/1/events?since=99999999999999999999999",
        "/v1/runs/%F0%9F%92%A9/1",
        "/v1/runs/HelloFlow/%ff%fe",
        "/v1/runs?limit=0",
        "/v1/runs?flow=..%2F..",
        "/v1/runs?cursor=" + "x" * 5000,
        "/v1/runs?" + "&".join(["tag=a"] * 500),
    ],
)
def test_encoded_traversal_and_oversize_names_are_4xx(shared: Shared, path: str) -> None:
    status, body = shared.daemon.request("GET", path.replace("/HelloFlow/1", f"/HelloFlow/{shared.run_id}"))
    if status == 200:
        # A well-formed page of nothing (`tag=a` 500 times) is a fine answer too.
        assert isinstance(body, dict) and body.get("runs") == [], body
        return
    _assert_error(status, body)
    assert "root:" not in json.dumps(body)


@pytest.mark.parametrize(
    "overrides",
    [
        {"flow": "A" * 5000},
        {"module_file": "a" * 5000 + ".py"},
        {"class_name": "C" * 5000},
        {"params": {"x": float("nan")}},
        {"params": {"x" * 300: 1}},
        {"env": {"A" * 300: "1"}},
        {"env": {"B": "\x00"}},
        {"env": {"A=B": "1"}},
        {"env": {"": "1"}},
        {"options": {"tags": ["t" * 257]}},
        {"options": {"max_num_splits": 10**30}},
        {"options": {"resume": {"origin_run_id": "../../x"}}},
        {"request_id": {"not": "a string"}},
    ],
)
def test_odd_submissions_are_4xx_or_runs_that_end(shared: Shared, overrides: dict[str, object]) -> None:
    daemon = shared.daemon
    sha, data = build_package(EXAMPLES)
    assert daemon.request("PUT", f"/v1/packages/{sha}", raw=data)[0] in (200, 201)
    raw = json.dumps(_submission(package=sha, **overrides)).encode()  # NaN as Python writes it
    status, body = daemon.request("POST", "/v1/runs", raw=raw, headers={"Content-Type": "application/json"})
    if status == 201:
        from tests.conftest import wait_until

        wait_until(lambda: daemon.run_state("HelloFlow", body["run_id"])["status"] != "running", 60)
        return
    _assert_error(status, body)
