"""The daemon's metrics, served at ``GET /metrics`` in the Prometheus text format.

Two kinds, so the hot path pays nothing it does not need to:

- Most numbers already exist as plain counters on the components that own them
  (``Checkpointer.writes``, ``Recorder.written``/``dropped``/``backlog``,
  ``LocalBackend.launches_forked``/``launches_fresh``, the run table). An
  :class:`EngineCollector` reads them when Prometheus scrapes, and nothing else
  changes.
- What needs a distribution or has no owner object lives here as module-level
  ``prometheus_client`` instruments in :data:`REGISTRY`: the launch latency, the
  event-loop lag, and the AWS call counters. Adapters count with :func:`aws_call`,
  which only imports ``prometheus_client`` and nothing from the daemon.

Series (every name starts ``millstream_``):

==================================  =========  =============================================
``runs{state}``                     gauge      runs this daemon holds, by state
``attempts_running``                gauge      attempts launched and not yet finished
``attempts_queued``                 gauge      tasks ready to start, waiting for a worker or slot
``pool_slots_used`` / ``_total``    gauge      local process slots taken / available
``launch_latency_seconds``          histogram  a task picked as ready -> its attempt launched
``loop_lag_seconds``                histogram  how late a timer on the daemon's loop fired
``checkpoint_writes_total``         counter    run-state and index objects written
``metadata_writes_total``           counter    metadata writes applied
``metadata_writes_dropped_total``   counter    metadata writes given up on
``metadata_backlog``                gauge      metadata writes queued
``task_launches_total{via}``        counter    local launches: ``zygote`` (forked) or ``exec``
``aws_calls_total{service}``        counter    S3, Batch and CloudWatch Logs API calls
``aws_call_errors_total{service}``  counter    those that raised
==================================  =========  =============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from millstream.daemon.engine import Engine

__all__ = [
    "AWS_SERVICES",
    "CONTENT_TYPE_LATEST",
    "REGISTRY",
    "EngineCollector",
    "LoopLagProbe",
    "aws_call",
    "exposition",
    "observe_launch",
]

RUN_STATES = ("running", "failing", "cancelling", "ok", "failed", "cancelled")
AWS_SERVICES = ("s3", "batch", "logs")

# `_created` timestamps double the series for no use a dashboard has.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Module-level instruments: one set per process, whichever engine or app reports them.
REGISTRY = CollectorRegistry(auto_describe=True)

LAUNCH_LATENCY = Histogram(
    "millstream_launch_latency_seconds",
    "Time from a task being picked as ready to its attempt being launched (waits for slots included).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)
LOOP_LAG = Histogram(
    "millstream_loop_lag_seconds",
    "How late a periodic timer on the daemon's event loop fired: time the loop was blocked.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
AWS_CALLS = Counter(
    "millstream_aws_calls", "AWS API calls made by this process, by service.", ["service"], registry=REGISTRY
)
AWS_CALL_ERRORS = Counter(
    "millstream_aws_call_errors",
    "AWS API calls that failed (after the adapter's own retries), by service.",
    ["service"],
    registry=REGISTRY,
)
for _service in AWS_SERVICES:
    # Present at 0 from the start, so a dashboard's rate() has a series before the first call.
    AWS_CALLS.labels(_service)
    AWS_CALL_ERRORS.labels(_service)


def observe_launch(latency_s: float) -> None:
    """Record one ready -> launched latency."""
    LAUNCH_LATENCY.observe(max(0.0, latency_s))


@contextlib.contextmanager
def aws_call(service: str) -> Iterator[None]:
    """Count one AWS call of ``service`` (``s3``, ``batch``, ``logs``), and its failure if it raises.

    The S3, Batch and CloudWatch Logs adapters wrap each botocore call in this; it
    imports nothing from the daemon, so adapters may use it in task processes too.
    """
    AWS_CALLS.labels(service).inc()
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            AWS_CALL_ERRORS.labels(service).inc()
        raise


class LoopLagProbe:
    """Measures event-loop lag: a ``call_later`` chain that records how late each call fires.

    A loop blocked by synchronous work (a big checkpoint dump, a slow disk) delays
    every timer by the same amount, which is what this observes.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.last_lag_s = 0.0
        self.samples = 0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin probing on ``loop`` (idempotent)."""
        if self._handle is None:
            self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval_s
        self._handle = loop.call_at(self._due, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last_lag_s = max(0.0, loop.time() - self._due)
        self.samples += 1
        LOOP_LAG.observe(self.last_lag_s)
        self._schedule(loop)

    def stop(self) -> None:
        """Stop probing (idempotent)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class EngineCollector(Collector):
    """Reads the engine's own counters at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        """One family per series, read from the engine now."""
        from millstream.daemon import scheduler as sch

        engine = self.engine
        now = time.time()
        by_state = dict.fromkeys(RUN_STATES, 0)
        running = queued = 0
        for run in list(engine.runs.values()):
            state = run.state
            by_state[state.status] = by_state.get(state.status, 0) + 1
            if state.finished:
                continue
            queued += len(sch.ready_tasks(state, now))
            running += sum(1 for t in state.tasks.values() if t.attempts and t.attempts[-1].status == sch.RUNNING)
        runs = GaugeMetricFamily("millstream_runs", "Runs this daemon holds, by state.", labels=["state"])
        for state_name, count in by_state.items():
            runs.add_metric([state_name], count)
        yield runs
        yield GaugeMetricFamily(
            "millstream_attempts_running", "Task attempts launched and not yet finished.", value=running
        )
        yield GaugeMetricFamily(
            "millstream_attempts_queued", "Tasks ready to start, waiting for a worker or a slot.", value=queued
        )
        pool = engine.pool
        yield GaugeMetricFamily("millstream_pool_slots_used", "Local process slots taken.", value=pool.used_slots)
        yield GaugeMetricFamily("millstream_pool_slots_total", "Local process slots available.", value=pool.slots)
        yield CounterMetricFamily(
            "millstream_checkpoint_writes",
            "Run-state checkpoints and active-run indexes written to the datastore.",
            value=engine.checkpoints.writes,
        )
        recorder = engine.recorder
        yield CounterMetricFamily("millstream_metadata_writes", "Metadata writes applied.", value=recorder.written)
        yield CounterMetricFamily(
            "millstream_metadata_writes_dropped",
            "Metadata writes given up on (rejected, or unreachable at shutdown).",
            value=recorder.dropped,
        )
        yield GaugeMetricFamily("millstream_metadata_backlog", "Metadata writes queued.", value=recorder.backlog)
        launches = CounterMetricFamily(
            "millstream_task_launches", "Local task launches, by how they started.", labels=["via"]
        )
        backend: Any = engine.backend
        backend = getattr(backend, "local", backend)  # behind the router of local and Batch
        launches.add_metric(["zygote"], getattr(backend, "launches_forked", 0))
        launches.add_metric(["exec"], getattr(backend, "launches_fresh", 0))
        yield launches


class _Forward(Collector):
    """Collects another registry, so one scrape covers module-level and per-engine series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        """Everything the other registry has."""
        return self.registry.collect()


def engine_registry(engine: Engine) -> CollectorRegistry:
    """A registry with ``engine``'s series, the module-level ones and this process's CPU/memory/fds."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    registry.register(_Forward(REGISTRY))
    ProcessCollector(namespace="millstream", registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)
