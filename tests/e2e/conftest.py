"""Daemons whose datastore is a local directory or an S3 bucket on the test moto server.

    daemon_on_store   a started daemon, once per datastore (``local``, ``s3``)
    s3_world          the S3 configuration of a fresh bucket; ``s3_world.daemon(...)``
                      makes (does not start) a daemon on it, optionally through the
                      fault proxy
    metadata_service  ``millstream metadata-service`` on a fresh PostgreSQL database; its URL
    s3_faults         the fault proxy (tests/aws/fault_proxy.py) in front of moto, reset
                      before and after the test

An S3 daemon's metadata store is SQLite in its state directory (the default for a
non-local datastore), so a daemon made with a fresh state directory is a clean host that
shares only the bucket.

moto is a test dependency: where it is missing the S3 cases are skipped, except under
``CI=true``, where they fail.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.metadata.service_fixture import service_process

_buckets = itertools.count()


def _moto() -> Any:
    try:
        import boto3  # noqa: F401 - the checks read the bucket with it
        import moto.server  # noqa: F401 - imported lazily by shared_moto

        from tests.aws.moto_server import shared_moto
    except ImportError as exc:  # moto or boto3 not installed
        if os.environ.get("CI") == "true":
            pytest.fail(f"the S3 end-to-end tests need moto under CI: {exc}")
        pytest.skip(f"moto is not installed: {exc}")
    return shared_moto()


@dataclass
class S3World:
    """A fresh bucket on the moto server and how daemons reach it."""

    factory: Callable[..., Daemon]
    bucket: str
    prefix: str
    moto_url: str

    def daemon(self, *, endpoint_url: str | None = None, **settings: str) -> Daemon:
        """A daemon (not started) with its datastore in this bucket, and its own state dir."""
        return self.factory(
            datastore_type="s3",
            datastore_bucket=self.bucket,
            datastore_prefix=self.prefix,
            datastore_endpoint_url=endpoint_url or self.moto_url,
            **settings,
        )


@pytest.fixture
def s3_world(daemon_factory: Callable[..., Daemon]) -> S3World:
    """A fresh, empty bucket (the moto server is reset first)."""
    moto = _moto()
    moto.reset()
    bucket = f"e2e-{os.getpid()}-{next(_buckets)}"
    moto.create_bucket(bucket)
    return S3World(daemon_factory, bucket, "ms/e2e", moto.url)


@pytest.fixture(scope="session")
def _fault_proxy_server() -> Iterator[Any]:
    from tests.aws.fault_proxy import FaultProxy

    proxy = FaultProxy(_moto().url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_faults(_fault_proxy_server: Any, s3_world: S3World) -> Iterator[Any]:
    """The fault proxy, forwarding everything, with zeroed counters."""
    _fault_proxy_server.reset()
    yield _fault_proxy_server
    _fault_proxy_server.reset()


@pytest.fixture(params=["local", "s3"])
def daemon_on_store(request: pytest.FixtureRequest, daemon_factory: Callable[..., Daemon]) -> Iterator[Daemon]:
    """A started daemon, once with a local datastore and once with an S3 one."""
    d = daemon_factory() if request.param == "local" else request.getfixturevalue("s3_world").daemon()
    d.start()
    yield d


@pytest.fixture
def metadata_service(tmp_path: Path) -> Iterator[str]:
    """`millstream metadata-service` as a subprocess on a fresh database; yields its URL."""
    with service_process(tmp_path) as url:
        yield url
