"""The S3 object store: an adapter from the ObjectStore port to S3 through aiobotocore.

This is the only module that talks to S3, and :func:`_classify` / :meth:`S3Store._error`
are the one place where botocore's errors become millstream's: ``NotFound(key)`` for a
missing key, :class:`~millstream.errors.DatastoreError` (naming the bucket and key) for
everything else.

Clients and loops
    The store builds its aiobotocore client lazily, inside the running loop, because
    the client's connection pool belongs to that loop. A store used from a second loop
    (a task process runs datastore calls on a private loop, and on a helper thread's
    loop while the user's own ``asyncio.run`` occupies the main thread) gets one more
    client and one more in-flight limit for that loop; each is reused while its loop
    lives. :meth:`S3Store.close` closes the client of the calling loop and of loops
    running in other threads; close the store before closing a loop that used it.

Limits
    ``max_concurrency`` bounds the S3 requests in flight per loop (an
    ``asyncio.Semaphore`` taken per HTTP attempt, never across a whole transfer, so a
    multipart upload cannot deadlock against its own parts) and sizes aiobotocore's
    pool (``max_pool_connections``) to match. One transfer moves at most
    :data:`PARTS_IN_FLIGHT` parts at once, so memory stays near
    ``PARTS_IN_FLIGHT * part_size`` per transfer.

Retries
    botocore's own retries are off (one attempt per call); :meth:`S3Store._request`
    retries throttling (``SlowDown``, 503), server errors (500, 502, 504),
    ``RequestTimeout``, connection resets and read timeouts with full-jitter backoff
    (:mod:`millstream.datastore.retry`), up to ``retries`` times. Everything else
    (``AccessDenied``, ``NoSuchBucket``, a 404 where an object must exist) fails at once.

Writes
    Values at or above ``multipart_threshold`` go up as a multipart upload that is
    aborted on any failure or cancellation, so nothing half-written becomes visible.
    ``put_if_absent`` sends ``If-None-Match: *`` (on ``CompleteMultipartUpload`` for a
    big value). Each conditional write carries a random writer token in its metadata.
    A 412 may answer a re-send of our own write whose first response was lost (our
    retry, or the one re-send aiohttp makes by itself of an idempotent PUT when a reused
    keep-alive connection drops, which this code never sees), so every 412 is followed by
    a HEAD comparing tokens: "ours" (True) or "someone else's" (False), exactly, whatever
    the encryption or part layout (an ETag is only an MD5 for single-part unencrypted
    or SSE-S3 objects). Losing a race therefore costs a PUT and a HEAD. A ``CreateMultipartUpload`` whose
    response is lost leaves an upload nobody aborts; give the bucket a lifecycle rule
    with ``AbortIncompleteMultipartUpload`` as the backstop.

Reads
    ``get`` and ``get_file`` start with one ranged GET of ``part_size`` bytes: a small
    object arrives whole in that one request, and a big one reveals its size and ETag,
    after which the other parts are fetched in parallel with ``If-Match`` so that an
    object replaced mid-read fails loudly instead of mixing two versions. ``get_file``
    writes each part to its offset in a temporary file as it streams in, so neither the
    object nor a part is held in memory whole; ``stream`` reads windows of
    :data:`STREAM_WINDOW_BYTES`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import math
import os
import secrets
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from millstream.datastore.retry import Backoff
from millstream.datastore.storage import (
    DEFAULT_CHUNK_BYTES,
    TEMP_PREFIX,
    check_key,
    check_prefix,
    check_range,
)
from millstream.errors import ConfigError, DatastoreError, NotFound

_T = TypeVar("_T")

MiB = 1 << 20

#: S3's smallest part (all but the last) and most parts per upload.
MIN_PART_BYTES = 5 * MiB
MAX_PARTS = 10_000

#: Parts one transfer moves at once; the store-wide request limit still applies.
PARTS_IN_FLIGHT = 8

#: How much ``stream`` fetches per ranged GET.
STREAM_WINDOW_BYTES = 8 * MiB

#: How much of a download is buffered before it is written to disk.
WRITE_CHUNK_BYTES = 1 * MiB

DEFAULT_MAX_CONCURRENCY = 32
DEFAULT_MULTIPART_THRESHOLD_MB = 64
DEFAULT_PART_SIZE_MB = 16
DEFAULT_RETRIES = 8
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
SSE_MODES = ("", "AES256", "aws:kms")

#: The user-metadata key (``x-amz-meta-...``) holding a conditional writer's token.
WRITER_TOKEN_META = "millstream-writer"

log = structlog.get_logger("millstream.datastore.s3")

_shared_session: AioSession | None = None


def shared_session() -> AioSession:
    """The process's aiobotocore session: its loaded service models serve every client."""
    global _shared_session  # noqa: PLW0603 - one session per process is the point
    if _shared_session is None:
        _shared_session = AioSession()
    return _shared_session


def preload() -> None:
    """Load aiobotocore and the S3 client machinery into :func:`shared_session`.

    A zygote calls this once before forking task processes, so each of them opens its
    first S3 client in ~10 ms instead of ~0.6 s (imports, service model, endpoint rules).
    It makes no request and leaves no thread or open connection behind, so forking
    stays safe.
    """

    async def open_and_close() -> None:
        config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1})
        # A loopback endpoint that is never contacted: creating a client sends nothing.
        async with shared_session().create_client("s3", region_name="us-east-1",
                                                  endpoint_url="http://127.0.0.1:9", config=config):
            pass

    asyncio.run(open_and_close())


class _Outcome(enum.Enum):
    MISSING = "missing"  # no such key: NotFound, or False from exists
    PRECONDITION = "precondition"  # 412: the If-None-Match / If-Match did not hold
    BAD_RANGE = "bad_range"  # 416: the range starts at or past the end
    RETRY = "retry"  # throttled, a server fault or a broken connection: try again
    FAIL = "fail"  # permanent: say so at once


#: Error codes worth another attempt, whatever their HTTP status (RequestTimeout is 400,
#: ConditionalRequestConflict 409: a concurrent conditional write is still in progress).
_RETRY_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "OperationAborted", "ConditionalRequestConflict", "BadDigest", "RequestTimeTooSkewed",
})
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})

#: Failures below HTTP: resets, refused connections, read timeouts, short bodies.
_TRANSIENT = (BotoConnectionError, HTTPClientError, ResponseStreamingError, IncompleteReadError,
              aiohttp.ClientError, ConnectionError, TimeoutError)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _classify(exc: Exception) -> _Outcome:
    """Sort one failed attempt into what the caller should do about it."""
    if isinstance(exc, ClientError):
        code, status = _code(exc), _status(exc)
        if code in _MISSING_CODES:
            return _Outcome.MISSING
        if code == "PreconditionFailed" or status == 412:
            return _Outcome.PRECONDITION
        if code == "InvalidRange" or status == 416:
            return _Outcome.BAD_RANGE
        if code in _RETRY_CODES or status in _RETRY_STATUSES:
            return _Outcome.RETRY
        return _Outcome.FAIL
    if isinstance(exc, _TRANSIENT):
        return _Outcome.RETRY
    return _Outcome.FAIL


class _Refused(DatastoreError):
    """A conditional request was refused (412) or a range was unsatisfiable (416)."""

    def __init__(self, message: str, outcome: _Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class _LoopClient:
    """The client and in-flight limit of one event loop."""

    slots: asyncio.Semaphore
    ready: asyncio.Lock
    client: Any = None


@dataclass(frozen=True)
class _Window:
    """One ranged read: its bytes, the object's total size and ETag."""

    data: bytes
    total: int
    etag: str


class S3Store:
    """An :class:`~millstream.datastore.storage.ObjectStore` on an S3 bucket and prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, region: str = "", endpoint_url: str = "",
                 sse: str = "", sse_kms_key_id: str = "",
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                 multipart_threshold_bytes: int = DEFAULT_MULTIPART_THRESHOLD_MB * MiB,
                 part_size_bytes: int = DEFAULT_PART_SIZE_MB * MiB,
                 backoff: Backoff | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 list_page_size: int = 1000,
                 session: AioSession | None = None) -> None:
        if not bucket or "/" in bucket:
            raise ConfigError(f"datastore.bucket must be a bucket name, got {bucket!r}")
        if sse not in SSE_MODES:
            raise ConfigError(f"datastore.sse must be one of {SSE_MODES}, got {sse!r}")
        if sse_kms_key_id and sse != "aws:kms":
            raise ConfigError("datastore.sse_kms_key_id needs datastore.sse = 'aws:kms'")
        if max_concurrency < 1:
            raise ConfigError(f"datastore.max_concurrency must be >= 1, got {max_concurrency}")
        if part_size_bytes < MIN_PART_BYTES:
            raise ConfigError(f"datastore.part_size_mb must be >= 5 (S3's smallest part), "
                              f"got {part_size_bytes / MiB:g}")
        if multipart_threshold_bytes < 1:
            raise ConfigError("datastore.multipart_threshold_mb must be positive")
        if not 1 <= list_page_size <= 1000:
            raise ConfigError(f"list_page_size must be in 1..1000, got {list_page_size}")
        self.bucket = bucket
        stripped = prefix.strip("/")
        if stripped:
            check_key(stripped)
        self.prefix = stripped + "/" if stripped else ""
        self.region = region
        self.endpoint_url = endpoint_url
        self.max_concurrency = max_concurrency
        self.multipart_threshold = multipart_threshold_bytes
        self.part_size = part_size_bytes
        self.backoff = backoff or Backoff(DEFAULT_RETRIES)
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.list_page_size = list_page_size
        self._sse: dict[str, str] = {}
        if sse:
            self._sse["ServerSideEncryption"] = sse
        if sse_kms_key_id:
            self._sse["SSEKMSKeyId"] = sse_kms_key_id
        self._session = session
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary())
        self._cleanups: set[asyncio.Task[None]] = set()
        self._bucket_checked = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> S3Store:
        """Build a store from the JSON-able datastore settings (``type = "s3"``)."""
        def number(name: str, default: float) -> float:
            value = config.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ConfigError(f"datastore.{name} must be a number, got {value!r}")
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"datastore.{name} must be a number, got {value!r}") from None

        def text(name: str) -> str:
            value = config.get(name) or ""
            if not isinstance(value, str):
                raise ConfigError(f"datastore.{name} must be a string, got {value!r}")
            return value

        return cls(
            text("bucket"), text("prefix"), region=text("region"),
            endpoint_url=text("endpoint_url"), sse=text("sse"),
            sse_kms_key_id=text("sse_kms_key_id"),
            max_concurrency=int(number("max_concurrency", DEFAULT_MAX_CONCURRENCY)),
            multipart_threshold_bytes=int(
                number("multipart_threshold_mb", DEFAULT_MULTIPART_THRESHOLD_MB) * MiB),
            part_size_bytes=int(number("part_size_mb", DEFAULT_PART_SIZE_MB) * MiB),
            backoff=Backoff(int(number("retries", DEFAULT_RETRIES))),
            connect_timeout_s=number("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S),
            read_timeout_s=number("read_timeout_s", DEFAULT_READ_TIMEOUT_S),
        )

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    async def __aenter__(self) -> S3Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the ObjectStore port -------------------------------------------------------

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; big values go up as an all-or-nothing multipart."""
        full = self._full(key)
        data = bytes(data)  # snapshot a bytearray the caller might change meanwhile
        if len(data) >= self.multipart_threshold:
            await self._multipart("put", key, full, len(data), _slicer(data))
            return
        await self._request("put", key, lambda c, _: c.put_object(
            Bucket=self.bucket, Key=full, Body=data, **self._sse))

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``If-None-Match: *``; True only for the writer that created it."""
        full = self._full(key)
        data = bytes(data)
        token = secrets.token_hex(16)
        if len(data) >= self.multipart_threshold:
            return await self._multipart("put_if_absent", key, full, len(data), _slicer(data),
                                         token=token, if_absent=True)
        try:
            await self._request("put_if_absent", key, lambda c, _: c.put_object(
                Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*",
                Metadata={WRITER_TOKEN_META: token}, **self._sse))
        except _Refused as refused:
            if refused.outcome is not _Outcome.PRECONDITION:
                raise
            # The 412 may answer a re-send of our own write whose first response was lost
            # (ours, or aiohttp's own one-time re-send of an idempotent PUT on a dropped
            # keep-alive connection, which we never see), so ask whose object it is.
            return await self._written_by(key, full, token)
        return True

    async def get(self, key: str) -> bytes:
        """Return the whole value; big values arrive as parallel ranged GETs."""
        full = self._full(key)
        first = await self._window("get", key, full, 0, self.part_size, None)
        if first.total <= len(first.data):
            return first.data
        parts: dict[int, bytes] = {0: first.data}

        async def fetch(start: int, length: int) -> None:
            window = await self._window("get", key, full, start, length, first.etag)
            parts[start] = window.data

        await self._each_part(fetch, first.total, len(first.data))
        return b"".join(parts[start] for start in sorted(parts))

    async def get_range(self, key: str, start: int, end: int | None = None) -> bytes:
        """Return bytes ``[start, end)``, cut short at the end of the value."""
        check_range(start, end)
        full = self._full(key)
        if end == start:
            await self.size(key)  # an empty range still needs the key to exist
            return b""
        rng = f"bytes={start}-" + ("" if end is None else str(end - 1))

        async def attempt(client: Any, _: int) -> bytes:
            response = await client.get_object(Bucket=self.bucket, Key=full, Range=rng)
            async with response["Body"] as body:
                data: bytes = await body.read()
                return data

        try:
            return await self._request("get_range", key, attempt)
        except _Refused as refused:
            if refused.outcome is _Outcome.BAD_RANGE:
                return b""  # the range starts at or past the end (a 404 would come first)
            raise

    async def stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_BYTES
                     ) -> AsyncGenerator[bytes, None]:
        """Yield the value in ``chunk_size`` pieces, fetched a window at a time."""
        if chunk_size <= 0:
            raise DatastoreError(f"chunk_size must be positive, got {chunk_size}")
        full = self._full(key)
        # A whole number of chunks per window, so only the very last chunk is short.
        window_size = max(1, STREAM_WINDOW_BYTES // chunk_size) * chunk_size
        offset, etag, total = 0, None, None
        while total is None or offset < total:
            window = await self._window("stream", key, full, offset, window_size, etag)
            etag, total = window.etag, window.total
            if not window.data:
                return
            view = memoryview(window.data)
            for at in range(0, len(view), chunk_size):
                yield bytes(view[at:at + chunk_size])
            offset += len(window.data)

    async def put_file(self, key: str, path: Path) -> None:
        """Upload a local file; above the threshold as parallel parts read with ``pread``."""
        full = self._full(key)
        try:
            fd = await asyncio.to_thread(os.open, os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DatastoreError(f"put_file {key!r} to {self._url(full)}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size

            async def read(start: int, length: int) -> bytes:
                try:
                    return await asyncio.to_thread(_pread_exactly, fd, length, start)
                except OSError as exc:
                    raise DatastoreError(f"put_file {key!r}: reading {path}: {exc}") from exc

            if size >= self.multipart_threshold:
                await self._multipart("put_file", key, full, size, read)
                return
            data = await read(0, size)  # below the threshold: at most that much in memory
            await self._request("put_file", key, lambda c, _: c.put_object(
                Bucket=self.bucket, Key=full, Body=data, **self._sse))
        finally:
            os.close(fd)

    async def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` into ``path`` through a temporary file; failures leave nothing."""
        full = self._full(key)
        first = await self._window("get_file", key, full, 0, self.part_size, None)
        dest = os.path.abspath(path)
        directory = os.path.dirname(dest)
        tmp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        try:
            fd = await asyncio.to_thread(_create_file, directory, tmp)
        except OSError as exc:
            raise DatastoreError(f"get_file {key!r} into {path}: {exc}") from exc
        try:
            try:
                await asyncio.to_thread(_pwrite_all, fd, first.data, 0)
                if first.total > len(first.data):
                    await asyncio.to_thread(os.ftruncate, fd, first.total)

                    async def fetch(start: int, length: int) -> None:
                        await self._download_part(key, full, fd, start, length, first.etag)

                    await self._each_part(fetch, first.total, len(first.data))
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            await asyncio.to_thread(os.replace, tmp, dest)
        except OSError as exc:
            await asyncio.to_thread(_unlink_quietly, tmp)
            raise DatastoreError(f"get_file {key!r} into {path}: {exc}") from exc
        except BaseException:
            await asyncio.shield(asyncio.to_thread(_unlink_quietly, tmp))
            raise

    async def exists(self, key: str) -> bool:
        """Tell whether an object is stored under exactly ``key`` (one HEAD)."""
        full = self._full(key)
        try:
            await self._head("exists", key, full)
        except NotFound:
            return False
        return True

    async def list(self, prefix: str) -> builtins.list[str]:
        """Return every key starting with ``prefix``, sorted, following every page."""
        check_prefix(prefix)
        full_prefix = self.prefix + prefix
        keys: builtins.list[str] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix,
                                    "MaxKeys": self.list_page_size}
            if token:
                args["ContinuationToken"] = token
            page = await self._request("list", prefix, _calling("list_objects_v2", args))
            keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        keys.sort()
        return keys

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        full = self._full(key)
        with contextlib.suppress(NotFound):
            await self._request("delete", key, lambda c, _: c.delete_object(
                Bucket=self.bucket, Key=full))

    async def size(self, key: str) -> int:
        """Return the value's length from a HEAD; raise ``NotFound`` if missing."""
        full = self._full(key)
        head = await self._head("size", key, full)
        return int(head["ContentLength"])

    async def close(self) -> None:
        """Close the clients this store opened; it makes new ones if used again."""
        here = asyncio.get_running_loop()
        pending = [task for task in self._cleanups if task.get_loop() is here]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        with self._lock:
            states = list(self._loops.items())
            self._loops.clear()
        for loop, state in states:
            if state.client is None:
                continue
            if loop is here:
                await state.client.close()
            elif loop.is_running():
                future = asyncio.run_coroutine_threadsafe(state.client.close(), loop)
                await asyncio.wrap_future(future)
            # A client on a stopped loop cannot be closed from here; its loop owner
            # should have closed the store before stopping it.

    # -- transfers --------------------------------------------------------------------

    async def _multipart(self, op: str, key: str, full: str, size: int,
                         read: Callable[[int, int], Awaitable[bytes]], *,
                         token: str | None = None, if_absent: bool = False) -> bool:
        """Upload ``size`` bytes in parts; abort on any failure so nothing is left behind."""
        token = token or secrets.token_hex(16)
        part_size = self._part_size_for(size)
        created = await self._request(op, key, lambda c, _: c.create_multipart_upload(
            Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32",
            Metadata={WRITER_TOKEN_META: token}, **self._sse))
        upload_id = created["UploadId"]
        parts: dict[int, dict[str, str]] = {}
        try:
            async def send(start: int, length: int) -> None:
                number = start // part_size + 1
                body = await read(start, length)
                sent = await self._request(op, key, lambda c, _: c.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                    Body=body, ChecksumAlgorithm="CRC32"))
                part = {"PartNumber": number, "ETag": sent["ETag"]}
                if sent.get("ChecksumCRC32"):
                    part["ChecksumCRC32"] = sent["ChecksumCRC32"]
                parts[number] = part

            await self._each_part(send, size, 0, part_size=part_size)
            done = {"Parts": [parts[n] for n in sorted(parts)]}
            condition = {"IfNoneMatch": "*"} if if_absent else {}

            async def complete(client: Any, _: int) -> bool:
                try:
                    await client.complete_multipart_upload(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload=done,
                        **condition)
                except ClientError as exc:
                    # A lost response to a completion that worked: the upload is gone.
                    if _code(exc) == "NoSuchUpload":
                        try:
                            head = await client.head_object(Bucket=self.bucket, Key=full)
                        except ClientError:
                            return False
                        return bool(head.get("Metadata", {}).get(WRITER_TOKEN_META) == token)
                    raise
                return True

            try:
                completed = await self._request(op, key, complete)
            except _Refused as refused:
                if refused.outcome is not _Outcome.PRECONDITION:
                    raise
                completed = await self._written_by(key, full, token)
                await self._abort(op, key, full, upload_id)
                return completed
            if not completed:
                raise DatastoreError(f"{op} {self._url(full)}: the multipart upload vanished")
            return True
        except BaseException:
            # Shielded so that a cancelled upload is still aborted; close() awaits it.
            cleanup = asyncio.ensure_future(self._abort(op, key, full, upload_id))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            with contextlib.suppress(Exception):
                await asyncio.shield(cleanup)
            raise

    async def _abort(self, op: str, key: str, full: str, upload_id: str) -> None:
        async def attempt(client: Any, _: int) -> None:
            try:
                await client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except ClientError as exc:
                if _code(exc) != "NoSuchUpload":  # already gone: aborted or completed
                    raise

        await self._request(f"{op} (abort)", key, attempt)

    async def _each_part(self, fn: Callable[[int, int], Awaitable[None]], size: int, start: int,
                         *, part_size: int | None = None) -> None:
        """Call ``fn(start, length)`` for each part of ``[start, size)``, a few at a time."""
        step = part_size or self.part_size
        pieces: Iterator[tuple[int, int]] = (
            (at, min(step, size - at)) for at in range(start, size, step))

        async def worker() -> None:
            for at, length in pieces:  # a shared iterator: each piece goes to one worker
                await fn(at, length)

        workers = min(PARTS_IN_FLIGHT, max(1, math.ceil((size - start) / step)))
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        except BaseExceptionGroup as failures:
            # Callers catch DatastoreError, not a group; the first failure is the story.
            raise failures.exceptions[0] from None

    async def _window(self, op: str, key: str, full: str, start: int, length: int,
                      etag: str | None) -> _Window:
        """GET ``length`` bytes at ``start``; ``If-Match`` pins the version once known."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full,
                                "Range": f"bytes={start}-{start + length - 1}"}
        if etag:
            args["IfMatch"] = etag

        async def attempt(client: Any, _: int) -> _Window:
            response = await client.get_object(**args)
            async with response["Body"] as body:
                data = await body.read()
            return _Window(data, _total_size(response, start + len(data)), response["ETag"])

        try:
            return await self._request(op, key, attempt)
        except _Refused as refused:
            if refused.outcome is _Outcome.BAD_RANGE and start == 0:
                # Only an empty object refuses bytes=0-...; a missing key says 404 first.
                return _Window(b"", 0, etag or "")
            if refused.outcome is _Outcome.PRECONDITION:
                raise DatastoreError(f"{op} {self._url(full)}: the object was replaced while "
                                     "being read") from None
            raise

    async def _download_part(self, key: str, full: str, fd: int, start: int, length: int,
                             etag: str) -> None:
        """Stream one ranged GET to its offset in ``fd``; a retry rewrites the same bytes."""
        args = {"Bucket": self.bucket, "Key": full, "IfMatch": etag,
                "Range": f"bytes={start}-{start + length - 1}"}

        async def attempt(client: Any, _: int) -> None:
            response = await client.get_object(**args)
            offset = start
            async with response["Body"] as body:
                while chunk := await body.read(WRITE_CHUNK_BYTES):
                    await asyncio.to_thread(_pwrite_all, fd, chunk, offset)
                    offset += len(chunk)
            if offset != start + length:
                raise IncompleteReadError(actual_bytes=offset - start, expected_bytes=length)

        try:
            await self._request("get_file", key, attempt)
        except _Refused as refused:
            if refused.outcome is _Outcome.PRECONDITION:
                raise DatastoreError(f"get_file {self._url(full)}: the object was replaced "
                                     "while being read") from None
            raise

    def _part_size_for(self, size: int) -> int:
        """The configured part size, grown in whole MiB if 10,000 parts would not hold it."""
        needed = math.ceil(size / MAX_PARTS)
        return max(self.part_size, math.ceil(needed / MiB) * MiB)

    # -- requests and errors ------------------------------------------------------------

    async def _head(self, op: str, key: str, full: str) -> dict[str, Any]:
        try:
            head: dict[str, Any] = await self._request(op, key, lambda c, _: c.head_object(
                Bucket=self.bucket, Key=full))
        except NotFound:
            # A HEAD has no body, so a missing bucket also reads as a bare 404: tell them
            # apart once, so a typo in the bucket name is not "every key is missing".
            if not self._bucket_checked:
                await self._request("head_bucket", "", lambda c, _: c.head_bucket(
                    Bucket=self.bucket), missing="bucket")
                self._bucket_checked = True
            raise
        return head

    async def _written_by(self, key: str, full: str, token: str) -> bool:
        """Whether the object under ``full`` carries this writer's token."""
        try:
            head = await self._head("put_if_absent", key, full)
        except NotFound:
            return False
        return bool(head.get("Metadata", {}).get(WRITER_TOKEN_META) == token)

    async def _request(self, op: str, key: str, attempt: Callable[[Any, int], Awaitable[_T]],
                       *, missing: str = "key") -> _T:
        """Run ``attempt(client, n)`` with retries; the one place errors are translated."""
        state = await self._state()
        retry = 0
        while True:
            try:
                async with state.slots:
                    return await attempt(state.client, retry)
            except (ClientError, BotoCoreError, *_TRANSIENT) as exc:
                outcome = _classify(exc)
                if outcome is _Outcome.RETRY and retry < self.backoff.retries:
                    delay_s = self.backoff.delay_s(retry)
                    log.info("s3_retry", op=op, bucket=self.bucket, key=key, attempt=retry + 1,
                             delay_s=round(delay_s, 4), error=_describe(exc))
                    retry += 1
                    await asyncio.sleep(delay_s)
                    continue
                raise self._error(op, key, exc, outcome, retry, missing) from exc

    def _error(self, op: str, key: str, exc: Exception, outcome: _Outcome, retry: int,
               missing: str) -> DatastoreError:
        full = self.prefix + key
        if outcome is _Outcome.MISSING and missing == "key":
            return NotFound(key)
        where = f"s3://{self.bucket}" if missing == "bucket" else self._url(full)
        if missing == "bucket" and outcome is _Outcome.MISSING:
            return DatastoreError(f"{op} {where}: NoSuchBucket: the bucket does not exist")
        tries = f"after {retry + 1} attempts" if retry else "1 attempt"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            text = (f"{op} {where}: {_code(exc)}: {error.get('Message', '')} "
                    f"(HTTP {_status(exc)}, {tries})")
        else:
            text = f"{op} {where}: {type(exc).__name__}: {exc} ({tries})"
        if outcome in (_Outcome.PRECONDITION, _Outcome.BAD_RANGE):
            return _Refused(text, outcome)
        return DatastoreError(text)

    async def _state(self) -> _LoopClient:
        """This loop's client and limit, made on first use in the loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.get(loop)
            if state is None:
                state = self._loops[loop] = _LoopClient(
                    asyncio.Semaphore(self.max_concurrency), asyncio.Lock())
        if state.client is None:
            async with state.ready:
                if state.client is None:
                    state.client = await self._new_client()
        return state

    async def _new_client(self) -> Any:
        config = AioConfig(
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            # One attempt per botocore call: the retry policy is ours (see _request).
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=self.max_concurrency,
        )
        session = self._session or shared_session()
        try:
            return await session.create_client(
                "s3", region_name=self.region or None, endpoint_url=self.endpoint_url or None,
                config=config).__aenter__()
        except BotoCoreError as exc:
            raise DatastoreError(f"cannot open an S3 client for s3://{self.bucket}: {exc}") from exc

    def _full(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def _url(self, full: str) -> str:
        return f"s3://{self.bucket}/{full}"


def _calling(method: str, args: Mapping[str, Any]) -> Callable[[Any, int], Awaitable[Any]]:
    """An attempt that calls one client method with fixed arguments."""
    def attempt(client: Any, _: int) -> Awaitable[Any]:
        result: Awaitable[Any] = getattr(client, method)(**args)
        return result

    return attempt


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return f"{_code(exc)} (HTTP {_status(exc)})"
    return f"{type(exc).__name__}: {exc}"


def _total_size(response: Mapping[str, Any], fallback: int) -> int:
    """The object's size from ``Content-Range: bytes a-b/TOTAL`` of a ranged GET."""
    content_range = response.get("ContentRange") or ""
    _, _, total = content_range.rpartition("/")
    return int(total) if total.isdigit() else fallback


def _slicer(data: bytes) -> Callable[[int, int], Awaitable[bytes]]:
    view = memoryview(data)

    async def read(start: int, length: int) -> bytes:
        return bytes(view[start:start + length])

    return read


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    pieces = []
    while length > 0:
        piece = os.pread(fd, length, offset)
        if not piece:
            raise OSError(f"file shrank while being uploaded (short read at {offset})")
        pieces.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(pieces)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _create_file(directory: str, tmp: str) -> int:
    os.makedirs(directory, exist_ok=True)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
