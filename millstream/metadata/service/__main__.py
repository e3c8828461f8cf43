"""``python -m millstream.metadata.service --dsn ... --listen HOST:PORT --api-key-file FILE``.

``asyncio.run`` owns the loop; SIGTERM and SIGINT only set the stop event, after which
the service drains requests in flight and closes its pool. Exit codes: 0 after a
signal, 1 when the database never became reachable, 2 for a bad command line or
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

import structlog

from millstream.errors import ConfigError
from millstream.metadata.service.app import ServiceConfig, load_api_keys, run_service

DSN_ENV = "MILLSTREAM_METADATA_DSN"


def configure_logging() -> None:
    """structlog: JSON lines when not on a TTY (journald), readable on a terminal."""
    renderer = structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m millstream.metadata.service",
                                description="The millstream metadata service (HTTP + PostgreSQL).")
    p.add_argument("--dsn", help=f"postgresql://user@host:port/db (default: ${DSN_ENV})")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 8765), help="HOST:PORT (default 127.0.0.1:8765)")
    p.add_argument("--api-key-file", help="file with one API key per line (default: $MILLSTREAM_METADATA_API_KEYS)")
    p.add_argument("--dead-after-s", type=_positive, default=120.0,
                   help="a running run without a heartbeat for this long reads as failed (default 120)")
    p.add_argument("--pool-size", type=int, default=10, help="PostgreSQL connections at most (default 10)")
    p.add_argument("--max-body-mb", type=_positive, default=8.0, help="largest request body (default 8)")
    p.add_argument("--startup-timeout-s", type=_positive, default=30.0,
                   help="how long to wait for the database at start (default 30)")
    return p


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServiceConfig:
    """The service's configuration from the command line and the environment."""
    args = build_parser().parse_args(argv)
    dsn = args.dsn or environ.get(DSN_ENV)
    if not dsn:
        raise ConfigError(f"give --dsn postgresql://... or set ${DSN_ENV}")
    if args.pool_size < 1:
        raise ConfigError("--pool-size must be at least 1")
    host, port = args.listen
    return ServiceConfig(dsn=dsn, api_keys=load_api_keys(args.api_key_file, environ), host=host, port=port,
                         dead_after_s=args.dead_after_s, pool_max_size=args.pool_size,
                         max_body_bytes=int(args.max_body_mb * (1 << 20)), startup_timeout_s=args.startup_timeout_s)


async def _serve(config: ServiceConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await run_service(config, stop=stop)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point; ``millstream metadata-service`` calls this too."""
    configure_logging()
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ)
    except ConfigError as exc:
        structlog.get_logger("millstream.metadata.service").error("bad_configuration", error=str(exc))
        return 2
    return asyncio.run(_serve(config))


if __name__ == "__main__":
    sys.exit(main())
