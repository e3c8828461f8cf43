"""The metadata service application: configuration, auth, error mapping, the TCP runner.

``make_app(config)`` builds the aiohttp application; its ``cleanup_ctx`` opens the
asyncpg pool and migrates the schema when the runner starts (retrying for
``startup_timeout_s`` while the database is not up yet, so a service and its database
may start in any order) and closes the pool last on shutdown.
:class:`MetadataService` runs it on an ``AppRunner`` + ``TCPSite`` (port 0 picks a free
port: tests embed it that way); :func:`run_service` serves until a stop event is set.

Every request but ``GET /v1/health`` needs ``Authorization: Bearer <key>`` with one of
the configured keys (compared in constant time); anything else is a 401. Failures are
JSON ``{"error": code, "message": ..., "retryable": bool}``:

=========================================  ======  =====================
what                                       status  error
=========================================  ======  =====================
malformed JSON, wrong types, bad names      400     bad_request, ...
missing or wrong key                        401     unauthorized
no such run or task / route                 404     not_found
wrong method                                405     method_not_allowed
contradicts what is stored                  409     conflict
body over ``max_body_bytes``                413     too_large
not JSON                                    415     unsupported_media_type
database down, restarting, overloaded       503     unavailable (retryable: true)
=========================================  ======  =====================

A 500 is a bug in the service; it is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from millstream.errors import ConfigError, MetadataConflict, MetadataError, MetadataNotFound
from millstream.metadata.service.db import PostgresMetadataStore
from millstream.metadata.service.handlers import STORE, ApiFailure, add_routes

API_KEYS_ENV = "MILLSTREAM_METADATA_API_KEYS"
PUBLIC_PATHS = frozenset({"/v1/health"})

log = structlog.get_logger("millstream.metadata.service")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs; built once by the entry point."""

    dsn: str
    api_keys: frozenset[str]
    host: str = "127.0.0.1"
    port: int = 8765
    dead_after_s: float = 120.0
    pool_max_size: int = 10
    max_body_bytes: int = 8 << 20
    startup_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    command_timeout_s: float = 10.0
    shutdown_timeout_s: float = 5.0


CONFIG = web.AppKey("config", ServiceConfig)


def parse_api_keys(lines: Iterable[str]) -> frozenset[str]:
    """Keys from text: one per line (commas also separate), blank lines and ``#`` comments skipped."""
    keys: set[str] = set()
    for line in lines:
        text = line.split("#", 1)[0]
        keys.update(k.strip() for k in text.split(",") if k.strip())
    return frozenset(keys)


def load_api_keys(path: str | Path | None, environ: Mapping[str, str]) -> frozenset[str]:
    """The API keys: from ``path`` if given, else from ``$MILLSTREAM_METADATA_API_KEYS``; at least one."""
    if path is not None:
        try:
            keys = parse_api_keys(Path(path).read_text(encoding="utf-8").splitlines())
        except OSError as exc:
            raise ConfigError(f"cannot read the API key file {path}: {exc.strerror}") from None
        where = str(path)
    else:
        keys = parse_api_keys(environ.get(API_KEYS_ENV, "").splitlines())
        where = f"${API_KEYS_ENV}"
    if not keys:
        raise ConfigError(f"no API key in {where}: give --api-key-file FILE (one key per line) or set {API_KEYS_ENV}")
    return keys


# --------------------------------------------------------------------- middlewares
def _error(status: int, code: str, message: str, *, retryable: bool = False,
           headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message, "retryable": retryable}, status=status,
                             headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}



@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to a JSON error; nothing escapes as a bare 500."""
    try:
        return await handler(request)
    except ApiFailure as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="millstream-metadata"'} if exc.status == 401 else None
        return _error(exc.status, exc.code, exc.message, headers=headers)
    except MetadataNotFound as exc:
        return _error(404, "not_found", str(exc))
    except MetadataConflict as exc:
        return _error(409, "conflict", str(exc))
    except MetadataError as exc:
        if exc.retryable:
            log.warning("database_unavailable", path=request.path, error=str(exc))
            return _error(503, "unavailable", str(exc), retryable=True, headers={"Retry-After": "1"})
        return _error(400, "rejected", str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, _HTTP_CODES.get(exc.status, "bad_request"), exc.reason)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug: say so, keep serving
        log.exception("request_failed", method=request.method, path=request.path)
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")


def auth_middleware(keys: frozenset[str]) -> Middleware:
    """Require ``Authorization: Bearer <key>`` on every path but the public ones."""
    encoded = [k.encode() for k in keys]

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            given = token.strip().encode()
            # Compare with every key, so the time taken says nothing about which one is close.
            matched = False
            for key in encoded:
                matched |= hmac.compare_digest(given, key)
            if scheme.lower() != "bearer" or not given or not matched:
                raise ApiFailure(401, "unauthorized", "send Authorization: Bearer <api key> with a valid key")
        return await handler(request)

    return check_key


# --------------------------------------------------------------------- the application
async def _database(app: web.Application) -> AsyncIterator[None]:
    """Open the pool and migrate (waiting for the database up to startup_timeout_s); close it last."""
    config, store = app[CONFIG], app[STORE]
    deadline = time.monotonic() + config.startup_timeout_s
    delay_s = 0.2
    while True:
        try:
            await store.open()
            break
        except MetadataError as exc:
            remaining_s = deadline - time.monotonic()
            if not exc.retryable or remaining_s <= 0:
                raise
            log.warning("database_not_ready", error=str(exc), retry_in_s=round(min(delay_s, remaining_s), 3))
            await asyncio.sleep(min(delay_s, remaining_s))
            delay_s = min(2 * delay_s, 5.0)
    log.info("database_ready", applied_migrations=store.applied_migrations)
    try:
        yield
    finally:
        await store.close()


def make_app(config: ServiceConfig, *, store: PostgresMetadataStore | None = None) -> web.Application:
    """The aiohttp application of the metadata service."""
    if not config.api_keys:
        raise ConfigError("the metadata service needs at least one API key")
    app = web.Application(middlewares=[errors_middleware, auth_middleware(config.api_keys)],
                          client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[STORE] = store or PostgresMetadataStore(
        config.dsn, dead_after_s=config.dead_after_s, pool_max_size=config.pool_max_size,
        connect_timeout_s=config.connect_timeout_s, command_timeout_s=config.command_timeout_s,
        acquire_timeout_s=config.connect_timeout_s)
    app.cleanup_ctx.append(_database)
    add_routes(app)
    return app


class MetadataService:
    """The service on an AppRunner + TCPSite: ``start()`` migrates and binds, ``stop()`` drains and closes."""

    def __init__(self, config: ServiceConfig, *, store: PostgresMetadataStore | None = None) -> None:
        self.config = config
        self.app = make_app(config, store=store)
        self._runner: web.AppRunner | None = None

    @property
    def store(self) -> PostgresMetadataStore:
        """The PostgreSQL store behind the handlers."""
        return self.app[STORE]

    @property
    def url(self) -> str:
        """``http://host:port`` the service listens on (the real port when configured with 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the service is not started")
        host, port = self._runner.addresses[0][:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self) -> str:
        """Open the database, bind the socket; returns the URL."""
        if self._runner is not None:
            return self.url
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.config.shutdown_timeout_s)
        try:
            await runner.setup()
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metadata_service_ready", url=self.url, dead_after_s=self.config.dead_after_s)
        return self.url

    async def stop(self) -> None:
        """Stop accepting, finish requests in flight (up to shutdown_timeout_s), close the pool. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("metadata_service_stopped")

    async def __aenter__(self) -> MetadataService:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


async def run_service(config: ServiceConfig, *, stop: asyncio.Event,
                      ready: Callable[[str], None] | None = None) -> int:
    """Serve until ``stop`` is set; returns the exit code (1 if the database never came up)."""
    service = MetadataService(config)
    try:
        url = await service.start()
    except MetadataError as exc:
        log.error("metadata_service_failed", error=str(exc))
        return 1
    try:
        if ready is not None:
            ready(url)
        await stop.wait()
    finally:
        await service.stop()
    return 0
