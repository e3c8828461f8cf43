"""A live metadata service for tests: a fresh database on the local PostgreSQL, the service
in-process on a real TCP port, and an opened :class:`ServiceMetadataStore` talking to it.

PostgreSQL is the one on 127.0.0.1:5432 (user postgres, trust auth), reached through
its ``postgres`` database to create and drop ``ms_test_<random>`` databases
(``$MILLSTREAM_TEST_PG_ADMIN_DSN`` overrides it). Without it the tests skip locally and
fail when ``CI=true``: a missing database must not turn CI green.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import pytest

from millstream.metadata.client import ServiceMetadataStore
from millstream.metadata.service import MetadataService, ServiceConfig, load_api_keys

ADMIN_DSN = os.environ.get("MILLSTREAM_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
API_KEY = "test-key-" + "0" * 24
DEAD_AFTER_S = 5.0


def postgres_unavailable(why: str) -> NoReturn:
    """Skip locally, fail in CI."""
    message = f"PostgreSQL for the metadata service tests is not reachable: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def dsn_for(database: str, admin_dsn: str = ADMIN_DSN) -> str:
    """The admin DSN with another database name."""
    return admin_dsn.rsplit("/", 1)[0] + "/" + database


async def _admin(admin_dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(admin_dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        postgres_unavailable(f"{admin_dsn}: {type(exc).__name__}: {exc}")


@asynccontextmanager
async def fresh_database(admin_dsn: str = ADMIN_DSN) -> AsyncIterator[str]:
    """A new empty database; yields its DSN and drops it afterwards."""
    name = f"ms_test_{secrets.token_hex(6)}"
    admin = await _admin(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield dsn_for(name, admin_dsn)
    finally:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def service_config(dsn: str, tmp_path: Path, **overrides: Any) -> ServiceConfig:
    """The configuration tests use: port 0, a key from a key file, quick dead-run detection."""
    key_file = tmp_path / "metadata-api-keys"
    key_file.write_text(f"# test keys\n{API_KEY}\n")
    config = ServiceConfig(dsn=dsn, api_keys=load_api_keys(key_file, {}), host="127.0.0.1", port=0,
                           dead_after_s=DEAD_AFTER_S, pool_max_size=10, startup_timeout_s=10.0,
                           connect_timeout_s=3.0, command_timeout_s=5.0, shutdown_timeout_s=2.0)
    return replace(config, **overrides)


@asynccontextmanager
async def running_service(dsn: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[MetadataService]:
    """The service on 127.0.0.1, a free port, for the given database."""
    service = MetadataService(service_config(dsn, tmp_path, **overrides))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@asynccontextmanager
async def service_store(tmp_path: Path) -> AsyncIterator[ServiceMetadataStore]:
    """An opened ServiceMetadataStore on a live service over a fresh database."""
    async with fresh_database() as dsn, running_service(dsn, tmp_path) as service:
        store = ServiceMetadataStore(service.url, api_key=API_KEY, timeout_s=10.0, retries=2)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def service_process(scratch: Path) -> Iterator[str]:
    """``millstream metadata-service`` as a subprocess on a fresh database; yields its URL.

    For tests whose daemons (other processes) record into the service; ``scratch``
    holds its API key file.
    """
    from tests.conftest import wait_until

    stack = contextlib.AsyncExitStack()
    loop = asyncio.new_event_loop()
    try:
        dsn = loop.run_until_complete(stack.enter_async_context(fresh_database()))
    except BaseException:
        loop.close()
        raise
    keys = scratch / "keys"
    keys.write_text(API_KEY + "\n")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "millstream", "metadata-service", "--dsn", dsn,
                             "--listen", f"127.0.0.1:{port}", "--api-key-file", str(keys)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

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
