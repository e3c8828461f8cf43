"""Fixtures shared by the datastore tests: one ``store`` per object-store backend."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from millstream.datastore.local import LocalStore
from millstream.datastore.storage import ObjectStore


@asynccontextmanager
async def _local(tmp_path: Path) -> AsyncIterator[ObjectStore]:
    yield LocalStore(tmp_path / "store")


@asynccontextmanager
async def _s3(tmp_path: Path) -> AsyncIterator[ObjectStore]:
    # The moto server is the one tests/aws uses: started on first use, reset here.
    from millstream.datastore.retry import Backoff
    from millstream.datastore.s3 import S3Store
    from tests.aws.moto_server import shared_moto

    moto = shared_moto()
    moto.reset()
    moto.create_bucket("contract")
    # A prefix, so that every contract test also checks it never leaks into keys.
    store = S3Store("contract", "millstream/test", endpoint_url=moto.url,
                    backoff=Backoff(2, base_s=0.01, cap_s=0.05), session=_aws_session())
    async with store:
        yield store


@functools.cache
def _aws_session() -> Any:
    """One aiobotocore session for the module: each new one reloads botocore's models."""
    from aiobotocore.session import AioSession

    return AioSession()


# Each backend is a factory from a scratch directory to a ready, empty store.
BACKENDS: dict[str, Callable[[Path], AbstractAsyncContextManager[ObjectStore]]] = {
    "local": _local,
    "s3": _s3,
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    """An empty object store, once per backend."""
    async with BACKENDS[request.param](tmp_path) as backend:
        yield backend
