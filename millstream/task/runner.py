"""Run ONE attempt of ONE step, then commit its artifacts and its done marker.

The order is what makes an attempt safe to kill at any instant: ``started.json``
first, then the artifacts (content-addressed, so a half-finished attempt leaves
only unreferenced blobs), then the done marker, written last with put-if-absent.
The done marker is the single record of the outcome the daemon trusts.

stdout and stderr belong to the user: the runner prints nothing on them except a
failing step's traceback on stderr, as Python itself would, and millstream's own
log lines (JSON, on stderr: see :func:`configure_task_logging`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import structlog

from millstream.datastore.artifacts import ArtifactRef, ArtifactStore, serialize
from millstream.datastore.backends import close_store, open_store
from millstream.datastore.records import AttemptKey, read_done, write_done, write_started
from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError, FlowError
from millstream.flow.current import Trigger, current
from millstream.flow.parameters import decode_value
from millstream.flow.spec import FlowSpec, ForeachFrame, Inputs
from millstream.task.spec import (
    EXIT_INFRA_FAILURE,
    EXIT_NO_RETRY,
    EXIT_OK,
    EXIT_USER_FAILURE,
    TaskSpec,
)

T = TypeVar("T")


class StepTimeout(Exception):
    """The step ran longer than its @timeout."""


class CaughtException:
    """What ``@catch(var=...)`` stores: the exception that failed the step."""

    def __init__(self, exc: BaseException) -> None:
        self.type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        self.message = str(exc)
        self.traceback = "".join(traceback.format_exception(exc))

    def __repr__(self) -> str:
        return f"CaughtException({self.type}: {self.message})"

    def __str__(self) -> str:
        return self.traceback


class _Loop:
    """Runs datastore coroutines from sync code (the runner, lazy artifact loads).

    A private loop on the main thread, except while the user's own event loop runs
    there (a step that calls ``asyncio.run`` and reads an artifact inside it): then
    the coroutine runs on a loop in a helper thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self.loop.run_until_complete(coro)
        if self._thread_loop is None:
            self._thread_loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._thread_loop.run_forever, name="millstream-io", daemon=True)
            self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._thread_loop).result()

    def close(self) -> None:
        self.loop.close()
        if self._thread_loop is not None and self._thread is not None:
            self._thread_loop.call_soon_threadsafe(self._thread_loop.stop)
            self._thread.join(timeout=5)


class _NoRetry(Exception):
    """The flow is wrong for this step; retrying cannot help."""


def load_flow_class(package_dir: str, module_file: str, class_name: str) -> type[FlowSpec]:
    """Import the flow's module from its code package and return the flow class."""
    path = Path(package_dir) / module_file
    if package_dir not in sys.path:
        sys.path.insert(0, package_dir)
    module_name = Path(module_file).stem
    module = sys.modules.get(module_name)
    if module is None or getattr(module, "__file__", None) != str(path):
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise FlowError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, FlowSpec)):
        raise FlowError(f"{path} defines no flow class {class_name!r}")
    return cls


def _proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class TaskRunner:
    """Runs one attempt; :meth:`run` returns the process exit code."""

    def __init__(self, spec: TaskSpec, flow_cls: type[FlowSpec], store: ObjectStore) -> None:
        self.spec = spec
        self.flow_cls = flow_cls
        self.store = store
        self.artifacts = ArtifactStore(store, spec.flow)
        self.key = AttemptKey(spec.flow, spec.run_id, spec.step, spec.task_id, spec.attempt)
        self.io = _Loop()
        self.node = spec.node
        self.decorators = {d["name"]: d["attributes"] for d in self.node.get("decorators", [])}

    # ----------------------------------------------------------------- inputs
    def _load(self, ref: ArtifactRef) -> Any:
        return self.io.run(self.artifacts.load(ref.sha))

    def _parent_done(self) -> list[dict[str, Any]]:
        async def read_all() -> list[dict[str, Any]]:
            keys = [
                AttemptKey(self.spec.flow, p.run_id or self.spec.run_id, p.step, p.task, p.attempt)
                for p in self.spec.parents
            ]
            records = await asyncio.gather(*(read_done(self.store, k) for k in keys))
            for key, rec in zip(keys, records, strict=True):
                if rec is None or rec.get("status") != "ok":
                    raise DatastoreError(f"input {key.pathspec} attempt {key.attempt} has no successful done marker")
            return [r for r in records if r is not None]

        return self.io.run(read_all())

    def _frames(self, stack: list[dict[str, Any]]) -> list[ForeachFrame]:
        values_cache: dict[str, list[Any]] = {}
        frames = []
        for f in stack:
            if f["values"] not in values_cache:
                values_cache[f["values"]] = self.io.run(self.artifacts.load(f["values"]))
            frames.append(ForeachFrame(f["index"], f["num_splits"], values_cache[f["values"]][f["index"]]))
        return frames

    def _new_flow(self, step_name: str) -> FlowSpec:
        flow = self.flow_cls(use_cli=False)
        flow._ms_params = {k: decode_value(v) for k, v in self.spec.params.items()}
        flow._ms_loader = self._load
        flow._ms_step_name = step_name
        return flow

    def _prepare(self) -> tuple[FlowSpec, Inputs | None, list[dict[str, Any]]]:
        parents = self._parent_done()
        flow = self._new_flow(self.spec.step)
        refs = [{k: ArtifactRef.from_dict(v) for k, v in p.get("artifacts", {}).items()} for p in parents]
        if self.node.get("is_join"):
            views = []
            for parent, rec, r in zip(self.spec.parents, parents, refs, strict=True):
                view = self._new_flow(parent.step)
                view._ms_lazy = dict(r)
                view._ms_input_refs = r  # type: ignore[attr-defined]
                view._ms_foreach = self._frames(rec.get("foreach_stack", []))
                views.append(view)
            stack = list(parents[0].get("foreach_stack", [])) if parents else []
            closes = self.node.get("closes")
            if stack and stack[-1]["step"] == closes:
                stack = stack[:-1]
            flow._ms_in_join = True
            flow._ms_foreach = self._frames(stack)
            return flow, Inputs(views), stack
        stack = list(parents[0].get("foreach_stack", [])) if parents else []
        if parents:
            flow._ms_lazy = dict(refs[0])
        if self.spec.split_index is not None:
            foreach = parents[0].get("foreach")
            if not foreach:
                raise DatastoreError(f"parent of {self.spec.pathspec} recorded no foreach")
            stack.append(
                {
                    "step": self.spec.parents[0].step,
                    "index": self.spec.split_index,
                    "num_splits": foreach["num_splits"],
                    "values": foreach["values"],
                }
            )
        flow._ms_foreach = self._frames(stack)
        return flow, None, stack

    # ----------------------------------------------------------------- running
    def _set_current(self) -> None:
        s = self.spec
        current._set(
            flow_name=s.flow,
            run_id=s.run_id,
            step_name=s.step,
            task_id=s.task_id,
            retry_count=s.attempt,
            origin_run_id=s.origin_run_id,
            pathspec=s.pathspec,
            username=s.username,
            tags=list(s.tags),
            parameter_names=list(s.params),
            is_production=s.is_production,
            namespace=f"user:{s.username}",
            trigger=Trigger(s.trigger) if s.trigger else None,
        )

    def _run_body(self, flow: FlowSpec, inputs: Inputs | None) -> None:
        env = self.decorators.get("environment")
        if env:
            os.environ.update(env["vars"])
        timeout = self.decorators.get("timeout")
        limit = float(timeout["seconds"] + 60 * timeout["minutes"] + 3600 * timeout["hours"]) if timeout else 0.0

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            raise StepTimeout(f"step {self.spec.step!r} timed out after {limit:g} s (@timeout)")

        if limit:
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            method = getattr(flow, self.spec.step)
            method(inputs) if inputs is not None else method()
        finally:
            if limit:
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _transition(self, flow: FlowSpec) -> dict[str, Any]:
        node = self.node
        out = list(node.get("out", []))
        if node["type"] == "end":
            if flow._ms_transition is not None:
                raise _NoRetry("step 'end' called self.next")
            return {"next": []}
        t = flow._ms_transition
        if t is None:
            raise _NoRetry(f"step {self.spec.step!r} finished without calling self.next")
        if node["type"] == "split-switch":
            if t.condition != node["condition"] or t.cases != node["cases"]:
                raise _NoRetry(f"step {self.spec.step!r} called self.next differently from its source")
            value = getattr(flow, node["condition"])
            key = str(value)
            if key not in node["cases"]:
                raise _NoRetry(
                    f"switch in step {self.spec.step!r}: {node['condition']}={value!r} matches no case "
                    f"(cases: {', '.join(node['cases'])})"
                )
            return {"next": [node["cases"][key]], "switch": {"value": key, "step": node["cases"][key]}}
        if list(t.steps) != out or t.foreach != node.get("foreach_var"):
            raise _NoRetry(
                f"step {self.spec.step!r} called self.next({', '.join(t.steps)}) at run time, "
                f"but its source says self.next({', '.join(out)})"
            )
        if node["type"] == "foreach":
            var = node["foreach_var"]
            try:
                values = list(getattr(flow, var))
            except TypeError:
                raise _NoRetry(f"foreach in step {self.spec.step!r}: self.{var} is not iterable") from None
            sha, blob = serialize(values)
            self.io.run(self.artifacts.save_blob(sha, blob))
            return {"next": out, "foreach": {"var": var, "num_splits": len(values), "values": sha}}
        return {"next": out}

    def _persist(self, flow: FlowSpec) -> dict[str, Any]:
        values = {n: v for n, v in flow.__dict__.items() if not n.startswith("__") and not n.startswith("_ms_")}
        try:
            refs = self.io.run(self.artifacts.save(values))
        except DatastoreError as exc:
            # save() wraps a pickling error (TypeError, PicklingError, ...) as the cause;
            # an I/O failure has an OSError cause, or none.
            if exc.__cause__ is None or isinstance(exc.__cause__, OSError):
                raise
            raise _NoRetry(f"an artifact of step {self.spec.step!r} cannot be stored: {exc}") from None
        refs.update(flow._ms_lazy)
        return {name: ref.to_dict() for name, ref in sorted(refs.items())}

    def run(self) -> int:
        """Run the attempt; returns the exit code the process should end with."""
        started = time.time()
        pid = os.getpid()
        try:
            self.io.run(
                write_started(
                    self.store,
                    self.key,
                    {
                        "pid": pid,
                        "proc_start": _proc_start_time(pid),
                        "started_at": started,
                        "host": os.uname().nodename,
                        # On Batch: how a restarted daemon finds the job (see engine._reconcile).
                        "batch_job_id": os.environ.get("AWS_BATCH_JOB_ID"),
                    },
                )
            )
            flow, inputs, stack = self._prepare()
        except Exception as exc:
            traceback.print_exc()
            return self._finish_failed(exc, started, EXIT_INFRA_FAILURE)
        self._set_current()
        done: dict[str, Any] = {"started_at": started, "foreach_stack": stack}
        try:
            try:
                self._run_body(flow, inputs)
                done.update(self._transition(flow))
            except _NoRetry:
                raise
            except BaseException as exc:
                if not self._catch(flow, exc):
                    raise
                done["caught"] = CaughtException(exc).type
                done["next"] = list(self.node.get("out", []))
                if self.node["type"] in ("foreach", "split-switch"):
                    raise _NoRetry(f"@catch cannot continue past a failed {self.node['type']} step") from exc
            done["artifacts"] = self._persist(flow)
        except _NoRetry as exc:
            print(f"millstream: {exc}", file=sys.stderr)
            return self._finish_failed(exc, started, EXIT_NO_RETRY)
        except DatastoreError as exc:
            # Reading inputs or storing artifacts failed: the step is not at fault.
            traceback.print_exception(exc)
            return self._finish_failed(exc, started, EXIT_INFRA_FAILURE)
        except BaseException as exc:
            traceback.print_exception(exc)
            return self._finish_failed(exc, started, EXIT_USER_FAILURE)
        finally:
            current._clear()
        done.update(status="ok", finished_at=time.time())
        try:
            self.io.run(write_done(self.store, self.key, done))
        except Exception:
            traceback.print_exc()
            return EXIT_INFRA_FAILURE
        return EXIT_OK

    def _catch(self, flow: FlowSpec, exc: BaseException) -> bool:
        catch = self.decorators.get("catch")
        if catch is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return False
        if self.spec.attempt < self.spec.max_user_retries:
            return False  # @retry goes first; @catch takes the last attempt's failure
        if catch.get("print_exception", True):
            traceback.print_exception(exc)
            print("millstream: @catch stored the exception and the flow goes on", file=sys.stderr)
        if catch.get("var"):
            setattr(flow, catch["var"], CaughtException(exc))
        return True

    def _finish_failed(self, exc: BaseException, started: float, code: int) -> int:
        done = {
            "status": "failed",
            "started_at": started,
            "finished_at": time.time(),
            "exit_code": code,
            "exception": {
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            },
        }
        try:
            self.io.run(write_done(self.store, self.key, done))
        except Exception:
            traceback.print_exc()
            return EXIT_INFRA_FAILURE
        return code

    def close(self) -> None:
        """Stop the I/O thread."""
        self.io.close()


def run_spec(spec: TaskSpec, flow_cls: type[FlowSpec] | None = None) -> int:
    """Run one attempt from its spec; the exit code of the task process."""
    configure_task_logging()
    try:
        if flow_cls is None:
            flow_cls = load_flow_class(spec.package_dir, spec.module_file, spec.class_name)
        store = open_store({**spec.datastore, "inline": True})
    except BaseException:
        traceback.print_exc()
        return EXIT_INFRA_FAILURE
    runner = TaskRunner(spec, flow_cls, store)
    try:
        return runner.run()
    finally:
        with contextlib.suppress(Exception):
            runner.io.run(close_store(store))
        sys.stdout.flush()
        sys.stderr.flush()
        runner.close()


def configure_task_logging() -> None:
    """Send millstream's own log lines (an S3 retry, say) to stderr as JSON.

    stdout belongs to the step, and structlog's default printer writes there; the
    zygote child has just pointed ``sys.stderr`` at the attempt's stderr file, so the
    logger is bound to that stream here, per attempt.
    """
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
