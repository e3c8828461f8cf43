"""Two daemons, one metadata store: each sees the other's runs (SQLite file, then the service)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import run_flow
from tests.metadata.service_fixture import API_KEY, fresh_database


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def metadata_service(tmp_path: Path) -> Iterator[str]:
    """`millstream metadata-service` as a subprocess on a fresh database; yields its URL."""
    stack = contextlib.AsyncExitStack()
    loop = asyncio.new_event_loop()
    dsn = loop.run_until_complete(stack.enter_async_context(fresh_database()))
    keys = tmp_path / "keys"
    keys.write_text(API_KEY + "\n")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "millstream",
            "metadata-service",
            "--dsn",
            dsn,
            "--listen",
            f"127.0.0.1:{port}",
            "--api-key-file",
            str(keys),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(answers, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        loop.run_until_complete(stack.aclose())
        loop.close()


def _pair(daemon_factory, **settings: str) -> tuple[Daemon, Daemon]:  # type: ignore[no-untyped-def]
    a = daemon_factory(daemon_id="a", **settings)
    b = daemon_factory(daemon_id="b", **settings)
    # Both use a's datastore (and, by default, the metadata file beside it).
    b.env["MILLSTREAM_DATASTORE_ROOT"] = a.env["MILLSTREAM_DATASTORE_ROOT"]
    a.start()
    b.start()
    return a, b


def _check_shared(a: Daemon, b: Daemon) -> None:
    first, proc = run_flow(a, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second, proc = run_flow(b, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(second) == int(first) + 1  # one id sequence, whichever daemon allocates

    def listed() -> bool:
        status, body = b.request("GET", "/v1/runs?flow=HelloFlow")
        return status == 200 and {(r["run_id"], r["status"]) for r in body["runs"]} == {(first, "ok"), (second, "ok")}

    wait_until(listed, 15)
    out = a.cli("runs", "--flow", "HelloFlow")
    assert out.returncode == 0 and first in out.stdout and second in out.stdout
    # a's daemon answers for b's run from the store.
    detail = a.run_state("HelloFlow", second)
    assert detail["status"] == "ok" and {t["step"] for t in detail["tasks"]} == {"start", "greet", "end"}


def test_two_daemons_share_a_sqlite_store(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    _check_shared(*_pair(daemon_factory))


def test_two_daemons_share_the_metadata_service(daemon_factory, metadata_service: str) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair(daemon_factory, metadata_type="service", metadata_url=metadata_service, metadata_api_key=API_KEY)
    _check_shared(a, b)
