"""Kill the daemon in the middle of a run and check the restarted one finishes it right."""

from __future__ import annotations

import json
import signal

import pytest

from tests.conftest import Daemon, wait_until
from tests.e2e.crash import alive, check_slow_foreach_finished, step_count, submit_slow_foreach

POINTS = {
    "start running": lambda d, r: step_count(d, r, "start", "running") >= 1 or step_count(d, r, "start", "ok") >= 1,
    "foreach in flight": lambda d, r: step_count(d, r, "work", "ok") >= 3,
    "join running": lambda d, r: step_count(d, r, "join", "running") >= 1,
}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_daemon_killed_mid_run(daemon: Daemon, point: str, sig: int) -> None:
    client, run_id = submit_slow_foreach(daemon)
    wait_until(lambda: POINTS[point](daemon, run_id), 30, 0.02)
    code = daemon.stop(sig)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), daemon.logs[-1].read_text()[-3000:]
    daemon.start()
    check_slow_foreach_finished(daemon, run_id)
    # The client that submitted the run reconnects and follows it to its end.
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0, out
    assert out.rstrip().endswith("Done!")


def test_sigterm_is_prompt_and_leaves_attempts_running(daemon: Daemon) -> None:
    # Splits long enough to outlive a stop on a loaded machine (a stop takes up to ~1 s there).
    client, run_id = submit_slow_foreach(daemon, nap_s=3.0)
    wait_until(lambda: step_count(daemon, run_id, "work", "running") >= 2, 30, 0.02)
    running = [t for t in daemon.run_state("SlowForeachFlow", run_id)["tasks"] if t["status"] == "running"]
    pids = [t["attempts"][-1]["handle"]["pid"] for t in running]
    import time

    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    survivors = [pid for pid in pids if alive(pid)]
    assert survivors, "the attempts should outlive the daemon"
    checkpoint = json.loads((daemon.datastore / "SlowForeachFlow" / run_id / "_run" / "checkpoint.json").read_text())
    assert checkpoint["version"] == 1
    daemon.start()
    check_slow_foreach_finished(daemon, run_id)
    out, _ = client.communicate(timeout=60)
    assert client.returncode == 0, out
