"""The ``store`` fixture: every contract test runs against each MetadataStore implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from millstream.metadata.sqlite import SqliteMetadataStore
from millstream.metadata.store import MetadataStore


@pytest.fixture(params=["sqlite", "service"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    """An open, empty store: the embedded SQLite one, or the HTTP client of a live metadata service.

    The contract tests pass ``now=`` instead of driving a clock, so that they work over
    HTTP too; they assume only that the store's ``dead_after_s`` is between a minute and a day.
    """
    if request.param == "sqlite":
        async with SqliteMetadataStore(tmp_path / "meta.db") as sqlite_store:
            yield sqlite_store
        return
    try:
        from tests.metadata.service_fixture import service_store
    except ModuleNotFoundError as exc:
        if exc.name != "tests.metadata.service_fixture":
            raise
        pytest.skip("service fixture not written yet")
    async with service_store(tmp_path) as service:
        yield service
