"""The async driver: runs, their attempts, checkpoints and recovery.

The decisions come from :mod:`millstream.daemon.scheduler` (pure); this module does
the I/O around them. Each run has one driver task that launches ready tasks under
the run's ``max_workers``; each attempt has one watcher task that takes a share of
the host's :class:`ResourcePool`, launches through the compute backend, waits, reads
the done marker, stores the logs and feeds the outcome back. All of them are owned
by the engine's task registry and awaited on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from millstream.compute.base import ComputeBackend, LaunchRequest
from millstream.daemon import metrics, resume
from millstream.daemon import scheduler as sch
from millstream.daemon.checkpoint import Checkpointer, clones_key, dumps, run_record_key, summary_key
from millstream.daemon.events import EventLog
from millstream.daemon.logs import LogTailer
from millstream.daemon.recorder import Recorder, record_attempt, record_clone, record_tasks
from millstream.daemon.resources import ResourcePool
from millstream.daemon.schedules import Schedule as ScheduleDef
from millstream.daemon.schedules import ScheduleBook
from millstream.datastore import layout
from millstream.datastore.package import extract_package, fetch_package
from millstream.datastore.records import AttemptKey, list_attempts, read_done, read_started
from millstream.datastore.storage import ObjectStore
from millstream.errors import ComputeError, DatastoreError, NotFound, SchedulerError
from millstream.metadata.store import MetadataStore
from millstream.task.spec import EXIT_INFRA_FAILURE, EXIT_NO_RETRY, ParentRef, TaskSpec

log = structlog.get_logger(__name__)
# Log context: every event about a run carries ``run`` (its pathspec), and every event
# about an attempt ``step`` and ``task`` too. They are bound through contextvars at the
# top of the asyncio task that drives the run or the attempt (each task has its own
# copy of the context), or around the call where one task touches several.
bind_log = structlog.contextvars.bind_contextvars
bound_log = structlog.contextvars.bound_contextvars

# After a timeout the attempt's process group gets this long to die of SIGALRM
# (which lets @catch and the done marker happen) before it is killed.
TIMEOUT_GRACE_S = 5.0
# How often logs of running attempts are copied to a shared (non-local) datastore.
LOG_UPLOAD_INTERVAL_S = 5.0


@dataclass
class Run:
    """One run the daemon drives: its submission, state and live bits."""

    flow: str
    run_id: str
    owner: str
    owner_uid: int
    graph: dict[str, Any]
    params: dict[str, Any]
    package: str
    module_file: str
    class_name: str
    python: str
    env: dict[str, str]
    options: dict[str, Any]
    created_at: float
    state: sch.RunState
    finished_at: float | None = None
    recovered: bool = False
    events: EventLog = field(default_factory=EventLog)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    package_dir: str = ""

    @property
    def key(self) -> str:
        """``flow/run_id``."""
        return f"{self.flow}/{self.run_id}"

    def record(self) -> dict[str, Any]:
        """The submission as stored in the datastore."""
        return {
            k: getattr(self, k)
            for k in (
                "flow",
                "run_id",
                "owner",
                "owner_uid",
                "graph",
                "params",
                "package",
                "module_file",
                "class_name",
                "python",
                "env",
                "options",
                "created_at",
            )
        }

    def summary(self) -> dict[str, Any]:
        """The one-line view: ``runs`` lists these."""
        status = self.state.status
        if status in ("failing", "cancelling"):
            status = "running"
        return {
            "flow": self.flow,
            "run_id": self.run_id,
            "status": status,
            "owner": self.owner,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "message": self.state.message,
            "tags": list(self.options.get("tags", [])),
            "origin_run_id": self.options.get("origin_run_id"),
        }


class AlreadySubmitted(SchedulerError):
    """A submission with this request id already started its run."""

    def __init__(self, flow: str, run_id: str) -> None:
        super().__init__(f"run {flow}/{run_id} was already started for this request")
        self.run_id = run_id


class Engine:
    """Holds every run of this daemon and drives each to its end."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        backend: ComputeBackend,
        datastore_config: dict[str, Any],
        state_dir: Path,
        daemon_id: str,
        pool: ResourcePool,
        default_cpu: float = 0.5,
        kill_grace_s: float = 5.0,
        checkpoint_interval_s: float = 0.05,
        metadata: MetadataStore,
        heartbeat_interval_s: float = 30.0,
        batch_queue: str = "",
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.recorder = Recorder(metadata)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.backend = backend
        self.datastore_config = datastore_config
        self.state_dir = state_dir
        self.daemon_id = daemon_id
        self.pool = pool
        self.default_cpu = default_cpu
        self.kill_grace_s = kill_grace_s
        self.batch_queue = batch_queue
        self.runs: dict[str, Run] = {}
        self.accepting = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._package_locks: dict[str, asyncio.Lock] = {}
        self.stop = asyncio.Event()
        self.checkpoints = Checkpointer(
            store, daemon_id, self._snapshot, self._active, interval_s=checkpoint_interval_s
        )
        self.tailer = LogTailer()
        self.schedules = ScheduleBook(store, daemon_id, self._submit_scheduled)

    # ----------------------------------------------------------------- task ownership
    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_crashed", task=task.get_name(), error=repr(task.exception()), exc_info=task.exception())

    async def start(self) -> None:
        """Load what the datastore knows, recover unfinished runs, start background work."""
        self._spawn(self.checkpoints.run(self.stop), "checkpointer")
        self._spawn(self.tailer.run(self.stop), "log-tailer")
        self._spawn(self.recorder.run(self.stop), "metadata-recorder")
        if self.datastore_config.get("type", "local") != "local":
            # Logs of running attempts reach a shared datastore while they run, so
            # `logs --follow` works from another machine; the final copy comes at the end.
            self._spawn(self._upload_running_logs(self.stop), "log-uploader")
        self._spawn(self.recorder.heartbeats(self._active, self.heartbeat_interval_s, self.stop), "heartbeats")
        await self._recover()
        await self.schedules.load()
        self._spawn(self.schedules.run(self.stop), "schedules")

    async def shutdown(self, deadline_s: float = 5.0) -> None:
        """Stop intake, stop watching (attempts keep running), write the last checkpoint."""
        self.accepting = False
        for run in self.runs.values():
            run.events.close()
            for t in list(run.inflight.values()):
                t.cancel()
        drivers = [t for t in self._tasks if t.get_name().startswith(("drive-", "attempt-"))]
        for t in drivers:
            t.cancel()
        if drivers:
            await asyncio.wait(drivers, timeout=deadline_s)
        await self.recorder.drain(min(3.0, deadline_s))
        self.stop.set()
        rest = list(self._tasks)
        if rest:
            await asyncio.wait(rest, timeout=deadline_s)
        with contextlib.suppress(Exception):
            await self.checkpoints.flush()
        await self.backend.close()

    # ----------------------------------------------------------------- checkpoints
    def _snapshot(self, run_key: str) -> tuple[str, str, dict[str, Any]] | None:
        run = self.runs.get(run_key)
        if run is None:
            return None
        return run.flow, run.run_id, run.state.to_dict()

    def _active(self) -> list[list[str]]:
        return [[r.flow, r.run_id] for r in self.runs.values() if not r.state.finished]

    async def _write_summary(self, run: Run) -> None:
        await self.store.put(summary_key(self.daemon_id, run.flow, run.run_id), dumps(run.summary()))

    # ----------------------------------------------------------------- submission
    async def allocate_run_id(
        self,
        flow: str,
        owner: str,
        *,
        params: dict[str, Any],
        tags: list[str],
        origin_run_id: str | None,
        request_id: str | None,
    ) -> str:
        """The next run id of a flow, from the metadata store (monotonic, never shared), then
        claimed in the datastore with put-if-absent, so two stores can never hand out one id."""
        record = await self.metadata.create_run(
            flow,
            user=owner,
            params=params,
            tags=tags,
            system_tags=[f"user:{owner}", "runtime:millstream"],
            daemon_id=self.daemon_id,
            origin_run_id=origin_run_id,
            request_id=request_id,
        )
        claim = f"{layout.run_prefix(flow, record.run_id)}_run/claim.json"
        if not await self.store.put_if_absent(
            claim, dumps({"daemon": self.daemon_id, "owner": owner, "at": time.time()})
        ):
            if request_id is not None:
                raise AlreadySubmitted(flow, record.run_id)
            raise SchedulerError(
                f"run {flow}/{record.run_id} already exists in the datastore: this daemon's "
                "metadata store is not the one that datastore was used with"
            )
        return record.run_id

    async def submit(self, body: dict[str, Any], *, owner: str, owner_uid: int) -> Run:
        """Accept a validated submission and start driving it."""
        if not self.accepting:
            raise SchedulerError("the daemon is shutting down")
        graph = body["graph"]
        self._check_resources(graph)
        try:
            await self.store.get(layout.package_key(body["package"]))
        except NotFound:
            raise SchedulerError(f"code package {body['package']} was not uploaded") from None
        flow = body["flow"]
        options = dict(body.get("options", {}))
        params = body.get("params", {})
        plan = None
        if options.get("resume") is not None:
            plan, params = await self._plan_resume(flow, graph, options, owner)
            options["origin_run_id"] = plan["run_id"]
        run_id = await self.allocate_run_id(
            flow,
            owner,
            params=params,
            tags=list(options.get("tags", [])),
            origin_run_id=plan["run_id"] if plan else None,
            request_id=body.get("request_id"),
        )
        state = sch.initial_state(flow, run_id, max_num_splits=int(options.get("max_num_splits", 100)))
        state.origin = plan
        run = Run(
            flow=flow,
            run_id=run_id,
            owner=owner,
            owner_uid=owner_uid,
            graph=graph,
            params=params,
            package=body["package"],
            module_file=body["module_file"],
            class_name=body["class_name"],
            python=body.get("python") or sys.executable,
            env=dict(body.get("env") or {}),
            options=options,
            created_at=time.time(),
            state=state,
        )
        await self.store.put(run_record_key(flow, run_id), dumps(run.record()))
        await self.store.put(layout.params_key(flow, run_id), dumps(run.params))
        self.runs[run.key] = run
        await self._write_summary(run)
        self.checkpoints.mark(run.key, index=True)
        run.events.emit("run_started", flow=flow, run_id=run_id)
        self._record_tasks(run, ["start/0"])
        with bound_log(run=run.key):
            log.info("run_submitted", owner=owner, steps=len(graph["steps"]))
        self._spawn(self._drive(run), f"drive-{run.key}")
        return run

    async def _plan_resume(
        self, flow: str, graph: dict[str, Any], options: dict[str, Any], owner: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        import json

        spec = options["resume"] if isinstance(options["resume"], dict) else {}
        origin_id = spec.get("origin_run_id")
        if origin_id is None:
            # As Metaflow: without an id, the latest run in the user's own namespace.
            latest = await self.metadata.list_runs(flow=flow, user=owner, limit=1)
            if not latest.items:
                raise SchedulerError(f"{owner} has no run of {flow} to resume: run it first")
            origin_id = latest.items[0].run_id
        origin_id = layout.check_run_id(str(origin_id))
        live = self.runs.get(f"{flow}/{origin_id}")
        if live is not None and not live.state.finished:
            raise SchedulerError(f"run {flow}/{origin_id} is still running; cancel it or wait before resuming")
        if live is not None:
            # The origin just ended here: its last checkpoint may still be coalescing,
            # and a stale one would make the resume re-run tasks that succeeded.
            await self.checkpoints.flush()
        try:
            record = json.loads(await self.store.get(run_record_key(flow, origin_id)))
            origin_state = json.loads(await self.store.get(layout.checkpoint_key(flow, origin_id)))
        except NotFound:
            raise SchedulerError(f"no run {flow}/{origin_id} to resume in this datastore") from None
        plan = resume.plan_resume(record["graph"], origin_state, graph, origin_run_id=origin_id, step=spec.get("step"))
        return plan, record.get("params", {})

    async def _clone(self, run: Run, clones: list[tuple[sch.Task, int]]) -> None:
        """Record ready tasks as cloned from the origin run: one index write, no process, no copy."""
        origin = run.state.origin or {}
        now = time.time()
        index = origin.setdefault("index", {})
        for task, attempt in clones:
            index[task.key] = {"run_id": origin["tasks"][task.key]["run_id"], "attempt": attempt}
        await self.store.put(clones_key(run.flow, run.run_id), dumps(index))
        for task, attempt in clones:
            decisions = resume.task_cloned(run.graph, run.state, task.key, attempt, now)
            origin_pathspec = str((task.attempts[-1].handle or {})["cloned_from"])
            run.events.emit("task_cloned", pathspec=f"{run.key}/{task.key}", origin=origin_pathspec)
            self._record_clone(run, task, origin_pathspec)
            self._apply(run, decisions)
        self.checkpoints.mark(run.key)

    async def _submit_scheduled(self, schedule: ScheduleDef, key: str, extra: dict[str, Any]) -> str | None:
        """Start a schedule's run for one instant or trigger; None if its key already started one."""
        body = dict(schedule.submission)
        options = dict(body.get("options") or {})
        options.update(extra, production=True)
        options["tags"] = [*options.get("tags", []), f"schedule:{schedule.name}"]
        body.update(options=options, request_id=key)
        try:
            run = await self.submit(body, owner=schedule.owner, owner_uid=schedule.owner_uid)
        except AlreadySubmitted:
            return None
        log.info("schedule_fired", schedule=schedule.name, run=run.key, key=key)
        return run.run_id

    def _check_resources(self, graph: dict[str, Any]) -> None:
        for name in graph["steps"]:
            batch = sch._decorator(graph, name, "batch")
            if batch is None:
                cpu, memory = self._demand(graph, name)
                self.pool.check(cpu, memory)
                continue
            if self.datastore_config.get("type") != "s3":
                raise SchedulerError(
                    f"step {name} has @batch, which needs the S3 datastore (datastore.type = \"s3\"); "
                    f"this daemon's datastore is {self.datastore_config.get('type', 'local')!r}"
                )
            if not (batch.get("queue") or self.batch_queue):
                raise SchedulerError(f"step {name} has @batch but no job queue: set [batch] queue or @batch(queue=)")

    def _demand(self, graph: dict[str, Any], step: str) -> tuple[float, int]:
        res = sch._decorator(graph, step, "resources")
        if res is None:
            return self.default_cpu, 0
        return float(res.get("cpu") or self.default_cpu), int(res.get("memory") or 0)

    def cancel(self, run: Run, message: str = "cancelled by user") -> bool:
        """Cancel a run; False if it had already ended."""
        if run.state.status != sch.RUNNING:
            return False
        self._apply(run, sch.cancel_run(run.state, message))
        return True

    # ----------------------------------------------------------------- driving
    async def _package_dir(self, run: Run) -> str:
        target = self.state_dir / "packages" / run.package
        if target.is_dir():
            return str(target)
        lock = self._package_locks.setdefault(run.package, asyncio.Lock())
        async with lock:
            if not target.is_dir():
                data = await fetch_package(self.store, run.package)
                tmp = target.with_name(f".tmp-{run.package}-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                await asyncio.to_thread(extract_package, data, tmp)
                os.replace(tmp, target)
        return str(target)

    async def _drive(self, run: Run) -> None:
        bind_log(run=run.key)
        try:
            run.package_dir = await self._package_dir(run)
        except (DatastoreError, OSError) as exc:
            run.state.status = sch.FAILED
            run.state.message = f"cannot unpack the code package: {exc}"
            self._finish(run)
            return
        max_workers = int(run.options.get("max_workers", 16))
        while not run.state.finished:
            run.wake.clear()
            now = time.time()
            clones: list[tuple[sch.Task, int]] = []
            local = self._local_inflight(run)
            for task in sch.ready_tasks(run.state, now):
                if run.state.origin is not None and task.key not in run.inflight:
                    source = resume.clone_source(run.state, task)
                    if source is not None:
                        clones.append((task, source))
                        continue
                if task.key in run.inflight:
                    continue
                # --max-workers bounds this host's processes; a Batch queue bounds its own jobs,
                # and all splits of a foreach on Batch start together, as one array job.
                if not self._on_batch(run, task.step):
                    if local >= max_workers:
                        continue
                    local += 1
                run.inflight[task.key] = self._spawn(self._attempt(run, task.key), f"attempt-{run.key}/{task.key}")
            if clones:
                await self._clone(run, clones)
                continue
            # Wake for a retry's not_before only while it is in the future: a ready task
            # waiting for a free worker is woken by the attempt that frees one.
            wakeup = sch.next_wakeup(run.state)
            timeout = wakeup - time.time() if wakeup and wakeup > time.time() else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.wake.wait(), timeout)
        while run.inflight:
            await asyncio.wait(list(run.inflight.values()))

    @staticmethod
    def _on_batch(run: Run, step: str) -> bool:
        return sch._decorator(run.graph, step, "batch") is not None

    def _local_inflight(self, run: Run) -> int:
        return sum(1 for key in run.inflight if not self._on_batch(run, run.state.tasks[key].step))

    def _spec(self, run: Run, task: sch.Task, number: int) -> TaskSpec:
        parents = []
        for step, task_id in task.parents:
            parent = run.state.tasks[sch.task_key(step, task_id)]
            cloned = resume.clone_ref(run.state, parent)
            if cloned is not None:
                parents.append(ParentRef(step=step, task=task_id, attempt=cloned[1], run_id=cloned[0]))
            else:
                parents.append(ParentRef(step=step, task=task_id, attempt=parent.ok_attempt or 0))
        return TaskSpec(
            flow=run.flow,
            run_id=run.run_id,
            step=task.step,
            task_id=task.task_id,
            attempt=number,
            package_dir=run.package_dir,
            module_file=run.module_file,
            class_name=run.class_name,
            datastore=self.datastore_config,
            params=run.params,
            node=run.graph["steps"][task.step],
            parents=parents,
            split_index=task.split_index,
            max_user_retries=sch.max_user_retries(run.graph, task.step),
            tags=list(run.options.get("tags", [])),
            username=run.owner,
            origin_run_id=run.options.get("origin_run_id"),
            is_production=bool(run.options.get("production")),
            trigger=run.options.get("trigger"),
        )

    def _log_paths(self, run: Run, key: AttemptKey) -> tuple[str, str]:
        base = self.state_dir / "logs" / run.flow / run.run_id / key.step / key.task
        return str(base / f"{key.attempt}.stdout"), str(base / f"{key.attempt}.stderr")

    def _timeout_s(self, run: Run, step: str) -> float | None:
        t = sch._decorator(run.graph, step, "timeout")
        if not t:
            return None
        return float(t["seconds"] + 60 * t["minutes"] + 3600 * t["hours"])

    def _array(self, run: Run, task: sch.Task, number: int) -> tuple[str | None, int]:
        """The array-job group of a foreach split's first attempt on Batch, and its size."""
        if number != 0 or task.split_index is None:
            return None, 0
        siblings = sum(1 for t in run.state.tasks.values() if t.step == task.step and t.parents == task.parents)
        parents = ",".join(f"{s}/{t}" for s, t in task.parents)
        return f"{run.key}/{task.step}/{parents}", siblings

    async def _attempt(self, run: Run, key: str) -> None:
        task = run.state.tasks[key]
        bind_log(run=run.key, step=task.step, task=task.task_id)
        cpu, memory = self._demand(run.graph, task.step)
        batch = sch._decorator(run.graph, task.step, "batch")
        # A Batch attempt runs elsewhere: it takes no share of this host.
        pool_cpu, pool_memory = (0.0, 0) if batch is not None else (cpu, memory)
        picked_at = time.monotonic()
        try:
            if run.recovered and await self._adopt_attempts(run, task):
                return
            await self._acquire(batch, pool_cpu, pool_memory)
            try:
                if run.state.status != sch.RUNNING or task.status != sch.PENDING:
                    return
                number = len(task.attempts)
                array_key, array_size = self._array(run, task, number) if batch is not None else (None, 0)
                akey = AttemptKey(run.flow, run.run_id, task.step, task.task_id, number)
                out, err = self._log_paths(run, akey)
                request = LaunchRequest(
                    spec=self._spec(run, task, number),
                    stdout_path=out,
                    stderr_path=err,
                    python=run.python,
                    env=run.env,
                    cwd=run.options.get("cwd"),
                    cpu=cpu,
                    memory_mb=memory,
                    timeout_s=self._timeout_s(run, task.step),
                    owner_uid=run.owner_uid,
                    gpu=int((sch._decorator(run.graph, task.step, "resources") or {}).get("gpu") or 0),
                    package=run.package,
                    batch=batch,
                    array_key=array_key,
                    array_size=array_size,
                )
                try:
                    handle = await self.backend.launch(request)
                except Exception as exc:
                    # A backend's own failure (ComputeError) says whether a retry can help;
                    # anything else is a bug or an OS error: an infrastructure failure, retried.
                    retryable = exc.retryable if isinstance(exc, ComputeError) else True
                    if not isinstance(exc, ComputeError):
                        log.exception("launch_failed", pathspec=f"{run.key}/{task.key}", attempt=number)
                    sch.attempt_started(run.state, key, None, time.time())
                    code = EXIT_INFRA_FAILURE if retryable else EXIT_NO_RETRY
                    self._finished(run, task, number, code, None, f"cannot launch the attempt: {exc}")
                    return
                attempt = sch.attempt_started(run.state, key, handle, time.time())
                metrics.observe_launch(time.monotonic() - picked_at)
                self._started(run, task, attempt)
                await self._watch(run, task, attempt, request.timeout_s)
            finally:
                if batch is None:
                    await self.pool.release(pool_cpu, pool_memory)
        finally:
            if run.inflight.get(key) is asyncio.current_task():
                del run.inflight[key]
            run.wake.set()

    async def _acquire(self, batch: dict[str, Any] | None, cpu: float, memory: int) -> None:
        if batch is None:
            await self.pool.acquire(cpu, memory)

    def _started(self, run: Run, task: sch.Task, attempt: sch.Attempt) -> None:
        pathspec = f"{run.key}/{task.key}"
        handle = attempt.handle or {}
        run.events.emit(
            "task_started",
            pathspec=pathspec,
            step=task.step,
            task_id=task.task_id,
            attempt=attempt.number,
            pid=handle.get("pid"),
            job_id=handle.get("job_id"),
        )
        log.info("attempt_started", attempt=attempt.number, pid=handle.get("pid"), via=handle.get("via"))
        out, err = self._log_paths(run, AttemptKey(run.flow, run.run_id, task.step, task.task_id, attempt.number))
        self.tailer.watch((run.key, task.key, attempt.number), run.events, pathspec, attempt.number, out, err)
        self._record_attempt(run, task, attempt)
        self.checkpoints.mark(run.key)

    async def _watch(self, run: Run, task: sch.Task, attempt: sch.Attempt, timeout_s: float | None) -> None:
        handle = attempt.handle or {}
        message = None
        timed_out = False
        waiter = asyncio.ensure_future(self.backend.wait(handle))
        try:
            if timeout_s:
                remaining = timeout_s + TIMEOUT_GRACE_S - (time.time() - (attempt.started_at or time.time()))
                done, _ = await asyncio.wait({waiter}, timeout=max(0.0, remaining))
                if not done:
                    timed_out = True
                    message = f"timed out after {timeout_s:g} s (@timeout); the process group was killed"
                    await self.backend.cancel(handle, grace_s=0)
            code = await waiter
        except asyncio.CancelledError:
            waiter.cancel()
            raise
        akey = AttemptKey(run.flow, run.run_id, task.step, task.task_id, attempt.number)
        done_record = await read_done(self.store, akey)
        if code is None:
            code = int(done_record.get("exit_code", 0)) if done_record else -9
        reason = self.backend.exit_reason(handle)
        await self.tailer.finish((run.key, task.key, attempt.number))
        await self._store_logs(run, akey)
        # The done marker tells a step's own failure best; the backend's account is for the
        # ends the task could not record (killed for memory, host lost, never started).
        if reason is not None and not timed_out and (done_record is None or reason.kind is not None):
            self._finished(run, task, attempt.number, code, done_record, reason.message, decided_kind=reason.kind)
            return
        self._finished(run, task, attempt.number, code, done_record, message, kind="user" if timed_out else None)

    async def _upload_running_logs(self, stop: asyncio.Event, interval_s: float = LOG_UPLOAD_INTERVAL_S) -> None:
        sizes: dict[str, int] = {}
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            for run in list(self.runs.values()):
                for task in list(run.state.tasks.values()):
                    if not task.attempts or task.attempts[-1].status != sch.RUNNING:
                        continue
                    akey = AttemptKey(run.flow, run.run_id, task.step, task.task_id, task.attempts[-1].number)
                    for path, key in zip(self._log_paths(run, akey), (akey.stdout_key, akey.stderr_key), strict=True):
                        try:
                            size = os.path.getsize(path)
                            if size and sizes.get(key) != size:
                                await self.store.put_file(key, Path(path))
                                sizes[key] = size
                        except (OSError, DatastoreError) as exc:
                            log.info("log_upload_skipped", key=key, error=str(exc))

    async def _store_logs(self, run: Run, akey: AttemptKey) -> None:
        for path, key in zip(self._log_paths(run, akey), (akey.stdout_key, akey.stderr_key), strict=False):
            try:
                if os.path.getsize(path) > 0:
                    await self.store.put_file(key, Path(path))
            except FileNotFoundError:
                continue
            except DatastoreError as exc:
                log.warning("log_store_failed", key=key, error=str(exc))

    def _finished(
        self,
        run: Run,
        task: sch.Task,
        number: int,
        code: int,
        done: dict[str, Any] | None,
        message: str | None,
        kind: str | None = None,
        decided_kind: str | None = None,
    ) -> None:
        decisions = sch.attempt_finished(
            run.graph,
            run.state,
            task.key,
            number,
            exit_code=code,
            done=done,
            now=time.time(),
            message=message,
            kind=decided_kind,
        )
        attempt = task.attempts[number]
        if kind and attempt.status == sch.FAILED:
            attempt.kind = kind
        run.events.emit(
            "task_finished",
            pathspec=f"{run.key}/{task.key}",
            attempt=number,
            status=attempt.status,
            exit_code=code,
            message=attempt.message if attempt.status != sch.OK else None,
            retrying=task.status == sch.PENDING,
        )
        log.info("attempt_finished", attempt=number, status=attempt.status, exit_code=code,
                 retrying=task.status == sch.PENDING)
        self._record_attempt(run, task, attempt, done)
        self._apply(run, decisions)

    def _apply(self, run: Run, decisions: sch.Decisions) -> None:
        if decisions.new_tasks:
            self._record_tasks(run, decisions.new_tasks)
        for key, number in decisions.cancel:
            handle = run.state.tasks[key].attempts[number].handle
            if handle:
                self._spawn(self.backend.cancel(handle, grace_s=self.kill_grace_s), f"cancel-{run.key}/{key}")
        if decisions.finished:
            self._finish(run)
        else:
            self.checkpoints.mark(run.key)
        run.wake.set()

    def _finish(self, run: Run) -> None:
        run.finished_at = time.time()
        run.events.emit("run_finished", status=run.state.status, message=run.state.message)
        log.info("run_finished", run=run.key, status=run.state.status, message=run.state.message)
        self.checkpoints.mark(run.key, index=True)
        self._spawn(self._write_summary(run), f"summary-{run.key}")
        status, message = run.state.status, run.state.message
        self._spawn(self.schedules.on_run_finished(run.flow, run.run_id, status), f"triggers-{run.key}")
        self.recorder.record(
            f"finish {run.key}",
            lambda: self.metadata.finish_run(run.flow, run.run_id, status=status, message=message, now=run.finished_at),
        )
        run.wake.set()

    # ----------------------------------------------------------------- metadata
    def _record_tasks(self, run: Run, keys: list[str]) -> None:
        # A task a resume will clone is recorded once, with its origin, by _record_clone.
        tasks = [run.state.tasks[k] for k in keys]
        fresh = [t for t in tasks if resume.clone_source(run.state, t) is None]
        record_tasks(self.recorder, run.flow, run.run_id, fresh)

    def _record_clone(self, run: Run, task: sch.Task, origin_pathspec: str) -> None:
        record_clone(self.recorder, run.flow, run.run_id, task, origin_pathspec)

    def _record_attempt(
        self, run: Run, task: sch.Task, attempt: sch.Attempt, done: dict[str, Any] | None = None
    ) -> None:
        record_attempt(self.recorder, run.flow, run.run_id, task, attempt, done)

    # ----------------------------------------------------------------- recovery
    async def _recover(self) -> None:
        import json

        try:
            index = json.loads(await self.store.get(layout.active_runs_key(self.daemon_id)))
        except NotFound:
            return
        for flow, run_id in index.get("runs", []):
            try:
                record = json.loads(await self.store.get(run_record_key(flow, run_id)))
                try:
                    state = sch.RunState.from_dict(
                        json.loads(await self.store.get(layout.checkpoint_key(flow, run_id)))
                    )
                except NotFound:
                    state = sch.initial_state(
                        flow, run_id, max_num_splits=int(record["options"].get("max_num_splits", 100))
                    )
            except (NotFound, ValueError, KeyError) as exc:
                log.error("recovery_skipped_run", run=f"{flow}/{run_id}", error=str(exc))
                continue
            run = Run(**record, state=state, recovered=True)
            self.runs[run.key] = run
            run.events.emit("run_started", flow=flow, run_id=run_id, recovered=True)
            with bound_log(run=run.key):
                log.info("run_recovering", tasks=len(state.tasks))
            if state.finished:
                self._finish(run)
                continue
            self._spawn(self._resume(run), f"drive-{run.key}")

    async def _resume(self, run: Run) -> None:
        bind_log(run=run.key)
        run.package_dir = await self._package_dir(run)
        for task in list(run.state.tasks.values()):
            for attempt in list(task.attempts):
                if attempt.status == sch.RUNNING:
                    await self._reconcile(run, task, attempt)
        self._apply(run, sch.settle(run.state))
        await self._drive(run)

    async def _reconcile(self, run: Run, task: sch.Task, attempt: sch.Attempt) -> None:
        with bound_log(run=run.key, step=task.step, task=task.task_id):
            await self._reconcile_bound(run, task, attempt)

    async def _reconcile_bound(self, run: Run, task: sch.Task, attempt: sch.Attempt) -> None:
        akey = AttemptKey(run.flow, run.run_id, task.step, task.task_id, attempt.number)
        done = await read_done(self.store, akey)
        if done is not None:
            await self._store_logs(run, akey)
            self._finished(run, task, attempt.number, int(done.get("exit_code", 0)), done, None)
            return
        handle = attempt.handle
        if not handle:
            started = await read_started(self.store, akey)
            if started and started.get("batch_job_id"):
                handle = {
                    "backend": "batch",
                    "job_id": started["batch_job_id"],
                    "stdout": self._log_paths(run, akey)[0],
                }
                attempt.handle = handle
            elif started:
                handle = {
                    "pid": started["pid"],
                    "pgid": started["pid"],
                    "proc_start": started.get("proc_start"),
                    "via": "reattached",
                }
                attempt.handle = handle
        if handle and await self.backend.reattach(handle):
            log.info("attempt_reattached", attempt=attempt.number, pid=handle.get("pid"), job_id=handle.get("job_id"))
            self._started(run, task, attempt)
            run.inflight[task.key] = self._spawn(self._rewatch(run, task, attempt), f"attempt-{run.key}/{task.key}")
            return
        self._finished(run, task, attempt.number, -9, None, "the attempt was lost while the daemon was down")

    async def _rewatch(self, run: Run, task: sch.Task, attempt: sch.Attempt) -> None:
        bind_log(run=run.key, step=task.step, task=task.task_id)
        try:
            await self._watch(run, task, attempt, self._timeout_s(run, task.step))
        finally:
            if run.inflight.get(task.key) is asyncio.current_task():
                del run.inflight[task.key]
            run.wake.set()

    async def _adopt_attempts(self, run: Run, task: sch.Task) -> bool:
        """In a recovered run, take over attempts launched before the checkpoint knew of them."""
        known = len(task.attempts)
        found = [
            n for n in await list_attempts(self.store, run.flow, run.run_id, task.step, task.task_id) if n >= known
        ]
        if not found:
            return False
        for number in range(known, max(found) + 1):
            attempt = sch.attempt_started(run.state, task.key, None, time.time())
            assert attempt.number == number
            await self._reconcile(run, task, attempt)
            if task.status != sch.PENDING:
                break
        return task.status != sch.PENDING
