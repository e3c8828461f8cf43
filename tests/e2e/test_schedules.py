"""Schedules and triggers through a real daemon and the CLI."""

from __future__ import annotations

from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import FLOWS, artifact, run_flow


def test_trigger_on_finish_starts_the_downstream_flow(daemon: Daemon) -> None:
    out = daemon.cli("schedule", "create", str(FLOWS / "triggered_flow.py"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "after HelloFlow succeeds" in out.stdout
    upstream, proc = run_flow(daemon, EXAMPLES / "hello.py")
    assert proc.returncode == 0

    def downstream() -> str | None:
        status, body = daemon.request("GET", "/v1/runs?flow=TriggeredFlow")
        runs = [r for r in body["runs"] if r["status"] == "ok"] if status == 200 else []
        return runs[0]["run_id"] if runs else None

    run_id = wait_until(downstream, 30, 0.1)
    assert artifact(daemon, "TriggeredFlow", run_id, "start", "trigger_pathspec") == f"HelloFlow/{upstream}"
    assert artifact(daemon, "TriggeredFlow", run_id, "start", "production") is True
    status, body = daemon.request("GET", "/v1/runs?flow=TriggeredFlow")
    assert len(body["runs"]) == 1  # one upstream success, one downstream run
    assert "schedule:TriggeredFlow" in daemon.run_state("TriggeredFlow", run_id)["tags"]


def test_schedule_commands(daemon: Daemon) -> None:
    hello = str(EXAMPLES / "hello.py")
    out = daemon.cli(
        "schedule", "create", hello, "--name", "yearly", "--cron", "0 0 1 1 *", "--timezone", "Europe/Berlin"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cron '0 0 1 1 *' (Europe/Berlin)" in out.stdout and "next run" in out.stdout
    listing = daemon.cli("schedule", "list")
    assert "yearly" in listing.stdout and "HelloFlow" in listing.stdout
    assert "paused" in daemon.cli("schedule", "pause", "yearly").stdout
    assert "next run" in daemon.cli("schedule", "resume", "yearly").stdout
    bad = daemon.cli("schedule", "create", hello, "--name", "broken", "--cron", "61 * * * *")
    assert bad.returncode != 0 and "invalid" in bad.stdout + bad.stderr
    assert daemon.cli("schedule", "delete", "yearly").returncode == 0
    assert "No schedules." in daemon.cli("schedule", "list").stdout
    # Schedules survive a restart.
    daemon.cli("schedule", "create", hello, "--name", "kept", "--cron", "0 0 1 1 *")
    daemon.stop()
    daemon.start()
    assert "kept" in daemon.cli("schedule", "list").stdout
