"""S3Store against moto, through a fault-injecting proxy: transfers, retries, errors.

The ObjectStore contract itself runs on S3 in tests/datastore (the ``s3`` backend);
these tests cover what only S3 has: multipart uploads, ranged parallel downloads,
throttling and lost responses, permanent errors and conditional writes under faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from millstream.config.settings import load_settings
from millstream.datastore.artifacts import ArtifactStore
from millstream.datastore.backends import open_store
from millstream.datastore.retry import Backoff, full_jitter
from millstream.datastore.s3 import MiB, S3Store
from millstream.errors import ConfigError, DatastoreError, NotFound
from tests.aws.conftest import BUCKET
from tests.aws.fault_proxy import FaultProxy, Rule
from tests.aws.moto_server import MotoServer

REPO = Path(__file__).resolve().parents[2]
MakeStore = Callable[..., S3Store]


def _small_parts(**kwargs: Any) -> dict[str, Any]:
    """Store options that make a 12 MB value a 3-part multipart transfer."""
    return {"multipart_threshold_bytes": 5 * MiB, "part_size_bytes": 5 * MiB, **kwargs}


async def _uploads(s3_client: Any) -> list[Any]:
    listed = await s3_client.list_multipart_uploads(Bucket=BUCKET)
    return list(listed.get("Uploads", []))


async def _missing(s3_client: Any, key: str) -> bool:
    listed = await s3_client.list_objects_v2(Bucket=BUCKET, Prefix=key)
    return not listed.get("Contents")


# -- backoff ---------------------------------------------------------------------------


def test_full_jitter_stays_inside_the_capped_window() -> None:
    assert full_jitter(0, 0.1, 5.0, 0.5) == pytest.approx(0.05)
    assert full_jitter(3, 0.1, 5.0, 0.999) == pytest.approx(0.7992)
    assert full_jitter(10, 0.1, 5.0, 0.5) == pytest.approx(2.5)  # capped at 5 s
    assert full_jitter(10_000, 0.1, 5.0, 1.0) == 5.0  # no overflow
    backoff = Backoff(8, base_s=0.1, cap_s=5.0, rng=random.Random(1))
    delays = [backoff.delay_s(n) for n in range(8)]
    assert all(0 <= d <= min(5.0, 0.1 * 2 ** n) for n, d in enumerate(delays))
    assert backoff.attempts == 9


# -- multipart uploads --------------------------------------------------------------------


async def test_multipart_put_file_round_trips(make_s3_store: MakeStore, fault_proxy: FaultProxy,
                                              s3_client: Any, tmp_path: Path) -> None:
    store = make_s3_store(**_small_parts())
    data = os.urandom(12 * MiB)
    source = tmp_path / "big.bin"
    source.write_bytes(data)

    await store.put_file("big/blob", source)

    parts = [s for s in fault_proxy.requests_to("big/blob", "PUT") if "partNumber" in s.query]
    assert len(parts) == 3
    assert len(fault_proxy.requests_to("big/blob", "POST")) == 2  # create, complete
    assert await store.size("big/blob") == len(data)
    target = tmp_path / "out" / "big.bin"
    await store.get_file("big/blob", target)
    assert target.read_bytes() == data
    assert await store.get("big/blob") == data
    assert await _uploads(s3_client) == []
    head = await s3_client.head_object(Bucket=BUCKET, Key="ms/big/blob")
    assert head["ETag"].endswith('-3"')


async def test_a_big_put_goes_multipart_and_put_if_absent_too(make_s3_store: MakeStore,
                                                              fault_proxy: FaultProxy) -> None:
    store = make_s3_store(**_small_parts())
    first, second = os.urandom(11 * MiB), os.urandom(11 * MiB)
    await store.put("p", first)
    assert await store.get("p") == first
    assert await store.put_if_absent("c", first)
    assert not await store.put_if_absent("c", second)
    assert await store.get("c") == first
    completes = [s for s in fault_proxy.requests_to("ms/c$", "POST") if "uploadId" in s.query]
    assert len(completes) == 2


async def test_a_failed_multipart_upload_leaves_no_object_and_no_upload(
        make_s3_store: MakeStore, fault_proxy: FaultProxy, s3_client: Any, tmp_path: Path) -> None:
    store = make_s3_store(**_small_parts())
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * MiB))
    fault_proxy.configure(rules=[Rule("deny", method="PUT", query=r"partNumber=2\b")])

    with pytest.raises(DatastoreError, match=r"AccessDenied.*") as caught:
        await store.put_file("big/blob", source)

    assert f"s3://{BUCKET}/ms/big/blob" in str(caught.value)
    assert await _missing(s3_client, "ms/big/blob")
    assert await _uploads(s3_client) == []
    aborts = [s for s in fault_proxy.requests_to("big/blob", "DELETE") if "uploadId" in s.query]
    assert len(aborts) == 1


async def test_a_cancelled_multipart_upload_is_aborted(make_s3_store: MakeStore,
                                                       fault_proxy: FaultProxy, s3_client: Any,
                                                       tmp_path: Path) -> None:
    store = make_s3_store(**_small_parts())
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * MiB))
    fault_proxy.configure(stall_s=2.0, rules=[Rule("stall", method="PUT", query="partNumber=3")])
    upload = asyncio.create_task(store.put_file("big/blob", source))
    async with asyncio.timeout(10):
        while not [s for s in fault_proxy.seen if s.outcome == "stall"]:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload

    assert await _uploads(s3_client) == []
    assert await _missing(s3_client, "ms/big/blob")


# -- downloads ----------------------------------------------------------------------------


async def test_get_file_of_a_big_object_uses_parallel_ranged_gets(
        make_s3_store: MakeStore, fault_proxy: FaultProxy, s3_client: Any, tmp_path: Path) -> None:
    data = os.urandom(12 * MiB + 123)
    await s3_client.put_object(Bucket=BUCKET, Key="ms/dl", Body=data)
    store = make_s3_store(**_small_parts())
    # One part's body is cut off half way: the part alone is fetched again.
    fault_proxy.configure(rules=[Rule("truncate", method="GET", range=r"bytes=5242880-", times=1)])

    target = tmp_path / "dl.bin"
    await store.get_file("dl", target)

    assert target.read_bytes() == data
    ranges = sorted({s.range for s in fault_proxy.requests_to("ms/dl$", "GET")})
    assert ranges == ["bytes=0-5242879", "bytes=10485760-12583034", "bytes=5242880-10485759"]
    assert fault_proxy.counts["truncate"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["dl.bin"]  # no temporary file left


async def test_an_object_replaced_mid_download_fails_and_leaves_no_file(
        make_s3_store: MakeStore, fault_proxy: FaultProxy, s3_client: Any, tmp_path: Path) -> None:
    await s3_client.put_object(Bucket=BUCKET, Key="ms/dl", Body=os.urandom(11 * MiB))
    store = make_s3_store(**_small_parts(read_timeout_s=0.3))
    fault_proxy.configure(stall_s=0.5, rules=[Rule("stall", method="GET", range=r"bytes=5242880-",
                                                   times=1)])
    target = tmp_path / "dl.bin"
    download = asyncio.create_task(store.get_file("dl", target))
    async with asyncio.timeout(10):
        while not [s for s in fault_proxy.seen if s.outcome == "stall"]:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await s3_client.put_object(Bucket=BUCKET, Key="ms/dl", Body=b"new version")

    with pytest.raises(DatastoreError, match="replaced while being read"):
        await download
    assert list(tmp_path.iterdir()) == []


async def test_stream_reads_windows_with_exact_chunks(make_s3_store: MakeStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("millstream.datastore.s3.STREAM_WINDOW_BYTES", 10_000)
    store = make_s3_store()
    data = os.urandom(25_000)
    await store.put("s", data)
    chunks = [c async for c in store.stream("s", chunk_size=3_000)]
    assert b"".join(chunks) == data
    assert {len(c) for c in chunks[:-1]} == {3_000}
    assert len(chunks[-1]) == 25_000 % 3_000


# -- retries --------------------------------------------------------------------------------


async def test_a_workload_survives_twenty_percent_faults(make_s3_store: MakeStore,
                                                         fault_proxy: FaultProxy) -> None:
    store = make_s3_store(max_concurrency=8)
    fault_proxy.configure(rate=0.2, seed=7,
                          faults=("slowdown", "internal", "reset", "drop_response", "truncate"))
    rng = random.Random(42)
    ops = 0

    async def worker(w: int) -> None:
        nonlocal ops
        model: dict[str, bytes] = {}
        for i in range(25):
            key = f"w{w}/k{rng.randrange(6)}"
            value = f"{w}-{i}-".encode() * rng.randrange(1, 300)
            choice = rng.choice(["put", "put_if_absent", "get", "range", "exists", "size", "list",
                                 "delete"])
            if choice == "put":
                await store.put(key, value)
                model[key] = value
            elif choice == "put_if_absent":
                assert await store.put_if_absent(key, value) == (key not in model)
                model.setdefault(key, value)
            elif choice == "get":
                if key in model:
                    assert await store.get(key) == model[key]
                else:
                    with pytest.raises(NotFound):
                        await store.get(key)
            elif choice == "range" and key in model:
                assert await store.get_range(key, 3, 40) == model[key][3:40]
            elif choice == "exists":
                assert await store.exists(key) == (key in model)
            elif choice == "size" and key in model:
                assert await store.size(key) == len(model[key])
            elif choice == "list":
                assert await store.list(f"w{w}/") == sorted(model)
            elif choice == "delete":
                await store.delete(key)
                model.pop(key, None)
            ops += 1
        for key, value in model.items():
            assert await store.get(key) == value

    await asyncio.gather(*(worker(w) for w in range(8)))

    assert ops == 200  # (a range or size drawn for an absent key checks nothing)
    faults = sum(n for outcome, n in fault_proxy.counts.items() if outcome != "forwarded")
    assert faults >= 40, fault_proxy.stats()


async def test_a_stall_longer_than_the_read_timeout_is_retried(make_s3_store: MakeStore,
                                                               fault_proxy: FaultProxy) -> None:
    store = make_s3_store(read_timeout_s=0.3)
    await store.put("k", b"value")
    fault_proxy.configure(stall_s=1.0, rules=[Rule("stall", method="GET", times=1)])
    started = time.monotonic()
    assert await store.get("k") == b"value"
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.9
    assert [s.outcome for s in fault_proxy.requests_to("ms/k$", "GET")] == ["stall", "forwarded"]


async def test_retries_are_bounded_and_botocore_adds_none(make_s3_store: MakeStore,
                                                          fault_proxy: FaultProxy) -> None:
    store = make_s3_store(retries=3)
    fault_proxy.configure(rules=[Rule("slowdown", path="ms/busy")])
    with pytest.raises(DatastoreError, match=r"SlowDown.*HTTP 503, after 4 attempts"):
        await store.put("busy", b"x")
    assert len(fault_proxy.requests_to("ms/busy")) == 4

    fault_proxy.reset()
    once = make_s3_store(retries=0)
    fault_proxy.configure(rules=[Rule("internal", path="ms/busy")])
    with pytest.raises(DatastoreError, match="InternalError"):
        await once.get("busy")
    assert len(fault_proxy.requests_to("ms/busy")) == 1


# -- permanent errors -------------------------------------------------------------------


@pytest.mark.parametrize("op", ["get", "get_range", "put", "put_if_absent", "exists", "size",
                                "delete"])
async def test_access_denied_fails_at_once_naming_bucket_and_key(
        make_s3_store: MakeStore, fault_proxy: FaultProxy, op: str) -> None:
    store = make_s3_store()
    fault_proxy.configure(rules=[Rule("deny", path="/secret/")])
    call = {
        "get": lambda: store.get("secret/x"),
        "get_range": lambda: store.get_range("secret/x", 0, 4),
        "put": lambda: store.put("secret/x", b"v"),
        "put_if_absent": lambda: store.put_if_absent("secret/x", b"v"),
        "exists": lambda: store.exists("secret/x"),
        "size": lambda: store.size("secret/x"),
        "delete": lambda: store.delete("secret/x"),
    }[op]
    with pytest.raises(DatastoreError) as caught:
        await call()
    assert not isinstance(caught.value, NotFound)
    message = str(caught.value)
    assert f"s3://{BUCKET}/ms/secret/x" in message
    assert "403" in message and "1 attempt" in message
    assert len(fault_proxy.requests_to("/secret/")) == 1


async def test_a_missing_bucket_is_an_error_not_a_missing_key(make_s3_store: MakeStore,
                                                              fault_proxy: FaultProxy) -> None:
    store = make_s3_store(bucket="no-such-bucket")
    for call in (lambda: store.get("k"), lambda: store.exists("k"), lambda: store.size("k"),
                 lambda: store.put("k", b"v"), lambda: store.list("")):
        with pytest.raises(DatastoreError, match="NoSuchBucket") as caught:
            await call()
        assert not isinstance(caught.value, NotFound)
        assert "s3://no-such-bucket" in str(caught.value)
    assert fault_proxy.counts.get("forwarded", 0) <= 7  # no retries: one request each (+1 HEAD bucket)


# -- conditional writes -----------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.3])
async def test_put_if_absent_has_exactly_one_winner_among_twenty(
        make_s3_store: MakeStore, fault_proxy: FaultProxy, rate: float) -> None:
    store = make_s3_store()
    fault_proxy.configure(rate=rate, seed=3, faults=("drop_response", "reset", "slowdown"))
    payloads = [f"writer-{i}".encode() * 50 for i in range(20)]
    results = await asyncio.gather(*(store.put_if_absent("contested", p) for p in payloads))
    assert results.count(True) == 1
    fault_proxy.configure(rate=0.0)
    assert await store.get("contested") == payloads[results.index(True)]


async def test_a_retried_conditional_put_that_finds_its_own_write_returns_true(
        make_s3_store: MakeStore, fault_proxy: FaultProxy) -> None:
    store = make_s3_store()
    # The first PUT lands, but its response is lost; the re-sent PUT then gets 412.
    fault_proxy.configure(rules=[Rule("drop_response", method="PUT", times=1)])
    assert await store.put_if_absent("once", b"mine")
    puts = [s.outcome for s in fault_proxy.requests_to("ms/once$", "PUT")]
    assert puts == ["drop_response", "forwarded"]
    assert await store.get("once") == b"mine"
    assert not await store.put_if_absent("once", b"theirs")


async def test_a_retried_multipart_completion_of_our_own_upload_returns_true(
        make_s3_store: MakeStore, fault_proxy: FaultProxy, s3_client: Any) -> None:
    store = make_s3_store(**_small_parts())
    data = os.urandom(6 * MiB)
    fault_proxy.configure(rules=[Rule("drop_response", method="POST", query="uploadId", times=1)])
    assert await store.put_if_absent("big", data)
    assert await store.get("big") == data
    assert await _uploads(s3_client) == []


# -- listing, config, loops -------------------------------------------------------------


async def test_list_follows_every_page(make_s3_store: MakeStore, fault_proxy: FaultProxy) -> None:
    store = make_s3_store(list_page_size=7)
    keys = [f"run/{i:02d}" for i in range(20)]
    await asyncio.gather(*(store.put(k, b"") for k in keys), store.put("runner", b""))
    fault_proxy.reset()
    assert await store.list("run/") == keys
    assert len(fault_proxy.requests_to(f"/{BUCKET}$", "GET")) == 3


async def test_server_side_encryption_is_requested(make_s3_store: MakeStore, s3_client: Any) -> None:
    await make_s3_store(sse="AES256").put("plain", b"x")
    head = await s3_client.head_object(Bucket=BUCKET, Key="ms/plain")
    assert head["ServerSideEncryption"] == "AES256"
    await make_s3_store(sse="aws:kms", sse_kms_key_id="alias/ms").put("kms", b"x")
    head = await s3_client.head_object(Bucket=BUCKET, Key="ms/kms")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"].endswith("alias/ms")


async def test_open_store_takes_the_datastore_settings_as_json(moto: MotoServer,
                                                               bucket: str) -> None:
    settings = load_settings({
        "HOME": "/nonexistent", "MILLSTREAM_CONFIG": "/nonexistent/config.toml",
        "MILLSTREAM_DATASTORE_TYPE": "s3", "MILLSTREAM_DATASTORE_BUCKET": bucket,
        "MILLSTREAM_DATASTORE_PREFIX": "/team/", "MILLSTREAM_DATASTORE_ENDPOINT_URL": moto.url,
        "MILLSTREAM_DATASTORE_MULTIPART_THRESHOLD_MB": "5",
        "MILLSTREAM_DATASTORE_MAX_CONCURRENCY": "4",
    })
    config = json.loads(json.dumps(dataclasses.asdict(settings.datastore)))
    store = open_store({**config, "inline": True})
    assert isinstance(store, S3Store)
    assert (store.prefix, store.max_concurrency, store.multipart_threshold) == ("team/", 4, 5 * MiB)
    assert (store.part_size, store.backoff.retries) == (16 * MiB, 8)
    async with store:
        await store.put("k", b"v")
        assert await store.list("") == ["k"]


@pytest.mark.parametrize(("config", "message"), [
    ({}, "bucket"),
    ({"bucket": "b", "sse": "DES"}, "sse"),
    ({"bucket": "b", "sse_kms_key_id": "k"}, "aws:kms"),
    ({"bucket": "b", "part_size_mb": 1}, "part_size_mb"),
    ({"bucket": "b", "max_concurrency": 0}, "max_concurrency"),
    ({"bucket": "b", "retries": "many"}, "retries"),
])
def test_bad_s3_settings_are_config_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store({"type": "s3", **config})


def test_one_store_serves_two_loops_and_closes_both(moto: MotoServer, bucket: str) -> None:
    # The task runner's shape: a private loop on this thread and a helper thread's loop.
    store = S3Store(bucket, endpoint_url=moto.url)
    main_loop = asyncio.new_event_loop()
    helper = asyncio.new_event_loop()
    thread = threading.Thread(target=helper.run_forever, daemon=True)
    thread.start()
    try:
        main_loop.run_until_complete(store.put("k", b"from main"))
        assert asyncio.run_coroutine_threadsafe(store.get("k"), helper).result(10) == b"from main"
        main_loop.run_until_complete(store.put("k", b"again"))
        assert len(store._loops) == 2
        main_loop.run_until_complete(store.close())
        assert len(store._loops) == 0
    finally:
        helper.call_soon_threadsafe(helper.stop)
        thread.join(10)
        helper.close()
        main_loop.close()


def test_a_task_process_uses_the_proxy_and_its_control_endpoint(
        moto: MotoServer, bucket: str, fault_proxy: FaultProxy) -> None:
    rules = {"rules": [{"fault": "slowdown", "method": "PUT", "times": 1}]}
    request = urllib.request.Request(f"{fault_proxy.url}/__fault__/config",
                                     data=json.dumps(rules).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    config = {"type": "s3", "bucket": bucket, "prefix": "ms", "endpoint_url": fault_proxy.url}
    script = (
        "import asyncio, json, sys\n"
        "from millstream.datastore.backends import open_store\n"
        "async def main():\n"
        "    async with open_store(json.loads(sys.argv[1])) as store:\n"
        "        await store.put('from/task', b'hi')\n"
        "        print((await store.get('from/task')).decode())\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=30, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    # (structlog, unconfigured in this bare script, prints the s3_retry event to stdout)
    assert done.stdout.splitlines()[-1] == "hi"
    with urllib.request.urlopen(f"{fault_proxy.url}/__fault__/stats", timeout=10) as response:
        stats = json.loads(response.read())
    assert stats["slowdown"] == 1
    assert [s["outcome"] for s in stats["seen"] if s["method"] == "PUT"] == ["slowdown", "forwarded"]


async def test_artifacts_round_trip_through_s3_under_faults(make_s3_store: MakeStore,
                                                            fault_proxy: FaultProxy) -> None:
    store = make_s3_store(**_small_parts())
    fault_proxy.configure(rate=0.2, seed=11, faults=("slowdown", "reset", "drop_response"))
    arts = ArtifactStore(store, "MyFlow")
    values = {"big": os.urandom(6 * MiB), "small": list(range(100)), "same": list(range(100))}
    refs = await arts.save(values)
    assert refs["small"].sha == refs["same"].sha
    for name, value in values.items():
        assert await arts.load(refs[name].sha) == value
