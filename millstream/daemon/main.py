"""``millstream daemon``: the scheduler process, in the foreground.

``asyncio.run`` owns the loop; SIGTERM and SIGINT only set the stop event. Shutdown
is ordered and bounded: tell systemd ``STOPPING=1``, stop intake, stop watching
attempts (they keep running in their own sessions), write the last checkpoint, close
the socket, exit 0. A daemon started later takes the runs back.

Under systemd the socket comes from ``millstream.socket`` (socket activation) and
readiness is reported with ``READY=1`` once the socket serves; see
:mod:`millstream.daemon.systemd` and ``systemd/README.md``. Serving several users
(socket group, tasks as their owners, TCP with tokens) is
:mod:`millstream.daemon.sharedhost` and ``docs/shared-host.md``.

Logs are structlog events, one JSON object a line on stdout under systemd (where
journald records stdout; ``JOURNAL_STREAM`` or ``INVOCATION_ID`` is set), with
``daemon.log_format = "json"``, or whenever stdout is not a terminal; readable
console lines on a terminal. Events about a run carry ``run_id``, and those about an
attempt ``step`` and ``task`` too, bound through contextvars by the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import structlog
from aiohttp import web

from millstream.compute.base import ComputeBackend
from millstream.compute.local import LocalBackend
from millstream.compute.router import BackendRouter
from millstream.config.settings import Settings
from millstream.daemon import metrics, systemd
from millstream.daemon.api import make_app
from millstream.daemon.engine import Engine
from millstream.daemon.identity import Authority, load_tokens
from millstream.daemon.resources import ResourcePool, host_memory_mb
from millstream.daemon.sharedhost import SharedHost
from millstream.datastore.backends import close_store, describe_store, open_store
from millstream.errors import ConfigError
from millstream.metadata.backends import metadata_store


def wants_json(log_format: str, env: Mapping[str, str], isatty: bool) -> bool:
    """JSON when asked, under systemd (journald), or when nobody reads a terminal."""
    if log_format != "auto":
        return log_format == "json"
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID")) or not isatty


def configure_logging(log_format: str = "auto", env: Mapping[str, str] | None = None) -> None:
    """structlog to stdout: JSON lines (see :func:`wants_json`), else readable console lines."""
    as_json = wants_json(log_format, os.environ if env is None else env, sys.stdout.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )


def _socket_in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code.

    Under systemd (``millstream.socket`` + ``Type=notify``) the listening socket is
    inherited and readiness is reported; otherwise the daemon binds its own socket.
    ``environ`` (default ``os.environ``) loses the systemd variables once read.
    """
    log = structlog.get_logger("millstream.daemon")
    env = os.environ if environ is None else environ
    # Read first, before anything can start a child process.
    notifier = systemd.Notifier(env)
    inherited = systemd.unix_listener(systemd.listen_fds(env))
    shared = SharedHost.from_settings(settings)
    tokens = load_tokens(settings.daemon.tokens_file) if settings.daemon.tcp_listen else {}
    sock_path = settings.daemon.socket
    if inherited is not None:
        name = inherited.getsockname()
        sock_path = name if isinstance(name, str) and name else sock_path
    else:
        if _socket_in_use(sock_path):
            log.error("socket_in_use", socket=sock_path)
            return 1
        Path(sock_path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
    state_dir = Path(settings.daemon.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    shared.prepare_dirs(settings)
    # Everything a task process needs to open the same store (JSON; no credentials).
    datastore_config = dataclasses.asdict(settings.datastore)
    store = open_store(datastore_config)
    cores = os.cpu_count() or 1
    local = settings.local
    pool = ResourcePool(
        slots=local.max_slots or 4 * cores,
        cpus=local.max_cpus or float(cores),
        memory_mb=local.max_memory_mb or host_memory_mb(),
    )
    backend = LocalBackend(
        fork=local.fork,
        spool_dir=state_dir / "spool",
        zygote_idle_s=local.zygote_idle_s,
        run_as_owner=shared.run_as_owner,
    )
    batch: ComputeBackend | None = None
    if settings.datastore.type == "s3":
        # Imported here: aiobotocore is only needed where Batch can be used. Clients are
        # opened on first use, so a daemon whose runs never ask for @batch makes no call.
        from millstream.compute.batch import BatchBackend

        batch = BatchBackend(settings.batch, store=store, datastore_config=datastore_config)
    metadata = metadata_store(settings.metadata)
    await metadata.open()
    engine = Engine(
        store=store,
        backend=BackendRouter(backend, batch),
        datastore_config=datastore_config,
        state_dir=state_dir,
        daemon_id=settings.daemon.id,
        pool=pool,
        default_cpu=local.default_cpu,
        kill_grace_s=local.kill_grace_s,
        checkpoint_interval_s=settings.daemon.checkpoint_interval_s,
        metadata=metadata,
        heartbeat_interval_s=settings.metadata.heartbeat_interval_s,
        batch_queue=settings.batch.queue,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    app = make_app(
        engine,
        max_body_bytes=settings.daemon.max_body_mb << 20,
        authority=Authority(
            admin_group=settings.daemon.admin_group,
            daemon_uid=os.getuid(),
            runs_others_tasks=shared.run_as_owner or settings.daemon.run_tasks_as == "daemon",
        ),
        tokens=tokens,
    )
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=min(2.0, settings.daemon.shutdown_timeout_s)
    )
    await runner.setup()
    # TCP first: once the socket answers, the daemon serves on every listener.
    tcp_address = ""
    if settings.daemon.tcp_listen:
        host, port = parse_listen(settings.daemon.tcp_listen)
        tcp_site = web.TCPSite(runner, host, port)
        await tcp_site.start()
        tcp_address = tcp_site.name
    site: web.BaseSite
    if inherited is not None:
        # systemd made the socket (owner, group, SocketMode) and keeps a copy of it
        # open, so requests arriving during a restart wait in its backlog.
        site = web.SockSite(runner, inherited)
        await site.start()
    else:
        site = web.UnixSite(runner, sock_path)
        await site.start()
        shared.secure_socket(sock_path)
    probe = metrics.LoopLagProbe()
    probe.start(loop)
    log.info(
        "daemon_ready",
        socket=sock_path,
        pid=os.getpid(),
        datastore=describe_store(datastore_config),
        metadata=settings.metadata.url or settings.metadata.path,
        slots=pool.slots,
        cpus=pool.cpus,
        socket_activated=inherited is not None,
        socket_group=settings.daemon.socket_group or None,
        tasks_run_as="owner" if shared.run_as_owner else "daemon",
        tcp=tcp_address or None,
    )
    active = sum(1 for r in engine.runs.values() if not r.state.finished)
    notifier.ready(f"serving on {sock_path}; {active} active runs")
    if ready is not None:
        ready.set()

    async def retire_zygotes() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 30)
            await backend.retire_idle()

    retirer = asyncio.create_task(retire_zygotes())
    await stop.wait()
    log.info("daemon_stopping")
    notifier.stopping("stopping: writing the last checkpoint; attempts keep running")
    probe.stop()
    engine.accepting = False
    await engine.shutdown(settings.daemon.shutdown_timeout_s)
    retirer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await retirer
    await runner.cleanup()
    await metadata.close()
    await close_store(store)
    log.info("daemon_stopped")
    return 0


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of ``daemon.tcp_listen``."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"daemon.tcp_listen must be HOST:PORT, got {value!r}")
    return host, int(port)


def run_daemon(settings: Settings) -> int:
    """Entry point of ``millstream daemon``; 2 for a configuration it cannot serve with."""
    configure_logging(settings.daemon.log_format)
    try:
        return asyncio.run(serve(settings, environ=os.environ))
    except ConfigError as exc:
        structlog.get_logger("millstream.daemon").error("config_error", error=str(exc))
        print(f"millstream daemon: {exc}", file=sys.stderr)
        return 2
