"""Runs on an S3 datastore under faults, and a clean host taking over a lost daemon's runs.

The daemon and its task processes reach moto through the fault proxy; every check reads
the bucket straight from moto (tests/e2e/helpers.py), so it sees what S3 really holds.
The flow shapes themselves run on S3 in test_runs.py and test_resume.py (``daemon_on_store``).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from millstream.datastore import layout
from millstream.datastore.artifacts import blob_sha, serialize
from tests.conftest import EXAMPLES, Daemon, _kill_leftovers, wait_until
from tests.e2e.conftest import S3World
from tests.e2e.crash import alive, check_slow_foreach_finished, step_count, submit_slow_foreach
from tests.e2e.helpers import FLOWS, artifact, ok_attempt, run_flow, stored
from tests.metadata.service_fixture import API_KEY

TRANSIENT = ["slowdown", "internal", "reset", "drop_response"]


def _check_nothing_half_written(d: Daemon, flow: str) -> None:
    """Every blob hashes to its key, every done marker parses and names stored blobs."""
    view = stored(d)
    blobs = view.list(layout.artifacts_prefix(flow))
    assert blobs
    for key in blobs:
        data = view.get(key)
        assert data is not None and blob_sha(data) == key.rsplit("/", 1)[1], key
    markers = [k for k in view.list(f"{flow}/") if k.endswith("/" + layout.DONE)]
    assert markers
    for key in markers:
        done = view.json(key)
        for ref in done.get("artifacts", {}).values():
            assert layout.artifact_key(flow, ref["sha"]) in blobs, (key, ref)


def _no_open_uploads(world: S3World) -> None:
    from tests.e2e.helpers import _s3_client

    uploads = _s3_client().list_multipart_uploads(Bucket=world.bucket).get("Uploads", [])
    assert uploads == [], uploads


def test_transient_faults_change_nothing(s3_world: S3World, s3_faults: Any) -> None:
    d = s3_world.daemon(endpoint_url=s3_faults.url)
    d.start()
    # One S3 request in five fails: throttled, a server error, a reset connection, or a
    # response lost after S3 acted on the request. Daemon and tasks both go through it.
    s3_faults.configure(rate=0.2, faults=TRANSIENT, seed=11)
    run_id, proc = run_flow(d, EXAMPLES / "foreach.py", "--count", "20")
    nested_id, nested = run_flow(d, EXAMPLES / "nested_foreach.py")
    faults = {k: v for k, v in s3_faults.stats().items() if k in TRANSIENT}
    s3_faults.configure(rate=0.0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert nested.returncode == 0, nested.stdout + nested.stderr
    assert sum(faults.values()) >= 30 and set(faults) == set(TRANSIENT), faults

    assert artifact(d, "ForeachFlow", run_id, "join", "total") == sum(i * i for i in range(20))
    assert artifact(d, "NestedForeachFlow", nested_id, "join", "table") == {"a": [11, 12], "b": [21, 22], "c": [31, 32]}
    for flow, rid in (("ForeachFlow", run_id), ("NestedForeachFlow", nested_id)):
        for task in d.run_state(flow, rid)["tasks"]:
            ok_attempt(task)  # exactly one successful attempt each
        _check_nothing_half_written(d, flow)
    _no_open_uploads(s3_world)

    # The store's retry lines are millstream's, on the task's stderr: stdout stays the step's.
    view = stored(d)
    stderr_keys = [k for k in view.list("ForeachFlow/") if k.endswith("/" + layout.STDERR)]
    retries = [
        json.loads(line)
        for key in stderr_keys
        for line in (view.get(key) or b"").decode().splitlines()
        if '"s3_retry"' in line
    ]
    assert retries and all(r["bucket"] == s3_world.bucket and r["key"] for r in retries)
    stdout_keys = [k for k in view.list("ForeachFlow/") if k.endswith("/" + layout.STDOUT)]
    assert all(b"s3_retry" not in (view.get(k) or b"") for k in stdout_keys)


def _resume(d: Daemon, flow_file: Path) -> tuple[str, Any]:
    id_file = d.root / "resume-id"
    proc = d.run_flow(flow_file, "resume", "--run-id-file", str(id_file))
    return (id_file.read_text().strip() if id_file.exists() else ""), proc


def test_a_permanent_fault_names_bucket_key_and_cause_then_resume_succeeds(s3_world: S3World, s3_faults: Any) -> None:
    from tests.aws.fault_proxy import Rule

    d = s3_world.daemon(endpoint_url=s3_faults.url)
    d.start()
    # The join's total (150 for six splits) is the one blob only the join writes: refuse it.
    sha, _ = serialize(sum(i * 10 for i in range(6)))
    key = f"{s3_world.prefix}/{layout.artifact_key('ResumableFlow', sha)}"
    s3_faults.configure(rules=[Rule("deny", method="PUT", path=re.escape(f"/{s3_world.bucket}/{key}"))])
    origin, proc = run_flow(d, FLOWS / "resumable.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    state = d.run_state("ResumableFlow", origin)
    assert state["status"] == "failed"
    message = state["message"]
    assert f"s3://{s3_world.bucket}/{key}" in message and "AccessDenied" in message and "403" in message, message
    join = next(t for t in state["tasks"] if t["step"] == "join")
    assert len(join["attempts"]) > 1, "an infrastructure failure is retried before the run fails"
    assert stored(d).get(key.removeprefix(f"{s3_world.prefix}/")) is None

    s3_faults.configure(rules=[])
    new, proc = _resume(d, FLOWS / "resumable.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert artifact(d, "ResumableFlow", new, "join", "total") == 150
    cloned = {
        f"{t['step']}/{t['task_id']}"
        for t in d.run_state("ResumableFlow", new)["tasks"]
        if (t["attempts"][-1]["handle"] or {}).get("cloned_from")
    }
    assert cloned == {"start/0"} | {f"work/{i}" for i in range(6)}
    _check_nothing_half_written(d, "ResumableFlow")


def _take_over(s3_world: S3World, *, kill_host: bool, **settings: str) -> tuple[Daemon, str]:
    """Kill a daemon (SIGKILL) mid-foreach, start one on a clean host; (new daemon, run id)."""
    old = s3_world.daemon(**settings)
    old.start()
    # Splits of 2 s, so the kill lands while some of them run, even on a loaded machine.
    client, run_id = submit_slow_foreach(old, nap_s=2.0)
    wait_until(lambda: step_count(old, run_id, "work", "ok") >= 1 and step_count(old, run_id, "work", "running"), 60)
    # The following client would start a daemon of its own on the old socket: it goes too.
    client.kill()
    client.communicate(timeout=10)
    running_pids = [
        t["attempts"][-1]["handle"]["pid"]
        for t in old.run_state("SlowForeachFlow", run_id)["tasks"]
        if t["status"] == "running" and t["attempts"][-1]["handle"]
    ]
    assert old.stop(signal.SIGKILL) == -signal.SIGKILL
    if kill_host:
        # The machine is gone: its zygotes and running attempts die with it.
        _kill_leftovers(old.root)
        wait_until(lambda: not [pid for pid in running_pids if alive(pid)], 10)
    new = s3_world.daemon(**settings)  # a fresh state dir, spool and packages: the bucket is shared
    assert not (new.root / "state").exists()
    new.start()
    check_slow_foreach_finished(new, run_id)
    wait_until(lambda: stored(new).json(layout.active_runs_key("default")) == {"runs": []}, 10)
    # The code package came from S3 into the new host's state dir.
    assert list((new.root / "state" / "packages").iterdir())
    return new, run_id


@pytest.mark.parametrize("lost", ["daemon", "host"])
def test_a_clean_host_finishes_the_runs_of_a_killed_daemon(s3_world: S3World, lost: str) -> None:
    # Only the bucket is shared: the metadata store is SQLite in each host's state dir.
    new, run_id = _take_over(s3_world, kill_host=lost == "host")
    state = new.run_state("SlowForeachFlow", run_id)
    lost_attempts = [a for t in state["tasks"] for a in t["attempts"] if a["status"] == "failed"]
    # An attempt killed with the host before its done marker is failed as lost and retried.
    assert all("lost" in a["message"] for a in lost_attempts), lost_attempts


def test_a_clean_host_sharing_the_metadata_service_carries_on(s3_world: S3World, metadata_service: str) -> None:
    new, run_id = _take_over(
        s3_world, kill_host=True, metadata_type="service", metadata_url=metadata_service, metadata_api_key=API_KEY
    )

    def recorded_ok() -> bool:
        status, body = new.request("GET", "/v1/runs?flow=SlowForeachFlow")
        return status == 200 and [(r["run_id"], r["status"]) for r in body["runs"]] == [(run_id, "ok")]

    wait_until(recorded_ok, 15)
    # The next run of the flow gets the next id on the new host, and runs on S3.
    next_id, proc = run_flow(new, FLOWS / "slow_foreach.py", "--width", "2", "--nap", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(next_id) == int(run_id) + 1


CLIENT_SCRIPT = """
import json
from millstream import Flow, namespace

namespace(None)
run = Flow("HelloFlow").latest_run
print(json.dumps({
    "id": run.id,
    "successful": run.successful,
    "message": run["end"].task.data.message,
    "stdout": run["greet"].task.stdout,
    "steps": sorted(step.id for step in run),
}))
"""


def test_everything_lives_in_s3_and_the_client_api_reads_it(s3_world: S3World, s3_faults: Any) -> None:
    d = s3_world.daemon(endpoint_url=s3_faults.url)  # the proxy only counts here
    d.start()
    first, proc = run_flow(d, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id, proc = run_flow(d, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same code twice: one package, uploaded once.
    packages = stored(d).list(layout.PACKAGES_DIR + "/")
    assert len(packages) == 1, packages
    assert len(s3_faults.requests_to(r"/packages/", "PUT")) == 1
    keys = set(stored(d).list(""))
    for key in (
        layout.active_runs_key("default"),
        layout.checkpoint_key("HelloFlow", run_id),
        layout.params_key("HelloFlow", run_id),
        f"{layout.run_prefix('HelloFlow', run_id)}_run/run.json",
        layout.done_key("HelloFlow", run_id, "greet", "0", 0),
        layout.stdout_key("HelloFlow", run_id, "greet", "0", 0),
    ):
        assert key in keys, key
    # Nothing of the datastore was written on the host: the root the factory names stays absent.
    assert not d.datastore.exists()
    # Another process, configured like the daemon (bucket, prefix, endpoint, metadata file):
    # the notebook's view of the same run.
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT], env=d.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == {
        "id": run_id,
        "successful": True,
        "message": "hello, world",
        "stdout": "hello, world\n",
        "steps": ["end", "greet", "start"],
    }


def test_logs_of_a_running_attempt_reach_s3_while_it_runs(s3_world: S3World) -> None:
    d = s3_world.daemon()
    d.start()
    go = d.root / "go"
    id_file = d.root / "waiting-id"
    client = subprocess.Popen(
        [sys.executable, str(FLOWS / "waiting_flow.py"), "run", "--run-id-file", str(id_file)],
        env=dict(d.env, MS_GO=str(go)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run_id = wait_until(lambda: id_file.exists() and id_file.read_text().strip(), 30)
        key = layout.stdout_key("WaitingFlow", run_id, "wait", "0", 0)
        # Copied every 5 s while the attempt runs: another machine can follow it.
        assert wait_until(lambda: stored(d).get(key), 20) == b"waiting for the go\n"
        assert d.run_state("WaitingFlow", run_id)["steps"]["wait"]["running"] == 1
    finally:
        go.touch()
        out, _ = client.communicate(timeout=60)
    assert client.returncode == 0, out
    assert stored(d).get(key) == b"waiting for the go\ngoing on\n"
