"""Fixtures shared by every test: a real daemon on a real Unix socket, and waiting."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {predicate}")
        time.sleep(interval_s)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


@dataclass
class Daemon:
    """A ``millstream daemon`` subprocess with its own datastore, state dir and socket."""

    root: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def socket(self) -> str:
        """The daemon's socket path."""
        return self.env["MILLSTREAM_DAEMON_SOCKET"]

    @property
    def datastore(self) -> Path:
        """The datastore root."""
        return Path(self.env["MILLSTREAM_DATASTORE_ROOT"])

    def start(self) -> None:
        """Start the daemon and wait until its socket answers."""
        self.starts += 1
        log = self.root / f"daemon-{self.starts}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "millstream.daemon"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: _answers(self.socket) or self.proc.poll() is not None, 20)
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Signal the daemon and wait for it to exit; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.proc = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One HTTP request over the socket; JSON bodies are decoded."""
        import http.client

        class Conn(http.client.HTTPConnection):
            def connect(inner) -> None:
                inner.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                inner.sock.settimeout(30)
                inner.sock.connect(self.socket)

        conn = Conn("localhost")
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        if not payload:
            return resp.status, None
        if "json" in ctype and "ndjson" not in ctype:
            return resp.status, json.loads(payload)
        if "ndjson" in ctype:
            return resp.status, [json.loads(line) for line in payload.splitlines() if line]
        return resp.status, payload

    def run_flow(self, flow_file: Path | str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """``python FLOW run ARGS`` against this daemon, as a user types it."""
        return subprocess.run(
            [sys.executable, str(flow_file), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=str(Path(flow_file).parent),
        )

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """``millstream ARGS`` against this daemon."""
        return subprocess.run(
            [sys.executable, "-m", "millstream", *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def run_state(self, flow: str, run_id: str) -> dict[str, Any]:
        """GET /v1/runs/FLOW/RUN."""
        status, body = self.request("GET", f"/v1/runs/{flow}/{run_id}")
        assert status == 200, body
        return body


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    """Make daemons (not started) with their own short-pathed directories."""
    made: list[Daemon] = []

    def make(**settings: str) -> Daemon:
        # Unix socket paths are limited to 108 bytes: keep the root short.
        root = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
        env.update(
            {
                "MILLSTREAM_DAEMON_SOCKET": str(root / "d.sock"),
                "MILLSTREAM_DATASTORE_ROOT": str(root / "ds"),
                "MILLSTREAM_DAEMON_STATE_DIR": str(root / "state"),
                "MILLSTREAM_DATASTORE_DURABLE": "false",
                "MILLSTREAM_CONFIG": str(root / "config.toml"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update({f"MILLSTREAM_{k.upper()}": v for k, v in settings.items()})
        d = Daemon(root=root, env=env)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None:
            with contextlib.suppress(Exception):
                d.stop(signal.SIGKILL, 10)
        _kill_leftovers(d.root)
        shutil.rmtree(d.root, ignore_errors=True)


def _kill_leftovers(root: Path) -> None:
    """Kill task processes and zygotes a test left running under this root."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(root).encode() in cmd or str(root).encode() in environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Iterator[Daemon]:
    """A started daemon."""
    d = daemon_factory()
    d.start()
    yield d
