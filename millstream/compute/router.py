"""One ComputeBackend in front of several: each request and handle goes to its own.

A request with ``batch`` set goes to the Batch backend; a handle goes to the backend its
``"backend"`` key names (``"local"`` when the key is absent, as in handles checkpointed
before there was more than one backend). The engine holds a router and stays unaware of
which backend runs what.
"""

from __future__ import annotations

from typing import Any

from millstream.compute.base import ComputeBackend, ExitReason, LaunchRequest
from millstream.errors import ComputeError


class BackendRouter:
    """Routes launches by request and everything else by handle."""

    def __init__(self, local: ComputeBackend, batch: ComputeBackend | None = None) -> None:
        self.local = local
        self.batch = batch

    def _for_handle(self, handle: dict[str, Any]) -> ComputeBackend:
        name = handle.get("backend", "local")
        if name == "local":
            return self.local
        if name == "batch" and self.batch is not None:
            return self.batch
        raise ComputeError(f"no {name} backend is configured for the attempt {handle}", retryable=False)

    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Start the attempt on Batch when its step asks for it, else locally."""
        if request.batch is None:
            return await self.local.launch(request)
        if self.batch is None:
            raise ComputeError("the step asks for @batch but this daemon has no [batch] queue", retryable=False)
        return await self.batch.launch(request)

    async def wait(self, handle: dict[str, Any]) -> int | None:
        """Wait through the handle's backend."""
        return await self._for_handle(handle).wait(handle)

    def exit_reason(self, handle: dict[str, Any]) -> ExitReason | None:
        """Ask the handle's backend."""
        return self._for_handle(handle).exit_reason(handle)

    async def cancel(self, handle: dict[str, Any], *, grace_s: float) -> None:
        """Cancel through the handle's backend."""
        await self._for_handle(handle).cancel(handle, grace_s=grace_s)

    async def reattach(self, handle: dict[str, Any]) -> bool:
        """Re-attach through the handle's backend."""
        return await self._for_handle(handle).reattach(handle)

    async def close(self) -> None:
        """Close every backend."""
        try:
            await self.local.close()
        finally:
            if self.batch is not None:
                await self.batch.close()
