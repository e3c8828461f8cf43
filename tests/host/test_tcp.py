"""The optional TCP listener: only bearer tokens of ``daemon.tokens_file`` get in.

A token stands for an account, and that account's permissions apply: it reads every
run, and changes only its own (or any, as an admin).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, Daemon
from tests.e2e.helpers import run_flow

ROOT_TOKEN = "root-token-0123456789abcdef"
NOBODY_TOKEN = "nobody-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tcp(port: int, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(payload) if payload else None


def _tokens_file(d: Daemon, text: str, mode: int = 0o600) -> Path:
    path = d.root / "tokens"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def tcp_daemon(daemon_factory: Callable[..., Daemon]) -> tuple[Daemon, int]:
    port = _free_port()
    d = daemon_factory(daemon_tcp_listen=f"127.0.0.1:{port}")
    tokens = _tokens_file(d, f"# who may call over TCP\n{ROOT_TOKEN} = root\n{NOBODY_TOKEN} = nobody  # read-only\n")
    d.env["MILLSTREAM_DAEMON_TOKENS_FILE"] = str(tokens)
    d.start()
    return d, port


def test_tcp_needs_a_valid_bearer_token(tcp_daemon: tuple[Daemon, int]) -> None:
    d, port = tcp_daemon
    status, body = _tcp(port, "GET", "/v1/runs")
    assert status == 401 and body["error"] == "unauthenticated"
    assert "Authorization: Bearer" in body["message"]
    status, body = _tcp(port, "GET", "/v1/runs", token="not-a-token-of-this-daemon")
    assert status == 401 and body["message"] == "the bearer token is not valid"
    status, body = _tcp(port, "POST", "/v1/runs", token=ROOT_TOKEN[:-1], body={})
    assert status == 401
    status, body = _tcp(port, "GET", "/v1/health")
    assert status == 200 and body["status"] == "ok", "probes need no token"
    status, body = _tcp(port, "GET", "/v1/runs", token=ROOT_TOKEN)
    assert status == 200 and body["runs"] == []
    # The socket needs no token: the kernel vouches for its callers.
    assert d.request("GET", "/v1/runs")[0] == 200


def test_a_tokens_user_has_that_users_permissions(tcp_daemon: tuple[Daemon, int]) -> None:
    d, port = tcp_daemon
    run_id, proc = run_flow(d, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = f"/v1/runs/HelloFlow/{run_id}"
    status, body = _tcp(port, "GET", path, token=NOBODY_TOKEN)
    assert status == 200 and body["owner"] == "root"
    status, body = _tcp(port, "POST", f"{path}/tags", token=NOBODY_TOKEN, body={"add": ["x"]})
    assert status == 403
    assert body["message"] == f"only root (the owner) may change the tags of run HelloFlow/{run_id}; you are nobody"
    status, body = _tcp(port, "POST", f"{path}/tags", token=ROOT_TOKEN, body={"add": ["from-tcp"]})
    assert status == 200 and "from-tcp" in body["tags"], body


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        (f"{ROOT_TOKEN} = root\n", 0o640, "the tokens file is mode 0640; it must be 0600"),
        ("short = root\n", 0o600, ":1: a token must have at least 16 characters"),
        (f"# comment\n{ROOT_TOKEN}\n", 0o600, ":2: expected 'TOKEN = USER'"),
        (f"{ROOT_TOKEN} = no-such-account-here\n", 0o600, ":1: no account named 'no-such-account-here'"),
        (f"{ROOT_TOKEN} = root\n{ROOT_TOKEN} = nobody\n", 0o600, ":2: this token is already given to root"),
    ],
)
def test_a_bad_tokens_file_stops_the_daemon_naming_the_problem(
    daemon_factory: Callable[..., Daemon], text: str, mode: int, expected: str
) -> None:
    d = daemon_factory(daemon_tcp_listen=f"127.0.0.1:{_free_port()}")
    tokens = _tokens_file(d, text, mode)
    env = {**d.env, "MILLSTREAM_DAEMON_TOKENS_FILE": str(tokens)}
    proc = subprocess.run([sys.executable, "-m", "millstream.daemon"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"millstream daemon: {tokens}" in proc.stderr
    assert expected in proc.stderr
    assert not os.path.exists(d.socket)


def test_tcp_without_a_tokens_file_is_a_configuration_error(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(daemon_tcp_listen="127.0.0.1:1")
    proc = subprocess.run([sys.executable, "-m", "millstream.daemon"], env=d.env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "environment $MILLSTREAM_DAEMON_TCP_LISTEN: daemon.tcp_listen needs daemon.tokens_file" in proc.stderr
