"""Artifact save and load through ArtifactStore: local disk against S3 (moto on loopback).

Two workloads, each saved once and loaded back (best of ``--repeat`` fresh runs):

    big    one 100 MB artifact (``os.urandom`` bytes: incompressible, so stored raw)
    small  1,000 distinct small artifacts (dicts of ~100 B pickled) in one ``save``;
           loaded one after another, as a step's lazy attribute reads do, and 16 at a time

Backends: ``LocalStore`` durable (fsync) and not, and ``S3Store`` against a
``moto_server`` in its own process (so the server does not share this process's GIL),
or any endpoint given with ``--s3-endpoint``. With ``--metaflow-python`` naming an
interpreter that can ``import metaflow``, the same two workloads run through
Metaflow's own ``metaflow.datastore.FlowDataStore`` on its local storage (Metaflow
gzips every artifact, so the big one costs it a compression pass millstream skips).

    python bench/datastore.py --metaflow-python /tmp/mfvenv/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from millstream.datastore.artifacts import ArtifactStore  # noqa: E402
from millstream.datastore.local import LocalStore  # noqa: E402
from millstream.datastore.storage import ObjectStore  # noqa: E402

MiB = 1 << 20
LOAD_CONCURRENCY = 16


def small_values(count: int) -> dict[str, Any]:
    """``count`` distinct small values, so each is its own blob."""
    return {f"a{i}": {"index": i, "name": f"artifact-{i}", "weights": [i * 0.5] * 4} for i in range(count)}


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """Seconds one awaitable took, and its result."""
    started = time.perf_counter()
    result = await fn()
    return time.perf_counter() - started, result


async def run_workloads(store: ObjectStore, big_mb: int, count: int) -> dict[str, float]:
    """Save and load both workloads once through ``store``; seconds per phase."""
    arts = ArtifactStore(store, "BenchFlow")
    big = os.urandom(big_mb * MiB)
    out: dict[str, float] = {}
    out["big_save_s"], refs = await timed(lambda: arts.save({"big": big}))
    out["big_load_s"], loaded = await timed(lambda: arts.load(refs["big"].sha))
    assert loaded == big
    del loaded
    values = small_values(count)
    out["small_save_s"], refs = await timed(lambda: arts.save(values))
    shas = [refs[name].sha for name in values]

    async def one_by_one() -> list[Any]:
        return [await arts.load(sha) for sha in shas]

    async def concurrently() -> list[Any]:
        limit = asyncio.Semaphore(LOAD_CONCURRENCY)

        async def load(sha: str) -> Any:
            async with limit:
                return await arts.load(sha)

        return await asyncio.gather(*(load(sha) for sha in shas))

    out["small_load_seq_s"], got = await timed(one_by_one)
    assert got == list(values.values())
    out["small_load_16_s"], got = await timed(concurrently)
    assert got == list(values.values())
    return out


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of each phase over the runs."""
    return {phase: min(run[phase] for run in runs) for phase in runs[0]}


async def bench_local(durable: bool, big_mb: int, count: int, repeat: int) -> dict[str, float]:
    """The workloads on a fresh LocalStore directory per run."""
    runs = []
    for _ in range(repeat):
        root = Path(tempfile.mkdtemp(prefix="ms-bench-"))
        try:
            runs.append(await run_workloads(LocalStore(root, durable=durable), big_mb, count))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return best(runs)


async def bench_s3(endpoint: str, big_mb: int, count: int, repeat: int) -> dict[str, float]:
    """The workloads on a fresh bucket per run (moto is reset in between)."""
    from millstream.datastore.s3 import S3Store

    runs = []
    for n in range(repeat):
        bucket = f"ms-bench-{os.getpid()}-{n}"
        _http(f"{endpoint}/{bucket}", "PUT")
        async with S3Store(bucket, "bench", endpoint_url=endpoint) as store:
            await store.exists("warm-up")  # the client (botocore's models, a connection)
            runs.append(await run_workloads(store, big_mb, count))
        with contextlib.suppress(OSError):
            _http(f"{endpoint}/moto-api/reset", "POST")
    return best(runs)


def _http(url: str, method: str) -> None:
    request = urllib.request.Request(url, method=method, data=b"")
    with urllib.request.urlopen(request, timeout=60):
        pass


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    """A ``moto_server`` in its own process on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    command = [str(server)] if server.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


METAFLOW_SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys, tempfile, time
    from metaflow.datastore import FlowDataStore
    from metaflow.plugins.datastores.local_storage import LocalStorage

    big_mb, count, repeat = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    runs = []
    for n in range(repeat):
        root = tempfile.mkdtemp(prefix="mf-bench-")
        try:
            fds = FlowDataStore("BenchFlow", storage_impl=LocalStorage, ds_root=root)
            out = {}
            big = os.urandom(big_mb << 20)
            task = fds.get_task_datastore("1", "big", "1", attempt=0, mode="w")
            task.init_task()
            t = time.perf_counter(); task.save_artifacts([("big", big)]); task.done()
            out["big_save_s"] = time.perf_counter() - t
            task = fds.get_task_datastore("1", "big", "1", mode="r")
            t = time.perf_counter(); loaded = dict(task.load_artifacts(["big"]))["big"]
            out["big_load_s"] = time.perf_counter() - t
            assert loaded == big
            del loaded
            values = {f"a{i}": {"index": i, "name": f"artifact-{i}", "weights": [i * 0.5] * 4}
                      for i in range(count)}
            task = fds.get_task_datastore("1", "small", "1", attempt=0, mode="w")
            task.init_task()
            t = time.perf_counter(); task.save_artifacts(list(values.items()), len_hint=count)
            task.done(); out["small_save_s"] = time.perf_counter() - t
            task = fds.get_task_datastore("1", "small", "1", mode="r")
            t = time.perf_counter(); got = [task[name] for name in values]
            out["small_load_seq_s"] = time.perf_counter() - t
            assert got == list(values.values())
            task = fds.get_task_datastore("1", "small", "1", mode="r")
            t = time.perf_counter(); got = dict(task.load_artifacts(list(values)))
            out["small_load_batch_s"] = time.perf_counter() - t
            assert got == values
            runs.append(out)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({k: min(r[k] for r in runs) for k in runs[0]}))
""")


def bench_metaflow(python: str, big_mb: int, count: int, repeat: int) -> dict[str, Any] | str:
    """Metaflow's local datastore doing the same, in its own interpreter; or why not."""
    if not Path(python).exists():
        return f"skipped: {python} does not exist"
    probe = subprocess.run([python, "-c", "import metaflow; print(metaflow.__version__)"],
                           check=False, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"skipped: {python} cannot import metaflow"
    done = subprocess.run([python, "-c", METAFLOW_SCRIPT, str(big_mb), str(count), str(repeat)],
                          check=False, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "USERNAME": os.environ.get("USER", "bench")})
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return {"version": probe.stdout.strip(), **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3-endpoint", help="an S3 endpoint that accepts bare PUT bucket (moto)")
    parser.add_argument("--metaflow-python", default="/tmp/mfvenv/bin/python")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(name, value)

    results: dict[str, Any] = {"big_mb": args.big_mb, "small": args.small, "repeat": args.repeat}
    results["local_durable"] = asyncio.run(bench_local(True, args.big_mb, args.small, args.repeat))
    results["local_fast"] = asyncio.run(bench_local(False, args.big_mb, args.small, args.repeat))
    if args.s3_endpoint:
        results["s3"] = asyncio.run(bench_s3(args.s3_endpoint, args.big_mb, args.small, args.repeat))
    else:
        with moto_process() as url:
            results["s3"] = asyncio.run(bench_s3(url, args.big_mb, args.small, args.repeat))
    results["metaflow_local"] = bench_metaflow(args.metaflow_python, args.big_mb, args.small, args.repeat)

    phases = ["big_save_s", "big_load_s", "small_save_s", "small_load_seq_s", "small_load_16_s",
              "small_load_batch_s"]
    columns = [name for name in ("local_durable", "local_fast", "s3", "metaflow_local")
               if isinstance(results[name], dict)]
    print(f"best of {args.repeat}; big = one {args.big_mb} MB artifact, small = {args.small} artifacts")
    print(f"{'phase':<20}" + "".join(f"{name:>16}" for name in columns))
    for phase in phases:
        cells = [results[name].get(phase) for name in columns]
        if all(cell is None for cell in cells):
            continue
        print(f"{phase:<20}" + "".join(f"{'-' if c is None else f'{c * 1000:.0f} ms':>16}" for c in cells))
    if not isinstance(results["metaflow_local"], dict):
        print(f"metaflow: {results['metaflow_local']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
