"""What only the metadata service does: auth, HTTP errors, concurrency, migrations, outages.

The behaviour every MetadataStore shares is in ``test_contract.py``; here the service
runs in-process on a real TCP port over a fresh database of the local PostgreSQL, and
one test starts a private PostgreSQL of its own to stop and restart it under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from millstream.errors import MetadataError
from millstream.metadata.client import ServiceMetadataStore
from millstream.metadata.model import DEAD_RUN_MESSAGE, AttemptRecord
from millstream.metadata.service import MetadataService, run_service
from millstream.metadata.service.db import PostgresMetadataStore
from millstream.metadata.service.schema import load_migrations
from tests.metadata.service_fixture import (
    API_KEY,
    DEAD_AFTER_S,
    fresh_database,
    running_service,
    service_config,
)

REPO = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    """A fresh, empty database."""
    async with fresh_database() as database_dsn:
        yield database_dsn


@pytest.fixture
async def service(dsn: str, tmp_path: Path) -> AsyncIterator[MetadataService]:
    """The service on that database; small bodies only, to test the limit."""
    async with running_service(dsn, tmp_path, max_body_bytes=64 << 10) as svc:
        yield svc


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A bare HTTP session, no key."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@contextlib.asynccontextmanager
async def client(url: str, **kwargs: Any) -> AsyncIterator[ServiceMetadataStore]:
    """An opened ServiceMetadataStore."""
    store = ServiceMetadataStore(url, api_key=kwargs.pop("api_key", API_KEY), **kwargs)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def call(session: aiohttp.ClientSession, method: str, url: str, *, body: Any = None, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request; the answer's status, headers and decoded JSON (or text)."""
    hdrs = dict(AUTH if headers is None else headers)
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    async with session.request(method, url, data=data, headers=hdrs) as resp:
        text = await resp.text()
        try:
            decoded = json.loads(text) if text else None
        except ValueError:
            decoded = text
        return resp.status, dict(resp.headers), decoded


async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    """Await ``predicate()`` until it is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------- health, version, auth


async def test_health_needs_no_key_and_version_does(service: MetadataService,
                                                    http: aiohttp.ClientSession) -> None:
    status, _, body = await call(http, "GET", service.url + "/v1/health", headers={})
    assert (status, body) == (200, {"status": "ok", "schema_version": len(load_migrations())})
    status, headers, body = await call(http, "GET", service.url + "/v1/version", headers={})
    assert (status, body["error"]) == (401, "unauthorized")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = await call(http, "GET", service.url + "/v1/version")
    assert status == 200
    assert (body["api"], body["schema_version"]) == ("v1", len(load_migrations()))


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}", "Bearer", API_KEY,
                                           f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}"])
async def test_a_missing_or_wrong_key_is_401(service: MetadataService, http: aiohttp.ClientSession,
                                             authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path, body in [("GET", "/v1/runs", None), ("GET", "/v1/flows", None),
                               ("POST", "/v1/flows/F/runs", {"user": "ann"}), ("GET", "/v1/nowhere", None)]:
        status, _, answer = await call(http, method, service.url + path, body=body, headers=headers)
        assert (status, answer["error"], answer["retryable"]) == (401, "unauthorized", False), path
    assert await service.store.list_flows() == []


async def test_a_client_with_a_wrong_key_fails_to_open(service: MetadataService) -> None:
    store = ServiceMetadataStore(service.url, api_key="wrong", retries=3)
    started = time.monotonic()
    with pytest.raises(MetadataError) as info:
        await store.open()
    assert not info.value.retryable
    assert "API key" in str(info.value)
    assert time.monotonic() - started < 1.0  # a 401 is not retried
    await store.close()


# ----------------------------------------------------------------- bad input

BIG = b'{"user": "' + b"x" * (100 << 10) + b'"}'
RUN = "/v1/flows/F/runs/1"
TASK = RUN + "/steps/start/tasks/1"
ART = {"name": "x", "sha": "aa", "size": 1, "type_name": "int"}
# (method, path, JSON body or raw bytes, extra headers, expected status)
BAD_REQUESTS: list[tuple[str, str, Any, dict[str, str], int]] = [
    ("POST", "/v1/flows/F/runs", b"{not json", {}, 400),
    ("POST", "/v1/flows/F/runs", b"[1, 2]", {}, 400),
    ("POST", "/v1/flows/F/runs", b"\xff\xfe", {}, 400),
    ("POST", "/v1/flows/F/runs", b'{"user": "ann", "now": NaN}', {}, 400),
    ("POST", "/v1/flows/F/runs", b'{"user": "ann", "now": 1e999}', {}, 400),
    ("POST", "/v1/flows/F/runs", b"", {}, 400),
    ("POST", "/v1/flows/F/runs", {}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": 5}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": ""}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann\u0000"}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "u" * 300}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "tags": "red"}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "tags": [""]}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "tags": [1]}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "system_tags": ["t"] * 1001}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "params": [1]}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "params": {"k": "nul\u0000"}}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "now": "yesterday"}, {}, 400),
    ("POST", "/v1/flows/F/runs", b"[" * 30_000 + b"]" * 30_000, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "params": {"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
     {}, 400),
    ("POST", "/v1/flows/F/runs", b'{"user": "' + b"9" * 5000 + b'"}', {}, 400),
    ("POST", "/v1/flows/F/runs", b'{"user": "ann", "params": {"n": ' + b"9" * 5000 + b"}}", {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "\ud800"}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "tags": ["\udfff"]}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "params": {"k": "\ud800"}}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "params": {"\ud800": 1}}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "now": True}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "request_id": 7}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "daemon_id": "../x"}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann", "origin_run_id": "a b"}, {}, 400),
    ("POST", "/v1/flows/1bad/runs", {"user": "ann"}, {}, 400),
    ("POST", "/v1/flows/packages/runs", {"user": "ann"}, {}, 400),
    ("POST", "/v1/flows/a%2Fb/runs", {"user": "ann"}, {}, 400),
    ("POST", "/v1/flows/" + "F" * 200 + "/runs", {"user": "ann"}, {}, 400),
    ("POST", "/v1/flows/F/runs", {"user": "ann"}, {"Content-Type": "text/plain"}, 415),
    ("POST", "/v1/flows/F/runs", BIG, {}, 413),
    ("POST", RUN + "/finish", {"status": "bogus"}, {}, 400),
    ("POST", RUN + "/finish", {"status": "running"}, {}, 400),
    ("POST", RUN + "/finish", {"status": "ok", "message": 3}, {}, 400),
    ("POST", RUN + "/finish", {}, {}, 400),
    ("POST", RUN + "/heartbeat", {"now": "soon"}, {}, 400),
    ("PATCH", RUN + "/tags", {"add": [1]}, {}, 400),
    ("PATCH", RUN + "/tags", {"remove": "x"}, {}, 400),
    ("GET", "/v1/runs?status=bogus", None, {}, 400),
    ("GET", "/v1/runs?limit=0", None, {}, 400),
    ("GET", "/v1/runs?limit=-1", None, {}, 400),
    ("GET", "/v1/runs?limit=abc", None, {}, 400),
    ("GET", "/v1/runs?limit=99999999999999999999", None, {}, 400),
    ("GET", "/v1/runs?cursor=not-a-cursor", None, {}, 400),
    ("GET", "/v1/runs?created_after=abc", None, {}, 400),
    ("GET", "/v1/runs?created_before=nan", None, {}, 400),
    ("GET", "/v1/runs?flow=a/b", None, {}, 400),
    ("GET", "/v1/runs?tag=", None, {}, 400),
    ("GET", RUN + "/steps/_run/tasks", None, {}, 400),
    ("PUT", TASK, {"foreach_index": [-1]}, {}, 400),
    ("PUT", TASK, {"foreach_index": "0"}, {}, 400),
    ("PUT", TASK, {"foreach_index": [1 << 40]}, {}, 400),
    ("PUT", TASK, {"parents": [1]}, {}, 400),
    ("PUT", TASK, {"origin": ["x"]}, {}, 400),
    ("PUT", RUN + "/steps/start/tasks/.hidden", {}, {}, 400),
    ("PUT", TASK + "/attempts/-1", {"status": "running"}, {}, 400),
    ("PUT", TASK + "/attempts/abc", {"status": "running"}, {}, 400),
    ("PUT", TASK + "/attempts/99999999999", {"status": "running"}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "bogus"}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "ok", "attempt": 3}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "ok", "exit_code": "1"}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "ok", "exit_code": 1 << 40}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "ok", "started_at": "noon"}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "ok", "handle": [1]}, {}, 400),
    ("PUT", TASK + "/attempts/0/artifacts", {"artifacts": "x"}, {}, 400),
    ("PUT", TASK + "/attempts/0/artifacts", {"artifacts": [{"name": "x"}]}, {}, 400),
    ("PUT", TASK + "/attempts/0/artifacts", {"artifacts": [{**ART, "size": -1}]}, {}, 400),
    ("PUT", TASK + "/attempts/0/artifacts", {"artifacts": [{**ART, "size": "1"}]}, {}, 400),
    ("PUT", TASK + "/attempts/0/artifacts", {"artifacts": [ART, ART]}, {}, 400),
    ("GET", TASK + "/artifacts?attempt=x", None, {}, 400),
    ("PATCH", TASK + "/metadata", {"fields": []}, {}, 400),
    ("PATCH", TASK + "/metadata", {"fields": {"a": 1}}, {}, 400),
    ("PATCH", TASK + "/metadata", {"fields": {"": "x"}}, {}, 400),
    ("PATCH", TASK + "/metadata", {"fields": {"k": "\ud800"}}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "ok", "message": "\ud800"}, {}, 400),
    ("PUT", TASK + "/attempts/0", {"status": "ok", "handle": {"pid": "\ud800"}}, {}, 400),
    ("GET", "/v1/flows/F/runs/999", None, {}, 404),
    ("GET", RUN + "/steps/start/tasks/9", None, {}, 404),
    ("GET", "/v1/nowhere", None, {}, 404),
    ("DELETE", RUN, None, {}, 405),
]


async def test_bad_requests_get_4xx_json_and_change_nothing(service: MetadataService,
                                                           http: aiohttp.ClientSession) -> None:
    store = service.store
    run = await store.create_run("F", user="ann")
    await store.record_task("F", run.run_id, "start", "1")
    before = (await store.get_run("F", "1"), await store.get_task("F", "1", "start", "1"))
    wrong = []
    for method, path, body, headers, expected in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else None
        status, resp_headers, answer = await call(http, method, service.url + path,
                                                  body=None if raw is not None else body, raw=raw,
                                                  headers={**AUTH, **headers})
        ok = (status == expected and resp_headers.get("Content-Type", "").startswith("application/json")
              and isinstance(answer, dict) and isinstance(answer.get("error"), str)
              and isinstance(answer.get("message"), str))
        if not ok:
            wrong.append(f"{method} {path[:60]} {str(body)[:60]}: expected {expected}, got {status} {answer!r:.200}")
    assert not wrong, "\n".join(wrong)
    assert (await store.get_run("F", "1"), await store.get_task("F", "1", "start", "1")) == before
    assert await store.list_flows() == ["F"]
    assert (await store.create_run("F", user="ann")).run_id == "2"


# ----------------------------------------------------------------- concurrency and idempotency


async def test_20_clients_creating_runs_at_once_get_consecutive_ids(service: MetadataService) -> None:
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(service.url)) for _ in range(20)]
        runs = await asyncio.gather(*(c.create_run("F", user=f"u{i}") for i, c in enumerate(clients)))
    assert sorted(int(r.run_id) for r in runs) == list(range(1, 21))
    assert len({(r.user, r.run_id) for r in runs}) == 20
    assert len((await service.store.list_runs(flow="F")).items) == 20


async def test_a_replayed_post_returns_the_first_run(service: MetadataService, http: aiohttp.ClientSession) -> None:
    url = service.url + "/v1/flows/F/runs"
    body = {"user": "ann", "tags": ["x"], "request_id": "req-1"}
    status1, _, first = await call(http, "POST", url, body=body)
    status2, _, second = await call(http, "POST", url, body=body)
    assert (status1, status2, first) == (201, 200, second)
    racing = await asyncio.gather(*(call(http, "POST", url, body={**body, "request_id": "req-2"}) for _ in range(8)))
    assert sorted(s for s, _, _ in racing) == [200] * 7 + [201]
    assert {b["run_id"] for _, _, b in racing} == {"2"}
    status, _, answer = await call(http, "POST", service.url + "/v1/flows/G/runs", body=body)
    assert (status, answer["error"]) == (409, "conflict")
    assert [r.run_id for r in (await service.store.list_runs()).items] == ["2", "1"]


class FlakyProxy:
    """Forwards to the service, but loses the answer to the first POST (503, or too slow)."""

    def __init__(self, target: str, mode: str, delay_s: float) -> None:
        self.target, self.mode, self.delay_s = target, mode, delay_s
        self.posts: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        async with self.session.request(request.method, self.target + request.path_qs, data=body,
                                        headers={k: v for k, v in request.headers.items()
                                                 if k.lower() in ("authorization", "content-type")}) as resp:
            payload, status = await resp.read(), resp.status
        if request.method == "POST":
            self.posts.append(json.loads(body))
            if len(self.posts) == 1:
                if self.mode == "503":
                    return web.json_response({"error": "unavailable", "message": "proxy", "retryable": True},
                                             status=503)
                await asyncio.sleep(self.delay_s)  # past the client's timeout: the answer is lost
        return web.Response(body=payload, status=status, content_type="application/json")

    async def __aenter__(self) -> str:
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def __aexit__(self, *exc: Any) -> None:
        assert self.runner is not None and self.session is not None
        await self.runner.cleanup()
        await self.session.close()


@pytest.mark.parametrize("mode", ["503", "timeout"])
async def test_a_retried_create_run_never_duplicates(service: MetadataService, mode: str) -> None:
    proxy = FlakyProxy(service.url, mode, delay_s=1.0)
    async with proxy as url, client(url, timeout_s=0.5, retries=3) as store:
        run = await store.create_run("F", user="ann")
    assert run.run_id == "1"
    assert len(proxy.posts) == 2
    assert proxy.posts[0]["request_id"] == proxy.posts[1]["request_id"]
    assert [r.run_id for r in (await service.store.list_runs()).items] == ["1"]


# ----------------------------------------------------------------- dead runs, bounded queries


async def test_dead_runs_use_the_services_dead_after_s(service: MetadataService) -> None:
    async with client(service.url) as store:
        now = time.time()
        stale = await store.create_run("F", user="ann", now=now - DEAD_AFTER_S - 2)
        alive = await store.create_run("F", user="ann", now=now - DEAD_AFTER_S + 3)
        assert (stale.status, stale.message) == ("failed", DEAD_RUN_MESSAGE)
        assert (await store.get_run("F", alive.run_id)).status == "running"
        await store.heartbeat_run("F", stale.run_id)
        assert (await store.get_run("F", stale.run_id)).status == "running"
        assert (await store.finish_run("F", stale.run_id, status="ok")).status == "ok"


async def test_listings_cost_a_bounded_number_of_queries(dsn: str, tmp_path: Path) -> None:
    queries: list[str] = []
    counting = PostgresMetadataStore(dsn, query_logger=lambda q: queries.append(q.query))
    async with contextlib.AsyncExitStack() as stack:
        svc = MetadataService(service_config(dsn, tmp_path), store=counting)
        await svc.start()
        stack.push_async_callback(svc.stop)
        store = await stack.enter_async_context(client(svc.url))
        for n in range(40):
            await store.create_run("F", user="ann", tags=[f"t{n}", "all"], system_tags=["user:ann"])
        for n in range(30):
            await store.record_task("F", "1", "start", str(n))
            for attempt in range(2):
                await store.record_attempt("F", "1", "start", str(n), _attempt(attempt))
        queries.clear()
        page = await store.list_runs(tags=["all"], limit=40)
        assert (len(page.items), len(queries)) == (40, 1), queries  # pool release adds no statement
        assert page.items[0].tags == ("t39", "all")
        queries.clear()
        tasks = await store.list_tasks("F", "1")
        assert ([len(t.attempts) for t in tasks], len(queries)) == ([2] * 30, 1)


def _attempt(number: int) -> AttemptRecord:
    return AttemptRecord(attempt=number, status="ok" if number else "failed", started_at=1.0, exit_code=number)


# ----------------------------------------------------------------- migrations and start-up


async def test_two_services_starting_at_once_migrate_once(dsn: str, tmp_path: Path) -> None:
    services = [MetadataService(service_config(dsn, tmp_path)) for _ in range(2)]
    try:
        await asyncio.gather(*(s.start() for s in services))
        everything = [m.version for m in load_migrations()]
        assert sorted(s.store.applied_migrations for s in services) == [[], everything]
        con = await asyncpg.connect(dsn)
        try:
            rows = await con.fetch("SELECT version FROM schema_version ORDER BY version")
        finally:
            await con.close()
        assert [r["version"] for r in rows] == everything
        async with client(services[0].url) as a, client(services[1].url) as b:
            assert [(await a.create_run("F", user="ann")).run_id, (await b.create_run("F", user="ann")).run_id] \
                == ["1", "2"]
    finally:
        for s in services:
            await s.stop()


async def test_no_database_at_start_fails_after_the_startup_timeout(tmp_path: Path) -> None:
    dead_dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    started = time.monotonic()
    code = await run_service(service_config(dead_dsn, tmp_path, startup_timeout_s=0.6), stop=asyncio.Event())
    assert code == 1
    assert 0.5 < time.monotonic() - started < 5
    store = ServiceMetadataStore(f"http://127.0.0.1:{free_port()}", api_key=API_KEY, timeout_s=1, retries=1)
    with pytest.raises(MetadataError) as info:
        await store.open()
    assert info.value.retryable


async def test_the_command_exits_0_on_sigterm(dsn: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    (tmp_path / "keys").write_text(API_KEY + "\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "millstream.metadata.service", "--dsn", dsn, "--listen", f"127.0.0.1:{port}",
        "--api-key-file", str(tmp_path / "keys"), "--dead-after-s", "30", cwd=REPO, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def healthy() -> bool:
            try:
                return (await call(http, "GET", f"http://127.0.0.1:{port}/v1/health", headers={}))[0] == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_for(healthy, 20)
        async with client(f"http://127.0.0.1:{port}") as store:
            assert (await store.create_run("F", user="ann")).run_id == "1"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    events = [json.loads(line)["event"] for line in (await proc.stderr.read()).decode().splitlines() if line]
    assert "metadata_service_ready" in events
    assert events[-1] == "metadata_service_stopped"
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "millstream.metadata.service", "--dsn", dsn, cwd=REPO,
        env={k: v for k, v in env.items() if k != "MILLSTREAM_METADATA_API_KEYS"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await asyncio.wait_for(bad.wait(), 10) == 2  # no API key configured


# ----------------------------------------------------------------- PostgreSQL restart under load


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port (run as user postgres when we are root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ms-pg-", dir="/tmp"))  # pytest's tmp is root-only
        self.data = self.root / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    @property
    def dsn(self) -> str:
        """Its ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _run(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(*self.prefix, *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            raise AssertionError(f"{args[0]} failed ({proc.returncode}): {out.decode()[-2000:]}")

    async def init(self) -> None:
        """initdb, quick and unsafe: this cluster lives for one test."""
        await self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--no-sync")

    async def start(self) -> None:
        """Start and wait until it accepts connections."""
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c full_page_writes=off -c shared_buffers=16MB")
        await self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"),
                        "-o", options, "-w", "-t", "30", "start")

    async def stop(self, mode: str = "fast") -> None:
        """Stop: ``fast`` ends every session at once, as a restart does."""
        await self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    async def destroy(self) -> None:
        """Stop if running, remove the files."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(AssertionError, TimeoutError):
                await self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found or not Path(found[-1]).with_name("initdb").exists():
        pytest.skip("no initdb/pg_ctl under /usr/lib/postgresql/*/bin")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user to run a private cluster")
    return Path(found[-1]).parent


async def test_postgres_restart_mid_load_gives_503s_then_recovers(tmp_path: Path) -> None:
    pg = PrivatePostgres(_postgres_bindir())
    timeout_s = 3.0
    try:
        await pg.init()
        await pg.start()
        async with running_service(pg.dsn, tmp_path, connect_timeout_s=1.0, command_timeout_s=2.0) as svc, \
                client(svc.url, timeout_s=timeout_s, retries=1) as store, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
            run = await store.create_run("Load", user="ann")
            outcomes: dict[str, list[tuple[str, bool, float, str]]] = {}
            task_ids = (f"t{n}" for n in itertools.count())

            async def load(phase: str, requests: int, workers: int = 4) -> None:
                todo = iter(range(requests))

                async def worker() -> None:
                    for _ in todo:
                        task_id, started = next(task_ids), time.monotonic()
                        try:
                            await store.record_task("Load", run.run_id, "start", task_id)
                            result = (task_id, True, time.monotonic() - started, "")
                        except MetadataError as exc:
                            assert exc.retryable, exc
                            result = (task_id, False, time.monotonic() - started, str(exc))
                        outcomes.setdefault(phase, []).append(result)

                await asyncio.gather(*(worker() for _ in range(workers)))

            await load("before", 60)
            await asyncio.gather(load("stopping", 20), pg.stop())
            await load("down", 40)
            status, _, body = await call(http, "GET", svc.url + "/v1/health", headers={})
            assert (status, body["error"], body["retryable"]) == (503, "unavailable", True)
            await pg.start()
            await load("after", 80)

            assert all(ok for _, ok, _, _ in outcomes["before"])
            assert not any(ok for _, ok, _, _ in outcomes["down"])
            assert all("unavailable" in why for _, _, _, why in outcomes["down"]), outcomes["down"][:3]
            assert all(ok for _, ok, _, _ in outcomes["after"]), [o for o in outcomes["after"] if not o[1]][:3]
            slowest = max(t for v in outcomes.values() for _, _, t, _ in v)
            assert slowest < 2 * timeout_s + 1, slowest  # (retries + 1) * timeout at worst, never a hang
            recorded = {t.task_id for t in await store.list_tasks("Load", run.run_id)}
            succeeded = {task_id for v in outcomes.values() for task_id, ok, _, _ in v if ok}
            # Every acknowledged write survived the restart (a write whose answer was lost may be there too).
            assert succeeded <= recorded
            assert sum(len(v) for v in outcomes.values()) == 200
    finally:
        await pg.destroy()
