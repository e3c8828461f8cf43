"""Fixtures shared by the datastore tests: one ``store`` per object-store backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from millstream.datastore.local import LocalStore
from millstream.datastore.storage import ObjectStore


@asynccontextmanager
async def _local(tmp_path: Path) -> AsyncIterator[ObjectStore]:
    yield LocalStore(tmp_path / "store")


# Each backend is a factory from a scratch directory to a ready, empty store; an S3
# backend (a moto server and a fresh bucket) becomes one more entry here.
BACKENDS: dict[str, Callable[[Path], AbstractAsyncContextManager[ObjectStore]]] = {
    "local": _local,
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    """An empty object store, once per backend."""
    async with BACKENDS[request.param](tmp_path) as backend:
        yield backend
