"""Requests per second of the metadata service: task records and artifact indexes.

A fresh database is created on the local PostgreSQL, the service is started on it as
its own process (``python -m millstream.metadata.service``, so that it does not share
a CPU with the load), and ``--clients`` ServiceMetadataStores hammer it for
``--duration-s`` each with ``record_task`` (a new task every call), then with
``record_artifacts`` of 10 artifacts (a new attempt every call). The database is
dropped at the end.

    python bench/metadata_service.py --clients 16 --duration-s 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import secrets
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from millstream.metadata.client import ServiceMetadataStore
from millstream.metadata.model import ArtifactRecord

REPO = Path(__file__).resolve().parent.parent

API_KEY = "bench-" + secrets.token_hex(16)


@contextlib.asynccontextmanager
async def fresh_database(admin_dsn: str) -> AsyncIterator[str]:
    """A new database, dropped afterwards; yields its DSN."""
    name = f"ms_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def service_process(dsn: str, pool_size: int) -> AsyncIterator[str]:
    """The service in a subprocess on a free port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MILLSTREAM_METADATA_API_KEYS": API_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "millstream.metadata.service", "--dsn", dsn, "--listen", f"127.0.0.1:{port}",
        "--pool-size", str(pool_size), env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/v1/health") as resp:
                        if resp.status == 200:
                            break
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the service did not start (exit code {proc.returncode})")
                await asyncio.sleep(0.05)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def hammer(clients: list[ServiceMetadataStore], duration_s: float,
                 call: Callable[[ServiceMetadataStore, int], Awaitable[None]]) -> dict[str, float]:
    """Every client calls ``call`` back to back for ``duration_s``; requests/s and latencies."""
    counter = itertools.count()
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s

    async def loop(store: ServiceMetadataStore) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await call(store, next(counter))
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(loop(c) for c in clients))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"requests": len(latencies), "elapsed_s": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run both measurements."""
    async with fresh_database(args.admin_dsn) as dsn, service_process(dsn, args.pool_size) as url, \
            contextlib.AsyncExitStack() as stack:
        clients = []
        for _ in range(args.clients):
            store = ServiceMetadataStore(url, api_key=API_KEY)
            await store.open()
            stack.push_async_callback(store.close)
            clients.append(store)
        run = await clients[0].create_run("Bench", user="bench")
        await clients[0].record_task("Bench", run.run_id, "end", "0")

        async def record_task(store: ServiceMetadataStore, n: int) -> None:
            await store.record_task("Bench", run.run_id, "start", str(n), parents=["begin/0"], foreach_index=[n])

        artifacts = [ArtifactRecord(name=f"a{i}", sha=secrets.token_hex(32), size=1000 + i, type_name="int")
                     for i in range(10)]

        async def record_artifacts(store: ServiceMetadataStore, n: int) -> None:
            await store.record_artifacts("Bench", run.run_id, "end", "0", n, artifacts)

        results = {"record_task": await hammer(clients, args.duration_s, record_task),
                   "record_artifacts_10": await hammer(clients, args.duration_s, record_artifacts)}
    return {"clients": args.clients, "pool_size": args.pool_size, "duration_s": args.duration_s,
            "cpus": os.cpu_count(), "python": platform.python_version(), **results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="where to create and drop the benchmark database")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--pool-size", type=int, default=10, help="the service's PostgreSQL connections")
    parser.add_argument("--json", help="also write the results to this file")
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    for name in ("record_task", "record_artifacts_10"):
        r = result[name]
        print(f"{name:20} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
              f"  ({r['requests']} requests, {result['clients']} clients, {r['elapsed_s']} s)")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n")
