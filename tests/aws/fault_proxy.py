"""A fault-injecting HTTP proxy in front of moto, for testing retries and failures.

The proxy forwards every request to its upstream unchanged (the signed ``Host`` header
included) and, for a chosen share of requests or for those matching a rule, does
something an S3 endpoint does on a bad day instead:

    slowdown        503 with S3's ``SlowDown`` error document
    internal        500 ``InternalError``
    deny            403 ``AccessDenied`` (a permanent error)
    reset           close the connection with a TCP RST before answering
    stall           answer nothing for ``stall_s`` seconds, then reset
    drop_response   forward the request (so it takes effect), then reset instead of
                    answering: the "lost response" case
    truncate        forward, send the headers and half the body, then reset

It runs on its own event loop in a background thread, so it serves synchronous code
(a subprocess task, a blocking client) as well as the test's loop. Configure it from
the test through :meth:`FaultProxy.configure` or, from another process, with
``POST /__fault__/config`` (the same fields as JSON); ``GET /__fault__/stats`` returns
the counters. Random choices come from a seeded ``random.Random``, so a run is
repeatable for the same sequence of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

FAULTS = ("slowdown", "internal", "deny", "reset", "stall", "drop_response", "truncate")
CONTROL = "/__fault__/"

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailers", "transfer-encoding", "upgrade", "content-length"})
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "deny": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class Rule:
    """Apply ``fault`` to requests matching every given pattern, ``times`` times (None: always)."""

    fault: str
    method: str | None = None
    path: str | None = None  # regex, searched in the path (/bucket/key)
    query: str | None = None  # regex, searched in the raw query string
    range: str | None = None  # regex, searched in the Range header
    times: int | None = None

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")

    def matches(self, method: str, path: str, query: str, range_: str) -> bool:
        """Whether this rule applies to the request (and has uses left)."""
        if self.times is not None and self.times <= 0:
            return False
        if self.method and self.method.upper() != method:
            return False
        if self.path and not re.search(self.path, path):
            return False
        if self.range and not re.search(self.range, range_):
            return False
        return not (self.query and not re.search(self.query, query))


@dataclass
class Seen:
    """One request the proxy handled and what it did with it."""

    method: str
    path: str
    query: str
    range: str  # the Range header, "" without one
    outcome: str  # "forwarded" or a fault name


@dataclass
class _Config:
    rate: float = 0.0
    faults: tuple[str, ...] = ("slowdown", "internal", "reset")
    stall_s: float = 2.0
    rules: list[Rule] = field(default_factory=list)


class FaultProxy:
    """The proxy; ``start()`` it, point clients at :attr:`url`, ``stop()`` it."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._config = _Config()
        self._rng = random.Random(seed)
        self.seen: list[Seen] = []
        self.counts: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    # -- control ----------------------------------------------------------------------

    def configure(self, *, rate: float | None = None, faults: tuple[str, ...] | list[str] | None = None,
                  stall_s: float | None = None, rules: list[Rule] | None = None,
                  seed: int | None = None) -> None:
        """Change what the proxy does from the next request on."""
        with self._lock:
            if rate is not None:
                if not 0 <= rate <= 1:
                    raise ValueError(f"rate must be in [0, 1], got {rate}")
                self._config.rate = rate
            if faults is not None:
                for fault in faults:
                    Rule(fault)  # validates the name
                self._config.faults = tuple(faults)
            if stall_s is not None:
                self._config.stall_s = stall_s
            if rules is not None:
                self._config.rules = list(rules)
            if seed is not None:
                self._rng = random.Random(seed)

    def reset(self, *, seed: int = 0) -> None:
        """Forward everything again and zero the counters."""
        with self._lock:
            self._config = _Config()
            self._rng = random.Random(seed)
            self.seen.clear()
            self.counts.clear()

    def requests_to(self, pattern: str, method: str | None = None) -> list[Seen]:
        """The requests whose path matched ``pattern`` (and method, if given)."""
        with self._lock:
            return [s for s in self.seen
                    if re.search(pattern, s.path) and (method is None or s.method == method)]

    def stats(self) -> dict[str, Any]:
        """Counters by outcome, plus the number of requests."""
        with self._lock:
            return {"requests": len(self.seen), **self.counts}

    def _choose(self, method: str, path: str, query: str, range_: str) -> str:
        with self._lock:
            for rule in self._config.rules:
                if rule.matches(method, path, query, range_):
                    if rule.times is not None:
                        rule.times -= 1
                    outcome = rule.fault
                    break
            else:
                config = self._config
                if config.rate and self._rng.random() < config.rate:
                    outcome = self._rng.choice(config.faults)
                else:
                    outcome = "forwarded"
            self.seen.append(Seen(method, path, query, range_, outcome))
            self.counts[outcome] += 1
            return outcome

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Serve on 127.0.0.1 (a free port) from a background thread."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        """Stop serving and end the thread."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    async def _start(self) -> None:
        self._session = ClientSession(auto_decompress=False, timeout=ClientTimeout(total=None),
                                      skip_auto_headers=("User-Agent", "Content-Type"))
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5,
                                     handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- serving ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(CONTROL):
            return await self._control(request)
        body = await request.read()
        outcome = self._choose(request.method, request.path, request.query_string,
                               request.headers.get("Range", ""))
        if outcome in _ERRORS:
            status, code, message = _ERRORS[outcome]
            return _error_response(status, code, message, request.method)
        if outcome == "reset":
            return _reset(request)
        if outcome == "stall":
            with self._lock:
                stall_s = self._config.stall_s
            await asyncio.sleep(stall_s)
            return _reset(request)
        status, headers, payload = await self._forward(request, body)
        if outcome == "drop_response":
            return _reset(request)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = int(headers.get("Content-Length", len(payload)))
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        if outcome == "truncate" and len(payload) > 1:
            await response.prepare(request)
            await response.write(payload[:len(payload) // 2])
            return _reset(request)
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload)
        await response.write_eof()
        return response

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        url = f"{self.upstream}{request.rel_url}"
        # BytesIO: aiohttp warns (an error under pytest) about big raw bytes bodies.
        async with self._session.request(request.method, url, headers=headers, data=io.BytesIO(body),
                                         allow_redirects=False) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            if "Content-Length" in upstream.headers:
                out["Content-Length"] = upstream.headers["Content-Length"]
            return upstream.status, out, payload

    async def _control(self, request: web.Request) -> web.Response:
        action = request.path[len(CONTROL):]
        if action == "stats" and request.method == "GET":
            with self._lock:
                seen = [asdict(s) for s in self.seen]
            return web.json_response({**self.stats(), "seen": seen})
        if action == "reset" and request.method == "POST":
            self.reset()
            return web.json_response({"ok": True})
        if action == "config" and request.method == "POST":
            data = await request.json()
            rules = data.pop("rules", None)
            self.configure(**data, rules=None if rules is None else [Rule(**r) for r in rules])
            return web.json_response({"ok": True})
        return web.json_response({"error": f"unknown control {request.method} {action}"}, status=404)


def _error_response(status: int, code: str, message: str, method: str) -> web.Response:
    if method == "HEAD":  # a HEAD error has no body: clients see only the status
        return web.Response(status=status)
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
           f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>")
    return web.Response(status=status, body=xml.encode(), content_type="application/xml")


class _Abandoned(web.StreamResponse):
    """What a handler returns after resetting its connection: aiohttp writes nothing."""

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _reset(request: web.Request) -> web.StreamResponse:
    """Close the client's connection with a TCP RST (SO_LINGER 0), not a clean FIN."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return _Abandoned()


def main() -> None:
    """``python -m tests.aws.fault_proxy UPSTREAM``: run a proxy by hand, print its URL."""
    import sys

    proxy = FaultProxy(sys.argv[1]).start()
    print(json.dumps({"url": proxy.url}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
