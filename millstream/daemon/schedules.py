"""Schedules and triggers: runs started by the daemon itself.

A schedule is a saved submission (the body of ``POST /v1/runs``) plus when to start it:
a cron expression in a time zone (see :mod:`millstream.daemon.cron`) and/or the flows
whose successful runs trigger it (``@trigger_on_finish``). Schedules persist in the
datastore (``daemon/<id>/schedules/<name>.json``) and survive restarts.

Each scheduled instant and each triggering run has a deterministic run key, used as the
metadata store's ``request_id``: the run is created at most once however often the
daemon restarts between starting it and recording that it did. Instants missed while
the daemon was down follow the schedule's catch-up policy (``latest`` by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from millstream.daemon import cron
from millstream.datastore import layout
from millstream.datastore.storage import ObjectStore
from millstream.errors import SchedulerError

log = structlog.get_logger(__name__)

# The longest the loop sleeps, so a clock jump is noticed within it.
MAX_SLEEP_S = 30.0


@dataclass
class Schedule:
    """A saved submission and when to start it."""

    name: str
    flow: str
    owner: str
    owner_uid: int
    submission: dict[str, Any]
    cron: str | None = None
    timezone: str | None = None
    catchup: str = "latest"
    triggers: list[str] = field(default_factory=list)
    paused: bool = False
    created_at: float = 0.0
    last_fired: float | None = None  # the last instant fired (epoch seconds)
    fired: int = 0

    def next_fire(self, now: float) -> float | None:
        """When the cron part fires next (None without cron or while paused)."""
        if not self.cron or self.paused:
            return None
        after = datetime.fromtimestamp(max(now, self.last_fired or 0.0), UTC)
        return cron.next_instant(self.cron, self.timezone, after).timestamp()

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """JSON form; with ``now``, the next fire time too (the submission left out)."""
        data = asdict(self)
        if now is not None:
            data.pop("submission")
            data["next_fire"] = self.next_fire(now)
        return data


def run_key(schedule: Schedule, *, instant: datetime | None = None, trigger: str | None = None) -> str:
    """The deterministic key of the run a schedule starts for an instant or a triggering run."""
    if instant is not None:
        return f"schedule:{schedule.name}:{instant.astimezone(UTC).isoformat()}"
    return f"trigger:{schedule.name}:{trigger}"


def check_schedule(s: Schedule) -> None:
    """Raise SchedulerError for a schedule that can never work."""
    layout.check_flow(s.flow)
    if not s.name or not all(c.isalnum() or c in "_-." for c in s.name) or s.name.startswith("."):
        raise SchedulerError(f"schedule name {s.name!r} must be letters, digits, '_', '-' and '.'")
    if not s.cron and not s.triggers:
        raise SchedulerError(f"schedule {s.name!r} needs a cron expression or @trigger_on_finish flows")
    if s.cron:
        cron.validate(s.cron)
        cron.zone(s.timezone)
    if s.catchup not in cron.CATCHUP_POLICIES:
        raise SchedulerError(f"catch-up policy {s.catchup!r} is not one of {', '.join(cron.CATCHUP_POLICIES)}")
    for upstream in s.triggers:
        layout.check_flow(upstream.split("/")[-1])


Submit = Callable[[Schedule, str, dict[str, Any]], Awaitable[str | None]]


class ScheduleBook:
    """The daemon's schedules: persisted, fired on time, triggered by finished runs."""

    def __init__(
        self, store: ObjectStore, daemon_id: str, submit: Submit, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.prefix = f"daemon/{layout.check_daemon_id(daemon_id)}/schedules/"
        self.submit = submit
        self.clock = clock
        self.schedules: dict[str, Schedule] = {}
        self._changed = asyncio.Event()

    async def load(self) -> None:
        """Read every saved schedule."""
        for key in await self.store.list(self.prefix):
            try:
                data = json.loads(await self.store.get(key))
                self.schedules[data["name"]] = Schedule(**data)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("schedule_unreadable", key=key, error=str(exc))

    async def save(self, s: Schedule) -> None:
        """Persist one schedule."""
        await self.store.put(f"{self.prefix}{s.name}.json", json.dumps(asdict(s)).encode())

    async def put(self, s: Schedule) -> Schedule:
        """Create or replace a schedule (its firing history restarts from now)."""
        check_schedule(s)
        s.created_at = s.created_at or self.clock()
        s.last_fired = s.last_fired or s.created_at
        self.schedules[s.name] = s
        await self.save(s)
        self._changed.set()
        return s

    async def set_paused(self, name: str, paused: bool) -> Schedule:
        """Pause or resume; resuming does not fire what was missed while paused."""
        s = self.get(name)
        s.paused = paused
        if not paused:
            s.last_fired = max(s.last_fired or 0.0, self.clock())
        await self.save(s)
        self._changed.set()
        return s

    async def delete(self, name: str) -> None:
        """Forget a schedule."""
        self.get(name)
        del self.schedules[name]
        await self.store.delete(f"{self.prefix}{name}.json")
        self._changed.set()

    def get(self, name: str) -> Schedule:
        """One schedule, or SchedulerError."""
        if name not in self.schedules:
            raise SchedulerError(f"no schedule named {name!r}")
        return self.schedules[name]

    async def tick(self, now: float | None = None) -> list[tuple[str, str]]:
        """Fire what is due; returns ``(schedule, run key)`` of every run started."""
        now = self.clock() if now is None else now
        started = []
        for s in list(self.schedules.values()):
            if s.paused or not s.cron:
                continue
            last = datetime.fromtimestamp(s.last_fired or s.created_at, UTC)
            handled_until = now  # everything up to now is fired or skipped by the catch-up policy
            try:
                due = cron.due(s.cron, s.timezone, last, datetime.fromtimestamp(now, UTC), catchup=s.catchup)
            except Exception:
                log.exception("schedule_due_failed", schedule=s.name, cron=s.cron)
                continue
            for instant in due:
                key = run_key(s, instant=instant)
                try:
                    run_id = await self.submit(s, key, {"scheduled_at": instant.isoformat()})
                except Exception as exc:
                    # Try this instant again on the next tick; its key keeps it to one run.
                    log.warning("schedule_fire_failed", schedule=s.name, instant=instant.isoformat(), error=str(exc))
                    handled_until = instant.timestamp() - 1e-3
                    break
                if run_id is not None:
                    started.append((s.name, key))
                    s.fired += 1
            s.last_fired = handled_until
            await self.save(s)
        return started

    async def on_run_finished(self, flow: str, run_id: str, status: str) -> list[tuple[str, str]]:
        """Start the schedules that ``@trigger_on_finish`` this flow, if the run succeeded."""
        if status != "ok":
            return []
        started = []
        for s in list(self.schedules.values()):
            if s.paused or flow not in [t.split("/")[-1] for t in s.triggers]:
                continue
            key = run_key(s, trigger=f"{flow}/{run_id}")
            trigger = {"type": "run", "pathspec": f"{flow}/{run_id}", "flow": flow, "run_id": run_id}
            if await self.submit(s, key, {"trigger": trigger}) is not None:
                started.append((s.name, key))
                s.fired += 1
                await self.save(s)
        return started

    def _upcoming(self, now: float) -> list[float]:
        """Every schedule's next fire time; one whose cron cannot be computed is logged, not fatal."""
        times = []
        for schedule in list(self.schedules.values()):
            try:
                at = schedule.next_fire(now)
            except Exception:
                log.exception("schedule_next_fire_failed", schedule=schedule.name, cron=schedule.cron)
                continue
            if at is not None:
                times.append(at)
        return times

    async def run(self, stop: asyncio.Event) -> None:
        """Fire schedules on time until ``stop``."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("schedule_tick_failed")
            now = self.clock()
            upcoming = self._upcoming(now)
            pause = min([MAX_SLEEP_S, *[max(0.05, t - now) for t in upcoming]])
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                waiter = asyncio.ensure_future(self._changed.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({waiter, stopper}, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
