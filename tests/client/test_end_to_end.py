"""The client against a real daemon subprocess: auto-start, one daemon for racing clients,
exit codes, Ctrl-C and stop."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.client.conftest import EXAMPLES
from tests.conftest import Daemon, wait_until

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")

SLOW_FLOW = '''
import time
from millstream import FlowSpec, Parameter, step


class SlowFlow(FlowSpec):
    """Sleeps in start; fails in end when asked to."""

    nap = Parameter("nap", default=0.0)
    fail = Parameter("fail", default=False, type=bool)

    @step
    def start(self):
        """Sleep."""
        print("napping")
        time.sleep(self.nap)
        self.next(self.end)

    @step
    def end(self):
        """Maybe fail."""
        if self.fail:
            raise ValueError("asked to fail")


if __name__ == "__main__":
    SlowFlow()
'''


def slow_flow(d: Daemon) -> Path:
    path = d.root / "flows" / "slow.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(SLOW_FLOW)
    return path


def test_run_starts_a_daemon_and_stop_stops_it(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()  # not started: the client must start it
    runs = [subprocess.Popen([sys.executable, str(EXAMPLES / "hello.py"), "run", "--run-id-file",
                              str(d.root / f"rid{i}")], env=d.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=60) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    stdout = outputs[0][0].splitlines()
    assert stdout[0].startswith("millstream ") and "executing HelloFlow for user:" in stdout[0]
    task_lines = [line for line in stdout if LINE.match(line)]
    assert re.search(r"Workflow starting \(run-id \d+\):$", task_lines[0])
    assert any(re.search(r"\[\d+/greet/\d+ \(pid \d+\)\] hello, world$", line) for line in task_lines)
    assert task_lines[-1].endswith(" Done!")
    assert sorted((d.root / f"rid{i}").read_text() for i in range(2)) == ["1", "2"]
    # Both clients raced to start a daemon; the lock let exactly one start.
    log = (d.root / "state" / "daemon.log").read_text()
    assert log.count("daemon_ready") == 1, log
    stopped = d.cli("daemon", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped
    assert d.cli("daemon", "status").returncode == 1


def test_failed_run_exits_1_with_the_message(daemon: Daemon) -> None:
    done = daemon.run_flow(slow_flow(daemon), "--quiet", "run", "--fail", "true")
    assert done.returncode == 1, done
    lines = done.stdout.splitlines()
    assert "Task failed." in lines[0] and "asked to fail" in lines[0]
    assert "Workflow failed" in lines[-1]
    status = daemon.cli("status", "SlowFlow")
    assert "Failed tasks:" in status.stdout and "asked to fail" in status.stdout


def test_ctrl_c_cancels_the_run_and_exits_130(daemon: Daemon) -> None:
    client = subprocess.Popen([sys.executable, str(slow_flow(daemon)), "run", "--nap", "30"], env=daemon.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert client.stdout is not None
    for line in client.stdout:
        if line.rstrip().endswith("napping"):
            break
    client.send_signal(signal.SIGINT)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 130, err
    assert "cancelling SlowFlow/1" in err

    def final_status() -> Any:
        state = daemon.run_state("SlowFlow", "1")
        return state["status"] if state["status"] != "running" else None

    assert wait_until(final_status, 15) == "cancelled"
