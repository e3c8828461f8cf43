"""The host's local capacity: slots, cores and memory shared by every run."""

from __future__ import annotations

import asyncio
import os

from millstream.errors import SchedulerError


def host_memory_mb() -> int:
    """Physical memory of this host in MiB."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 20))


class ResourcePool:
    """Counts slots, cores and memory; ``acquire`` waits until a demand fits.

    A step with ``@resources(cpu=, memory=)`` reserves what it declares; a step without
    reserves ``default_cpu`` cores and no memory. The slot count caps the number of
    local processes whatever they declare.
    """

    def __init__(self, *, slots: int, cpus: float, memory_mb: int) -> None:
        self.slots = slots
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.used_slots = 0
        self.used_cpus = 0.0
        self.used_memory_mb = 0
        self._changed = asyncio.Condition()

    def check(self, cpu: float, memory_mb: int) -> None:
        """Raise if a demand can never fit on this host."""
        if cpu > self.cpus or memory_mb > self.memory_mb:
            raise SchedulerError(
                f"@resources(cpu={cpu:g}, memory={memory_mb}) exceeds this host "
                f"({self.cpus:g} cores, {self.memory_mb} MiB): lower it or run the step on Batch"
            )

    def _fits(self, cpu: float, memory_mb: int) -> bool:
        return (
            self.used_slots < self.slots
            and self.used_cpus + cpu <= self.cpus + 1e-9
            and self.used_memory_mb + memory_mb <= self.memory_mb
        )

    async def acquire(self, cpu: float, memory_mb: int) -> None:
        """Wait until the demand fits, then take it."""
        self.check(cpu, memory_mb)
        async with self._changed:
            await self._changed.wait_for(lambda: self._fits(cpu, memory_mb))
            self.used_slots += 1
            self.used_cpus += cpu
            self.used_memory_mb += memory_mb

    async def release(self, cpu: float, memory_mb: int) -> None:
        """Give a demand back."""
        async with self._changed:
            self.used_slots -= 1
            self.used_cpus -= cpu
            self.used_memory_mb -= memory_mb
            self._changed.notify_all()
