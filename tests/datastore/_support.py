"""Helpers for the datastore tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``predicate()`` is true, failing after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        # Polling is the point: the conditions are files and processes, not events.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
