"""``GET /metrics``: the Prometheus text format, with numbers that follow a real run."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import run_flow


def scrape(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    status, body = d.request("GET", "/metrics")
    assert status == 200
    assert isinstance(body, bytes)
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape_until(d: Daemon, ready: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape until ``ready(samples)`` holds."""
    found: list[dict[Any, float]] = []

    def check() -> bool:
        found[:] = [scrape(d)]
        return bool(ready(found[0]))

    wait_until(check, 20)
    return found[0]


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value."""
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_follow_a_run(daemon: Daemon) -> None:
    before = scrape(daemon)
    assert value(before, "millstream_runs", state="ok") == 0
    assert value(before, "millstream_aws_calls_total", service="s3") == 0
    assert value(before, "millstream_aws_call_errors_total", service="batch") == 0

    run_id, proc = run_flow(daemon, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tasks = daemon.run_state("HelloFlow", run_id)["tasks"]
    # The recorder applies metadata writes off the hot path: wait until it caught up.
    after = scrape_until(daemon, lambda s: value(s, "millstream_metadata_backlog") == 0)

    assert value(after, "millstream_runs", state="ok") == 1
    assert value(after, "millstream_runs", state="running") == 0
    assert value(after, "millstream_attempts_running") == 0
    assert value(after, "millstream_attempts_queued") == 0
    assert value(after, "millstream_pool_slots_used") == 0
    assert value(after, "millstream_pool_slots_total") > 0
    launches = value(after, "millstream_task_launches_total", via="zygote") + value(
        after, "millstream_task_launches_total", via="exec"
    )
    assert launches == len(tasks) == 3
    assert value(after, "millstream_launch_latency_seconds_count") == launches
    assert 0 < value(after, "millstream_launch_latency_seconds_sum") < 60
    assert value(after, "millstream_launch_latency_seconds_bucket", le="+Inf") == launches
    assert value(after, "millstream_checkpoint_writes_total") >= 2
    # A run, its tasks and attempts (start and end of each) at least.
    assert value(after, "millstream_metadata_writes_total") >= 1 + 2 * len(tasks)
    assert value(after, "millstream_metadata_writes_dropped_total") == 0
    assert value(after, "millstream_aws_calls_total", service="s3") == 0
    assert value(after, "millstream_process_open_fds") > 0


def test_the_loop_lag_probe_runs(daemon: Daemon) -> None:
    samples = scrape_until(daemon, lambda s: value(s, "millstream_loop_lag_seconds_count") >= 2)
    # An idle daemon's loop is not blocked for anything like a second.
    assert value(samples, "millstream_loop_lag_seconds_sum") / value(samples, "millstream_loop_lag_seconds_count") < 1


def test_the_exposition_is_prometheus_text(daemon: Daemon) -> None:
    import http.client
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(daemon.socket)

    conn = Conn("localhost")
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/plain; version=")
    assert "# TYPE millstream_runs gauge" in text
    assert "# TYPE millstream_launch_latency_seconds histogram" in text
    assert "_created" not in text
