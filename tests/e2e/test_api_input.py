"""Hostile and malformed requests get a 4xx JSON error, and the daemon keeps serving."""

from __future__ import annotations

import contextlib
import json
import socket

import pytest

from millstream.datastore.package import build_package
from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import run_flow

GOOD_SHA = "0" * 64


def _submission(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "flow": "HelloFlow",
        "graph": {
            "flow": "HelloFlow",
            "steps": {
                "start": {
                    "type": "start",
                    "out": ["end"],
                    "is_join": False,
                    "decorators": [],
                    "split_stack": [],
                    "foreach_stack": [],
                },
                "end": {
                    "type": "end",
                    "out": [],
                    "is_join": False,
                    "decorators": [],
                    "split_stack": [],
                    "foreach_stack": [],
                },
            },
        },
        "package": GOOD_SHA,
        "module_file": "hello.py",
        "class_name": "HelloFlow",
        "params": {},
    }
    body.update(overrides)
    return body


BAD_SUBMISSIONS = {
    "missing flow": {"flow": None},
    "flow not a string": {"flow": 12},
    "flow with a slash": {"flow": "../etc"},
    "graph not an object": {"graph": []},
    "graph without end": {"graph": {"steps": {"start": {"type": "start", "out": []}}}},
    "step with a bad type": {
        "graph": {"steps": {"start": {"type": "warp", "out": []}, "end": {"type": "end", "out": []}}}
    },
    "transition to nowhere": {
        "graph": {
            "steps": {
                "start": {
                    "type": "start",
                    "out": ["nowhere"],
                    "is_join": False,
                    "decorators": [],
                    "split_stack": [],
                    "foreach_stack": [],
                },
                "end": {
                    "type": "end",
                    "out": [],
                    "is_join": False,
                    "decorators": [],
                    "split_stack": [],
                    "foreach_stack": [],
                },
            }
        }
    },
    "package not a sha": {"package": "abc"},
    "package never uploaded": {},
    "module file with a path": {"module_file": "../../etc/passwd.py"},
    "class name not an identifier": {"class_name": "os.system('x')"},
    "params not an object": {"params": [1, 2]},
    "relative python": {"python": "python3"},
    "env with a number": {"env": {"A": 1}},
    "max_workers zero": {"options": {"max_workers": 0}},
    "max_workers a string": {"options": {"max_workers": "8"}},
    "tags not strings": {"options": {"tags": [1]}},
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
def test_bad_submission_is_a_4xx(daemon: Daemon, case: str) -> None:
    status, body = daemon.request("POST", "/v1/runs", _submission(**BAD_SUBMISSIONS[case]))
    assert 400 <= status < 500, body
    assert set(body) == {"error", "message"} and body["message"]


@pytest.mark.parametrize(
    ("raw", "ctype", "expected"),
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2, 3]", "application/json", 400),
        (b"\xff\xfe\x00", "application/json", 400),
        (b'{"flow": "X"}', "text/plain", 415),
        (b"", "application/json", 400),
    ],
)
def test_malformed_bodies(daemon: Daemon, raw: bytes, ctype: str, expected: int) -> None:
    status, body = daemon.request("POST", "/v1/runs", raw=raw, headers={"Content-Type": ctype})
    assert status == expected, body
    assert body["error"]


def test_huge_body_is_refused(daemon_factory: object) -> None:
    d = daemon_factory(daemon_max_body_mb="1")  # type: ignore[operator]
    d.start()
    status, body = d.request("POST", "/v1/runs", raw=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert status == 413, body
    status, body = d.request("PUT", "/v1/packages/" + GOOD_SHA, raw=b"x" * (2 << 20))
    assert status == 413, body
    assert d.request("GET", "/v1/health")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/NoSuchFlow/1",
        "/v1/runs/HelloFlow/999999",
        "/v1/runs/HelloFlow/1/events",
        "/v1/runs/HelloFlow/1/logs/start/0",
        "/v1/nothing-here",
    ],
)
def test_unknown_things_are_404(daemon: Daemon, path: str) -> None:
    status, body = daemon.request("GET", path)
    assert status == 404, body
    assert body["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/..%2F..%2Fetc/1",
        "/v1/runs/HelloFlow/..",
        "/v1/runs/HelloFlow/%2E%2E",
        "/v1/runs/HelloFlow/1/logs/..%2F..%2F..%2Fetc/passwd",
        "/v1/runs/HelloFlow/1/logs/start/..%2F..%2F..",
        "/v1/runs/HelloFlow/1/logs/start/0?stream=..%2F..%2Fetc%2Fpasswd",
        "/v1/runs/HelloFlow/1/logs/start/0?offset=-5",
        "/v1/runs/HelloFlow/1/logs/start/0?attempt=abc",
        "/v1/runs?limit=100000",
        "/v1/runs?cursor=%%%",
        "/v1/runs?status=sideways",
        "/v1/runs/HelloFlow/1/events?since=x",
        "/v1/packages/..%2F..%2Fetc",
    ],
)
def test_traversal_and_bad_queries_are_refused(daemon: Daemon, path: str) -> None:
    run_flow(daemon, EXAMPLES / "hello.py")
    status, body = daemon.request("GET", path) if "packages" not in path else daemon.request("HEAD", path)
    assert 400 <= status < 500, (path, body)
    if isinstance(body, dict):
        assert body["error"]
    assert b"root:" not in (body if isinstance(body, bytes) else json.dumps(body).encode())


def test_package_with_the_wrong_sha_is_refused(daemon: Daemon) -> None:
    status, body = daemon.request("PUT", "/v1/packages/" + GOOD_SHA, raw=b"not the right bytes")
    assert status == 400 and body["error"] == "sha_mismatch"


def test_garbage_on_the_socket_does_not_disturb_a_run(daemon: Daemon) -> None:
    for junk in (
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/runs HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(daemon.socket)
            s.sendall(junk)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                s.recv(4096)
    run_id, proc = run_flow(daemon, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert daemon.run_state("HelloFlow", run_id)["status"] == "ok"


def test_openapi_document_is_served(daemon: Daemon) -> None:
    status, doc = daemon.request("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/runs", "/v1/health", "/v1/runs/{flow}/{run_id}/events"} <= set(doc["paths"])


def test_cancel_a_running_run(daemon: Daemon) -> None:
    import subprocess
    import sys

    from tests.conftest import wait_until
    from tests.e2e.helpers import FLOWS

    id_file = daemon.root / "cancel-id"
    proc = subprocess.Popen(
        [sys.executable, str(FLOWS / "slow_foreach.py"), "run", "--run-id-file", str(id_file), "--nap", "5"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(lambda: id_file.exists() and id_file.read_text().strip(), 30)
    run_id = id_file.read_text().strip()
    wait_until(lambda: daemon.run_state("SlowForeachFlow", run_id)["steps"]["work"]["running"] > 0, 30)
    status, body = daemon.request("POST", f"/v1/runs/SlowForeachFlow/{run_id}/cancel")
    assert status == 202, body
    wait_until(lambda: daemon.run_state("SlowForeachFlow", run_id)["status"] == "cancelled", 30)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    status, body = daemon.request("POST", f"/v1/runs/SlowForeachFlow/{run_id}/cancel")
    assert status == 409


def test_a_missing_interpreter_fails_the_run_and_names_it(daemon: Daemon) -> None:
    sha, data = build_package(EXAMPLES)
    status, _ = daemon.request("PUT", f"/v1/packages/{sha}", raw=data, headers={"Content-Type": "application/gzip"})
    assert status in (200, 201)
    status, body = daemon.request("POST", "/v1/runs", _submission(package=sha, python="/nonexistent/bin/python3"))
    assert status == 201, body
    state = wait_until(lambda: (s := daemon.run_state("HelloFlow", body["run_id"]))["status"] != "running" and s, 30)
    assert state["status"] == "failed"
    (start,) = [t for t in state["tasks"] if t["step"] == "start"]
    assert len(start["attempts"]) == 1, "not retried: a missing interpreter stays missing"
    assert "cannot start the interpreter /nonexistent/bin/python3" in start["attempts"][0]["message"]
