"""The daemon's HTTP API: JSON over a Unix socket, versioned under ``/v1``.

Every request is validated before it reaches the engine; a bad one gets a 4xx with
``{"error": code, "message": ...}``, never a 500. The caller's identity is the uid
the kernel reports for the socket peer (SO_PEERCRED), or on the optional TCP listener
the user its bearer token maps to, never a field of the request. Anyone who reaches
the daemon may read every run; changing one is for its owner and the admins
(:mod:`millstream.daemon.identity`), and a refusal is a 403 naming the owner.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

import millstream
from millstream.daemon import cron, metrics
from millstream.daemon import scheduler as sch
from millstream.daemon.engine import Engine, Run
from millstream.daemon.identity import Authority, Caller, token_caller, user_name, user_uid
from millstream.daemon.openapi import OPENAPI
from millstream.daemon.schedules import Schedule
from millstream.datastore import layout
from millstream.datastore.backends import store_fingerprint
from millstream.datastore.package import MAX_UNPACKED_PACKAGE_BYTES, gunzipped_size_within, store_package
from millstream.datastore.records import AttemptKey
from millstream.errors import (
    DatastoreError,
    MetadataError,
    MetadataNotFound,
    MillstreamError,
    NotFound,
    SchedulerError,
)
from millstream.metadata.model import RunRecord

ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", CollectorRegistry)
AUTHORITY = web.AppKey("authority", Authority)
TOKENS = web.AppKey("tokens", dict[str, str])
CALLER = web.RequestKey("caller", Caller)
# Paths a TCP caller may use without a token: a load balancer's or probe's health check.
OPEN_PATHS = frozenset({"/v1/health"})
MAX_PAGE = 500
# Set on a request once its streamed response has started (see errors_middleware).
STREAMING = web.RequestKey("streaming", bool)


class ApiFailure(Exception):
    """Turned into a JSON error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map every failure to a JSON error; nothing escapes as a bare 500."""
    try:
        return await handler(request)
    except ApiFailure as exc:
        return _error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "bad_request")
            return _error(exc.status, code, exc.reason)
        raise
    except MetadataNotFound as exc:
        return _error(404, "not_found", str(exc))
    except MetadataError as exc:
        if exc.retryable:
            return _error(503, "metadata_unavailable", f"the metadata store is unavailable: {exc}")
        return _error(400, "rejected", str(exc))
    except (SchedulerError, DatastoreError) as exc:
        return _error(409 if isinstance(exc, SchedulerError) else 400, "rejected", str(exc))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # a bug: say so, keep serving
        request.app.logger.exception("request_failed")
        if request.get(STREAMING):
            # The status line is sent: a JSON error now would be spliced into the stream.
            # Re-raised, aiohttp closes the connection, which the client sees as truncation.
            raise
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")


def _is_unix(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Callers on TCP must show a bearer token (see ``daemon.tokens_file``); the socket needs none."""
    if not _is_unix(request) and request.path not in OPEN_PATHS:
        caller = token_caller(request.app.get(TOKENS) or {}, request.headers.get("Authorization"))
        if caller is None:
            given = "Authorization" in request.headers
            raise ApiFailure(401, "unauthenticated",
                             "the bearer token is not valid" if given else "send Authorization: Bearer TOKEN")
        request[CALLER] = caller
    return await handler(request)


def caller_of(request: web.Request) -> Caller:
    """Who sent the request: the socket peer's uid (SO_PEERCRED), or the TCP token's user."""
    if CALLER in request:
        return request[CALLER]
    sock = request.transport.get_extra_info("socket") if request.transport else None
    uid = -1
    if sock is not None and sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
    if uid < 0:
        raise ApiFailure(401, "unauthenticated", "the caller's identity is unknown")
    caller = Caller(uid=uid, name=user_name(uid), via="socket")
    request[CALLER] = caller
    return caller


def require_submitter(request: web.Request) -> Caller:
    """The caller, if this daemon may run its tasks; else a 403 saying why not."""
    caller = caller_of(request)
    reason = request.app[AUTHORITY].submit_refusal(caller)
    if reason is not None:
        raise ApiFailure(403, "forbidden", reason)
    return caller


def require_owner(request: web.Request, action: str, what: str, owner: str, owner_uid: int | None) -> Caller:
    """The caller, if it may ``action`` ``what``; else a 403 naming the owner."""
    caller = caller_of(request)
    reason = request.app[AUTHORITY].refusal(caller, action, what, owner, owner_uid)
    if reason is not None:
        raise ApiFailure(403, "forbidden", reason)
    return caller


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiFailure(415, "unsupported_media_type", "send Content-Type: application/json")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiFailure(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiFailure(400, "bad_request", "the body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise ApiFailure(400, "missing_field", f"field {name!r} is required")
        return None
    value = body[name]
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiFailure(400, "wrong_type", f"field {name!r} must be {expected}")
    return value


def _check_name(kind: str, value: str, check: Callable[[str], str]) -> str:
    try:
        return check(value)
    except DatastoreError as exc:
        raise ApiFailure(400, "bad_name", f"{kind}: {exc}") from None


_STEP_TYPES = {"start", "linear", "split", "foreach", "split-switch", "join", "end"}


def validate_graph(graph: Any) -> dict[str, Any]:
    """Check the shape of a submitted graph enough that the scheduler can trust it."""
    if not isinstance(graph, dict) or not isinstance(graph.get("steps"), dict) or not graph["steps"]:
        raise ApiFailure(400, "bad_graph", "graph.steps must be a non-empty object")
    steps = graph["steps"]
    if "start" not in steps or "end" not in steps:
        raise ApiFailure(400, "bad_graph", "graph must have start and end steps")
    for name, node in steps.items():
        _check_name("step", name, layout.check_step)
        if not isinstance(node, dict):
            raise ApiFailure(400, "bad_graph", f"step {name!r} must be an object")
        if node.get("type") not in _STEP_TYPES:
            raise ApiFailure(400, "bad_graph", f"step {name!r} has unknown type {node.get('type')!r}")
        out = node.get("out")
        if not isinstance(out, list) or not all(isinstance(o, str) and o in steps for o in out):
            raise ApiFailure(400, "bad_graph", f"step {name!r}: out must list steps of the graph")
        for key, kind in (("is_join", bool), ("decorators", list), ("split_stack", list), ("foreach_stack", list)):
            if not isinstance(node.get(key), kind):
                raise ApiFailure(400, "bad_graph", f"step {name!r}: {key} must be {kind.__name__}")
        if node["is_join"] and node.get("closes") not in steps:
            raise ApiFailure(400, "bad_graph", f"join step {name!r} must name the split it closes")
        if node["type"] == "foreach" and not isinstance(node.get("foreach_var"), str):
            raise ApiFailure(400, "bad_graph", f"foreach step {name!r} needs foreach_var")
        if node["type"] == "split-switch" and not (
            isinstance(node.get("cases"), dict) and isinstance(node.get("condition"), str)
        ):
            raise ApiFailure(400, "bad_graph", f"switch step {name!r} needs cases and condition")
        for d in node["decorators"]:
            if not (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("attributes"), dict)):
                raise ApiFailure(400, "bad_graph", f"step {name!r}: decorators must be {{name, attributes}} objects")
        for entry in node["split_stack"]:
            if not (isinstance(entry, list) and len(entry) == 3 and entry[1] in steps):
                raise ApiFailure(400, "bad_graph", f"step {name!r}: malformed split_stack")
    return graph


def _run_or_404(request: web.Request) -> Run:
    engine = request.app[ENGINE]
    flow = _check_name("flow", request.match_info["flow"], layout.check_flow)
    run_id = _check_name("run id", request.match_info["run_id"], layout.check_run_id)
    run = engine.runs.get(f"{flow}/{run_id}")
    if run is None:
        raise ApiFailure(404, "not_found", f"no run {flow}/{run_id} in this daemon")
    return run


def _int_query(request: web.Request, name: str, default: int, lo: int = 0, hi: int = 1 << 62) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiFailure(400, "bad_query", f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise ApiFailure(400, "bad_query", f"{name} must be between {lo} and {hi}")
    return value


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "0").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------- handlers
async def health(request: web.Request) -> web.Response:
    """Liveness and a few numbers."""
    engine = request.app[ENGINE]
    active = sum(1 for r in engine.runs.values() if not r.state.finished)
    return web.json_response(
        {
            "status": "ok" if engine.accepting else "stopping",
            "version": millstream.__version__,
            "pid": os.getpid(),
            "active_runs": active,
            "store": store_fingerprint(engine.datastore_config),
        }
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    """The daemon's metrics in the Prometheus text format (see :mod:`millstream.daemon.metrics`)."""
    body = metrics.exposition(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of this API."""
    return web.json_response(OPENAPI)


async def head_package(request: web.Request) -> web.Response:
    """200 if the code package is stored, else 404."""
    sha = _check_name("package", request.match_info["sha"], layout.check_sha)
    exists = await request.app[ENGINE].store.exists(layout.package_key(sha))
    return web.Response(status=200 if exists else 404)


async def put_package(request: web.Request) -> web.Response:
    """Store a code package under its sha256."""
    sha = _check_name("package", request.match_info["sha"], layout.check_sha)
    data = await request.read()
    if hashlib.sha256(data).hexdigest() != sha:
        raise ApiFailure(400, "sha_mismatch", "the body's sha256 is not the one in the path")
    if not await asyncio.to_thread(gunzipped_size_within, data, MAX_UNPACKED_PACKAGE_BYTES):
        raise ApiFailure(
            413,
            "too_large",
            f"the code package inflates to more than {MAX_UNPACKED_PACKAGE_BYTES >> 20} MiB: "
            "it is not a package millstream builds (a decompression bomb?)",
        )
    await store_package(request.app[ENGINE].store, sha, data)
    return web.json_response({"sha": sha}, status=201)


async def submit_run(request: web.Request) -> web.Response:
    """Start a run."""
    engine = request.app[ENGINE]
    if not engine.accepting:
        raise ApiFailure(503, "stopping", "the daemon is shutting down; submit again in a moment")
    caller = require_submitter(request)
    uid, user = caller.uid, caller.name
    body = await _json(request)
    flow = _check_name("flow", _field(body, "flow", str), layout.check_flow)
    graph = validate_graph(body.get("graph"))
    if graph.get("flow") not in (None, flow):
        raise ApiFailure(400, "bad_graph", "graph.flow differs from flow")
    _check_name("package", _field(body, "package", str), layout.check_sha)
    module_file = _field(body, "module_file", str)
    if Path(module_file).name != module_file or not module_file.endswith(".py"):
        raise ApiFailure(400, "bad_module_file", "module_file must be a .py file name without directories")
    class_name = _field(body, "class_name", str)
    if not class_name.isidentifier():
        raise ApiFailure(400, "bad_class_name", "class_name must be an identifier")
    _field(body, "params", dict, required=False)
    python = _field(body, "python", str, required=False)
    if python is not None and not Path(python).is_absolute():
        raise ApiFailure(400, "bad_python", "python must be an absolute path")
    env = _field(body, "env", dict, required=False) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ApiFailure(400, "wrong_type", "env must map strings to strings")
    for k, v in env.items():
        # What execve cannot take would fail the launch, not the request.
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ApiFailure(400, "bad_env", f"env: {k!r} is not a usable variable (empty, '=' or NUL)")
    options = _field(body, "options", dict, required=False) or {}
    for key, lo, hi in (("max_workers", 1, 10_000), ("max_num_splits", 1, 1_000_000)):
        if key in options and (
            not isinstance(options[key], int) or isinstance(options[key], bool) or not lo <= options[key] <= hi
        ):
            raise ApiFailure(400, "bad_option", f"options.{key} must be an integer from {lo} to {hi}")
    cwd = options.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not Path(cwd).is_absolute()):
        raise ApiFailure(400, "bad_option", "options.cwd must be an absolute path")
    resume = options.get("resume")
    if resume is not None:
        if not isinstance(resume, dict) or set(resume) - {"origin_run_id", "step"}:
            raise ApiFailure(400, "bad_option", "options.resume must be {origin_run_id, step}")
        if resume.get("origin_run_id") is not None:
            _check_name("origin run id", _field(resume, "origin_run_id", str), layout.check_run_id)
        if resume.get("step") is not None:
            _check_name("resume step", _field(resume, "step", str), layout.check_step)
        if resume.get("origin_run_id") is not None:
            try:
                origin = await engine.metadata.get_run(flow, resume["origin_run_id"])
            except MetadataNotFound:
                pass  # the engine says which run is missing, and where it looked
            else:
                require_owner(request, "resume", f"run {origin.pathspec}", origin.user, user_uid(origin.user))
    tags = options.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= 256 for t in tags):
        raise ApiFailure(400, "bad_option", "options.tags must be a list of non-empty strings")
    run = await engine.submit({**body, "graph": graph, "env": env, "options": options}, owner=user, owner_uid=uid)
    return web.json_response(
        {"flow": run.flow, "run_id": run.run_id, "pathspec": run.key, "owner": run.owner}, status=201
    )


def _summary(record: RunRecord) -> dict[str, Any]:
    return {
        "flow": record.flow,
        "run_id": record.run_id,
        "status": record.status,
        "owner": record.user,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
        "message": record.message,
        "tags": list(record.tags),
        "system_tags": list(record.system_tags),
        "origin_run_id": record.origin_run_id,
    }


async def list_runs(request: web.Request) -> web.Response:
    """Runs of every daemon and user recorded in the metadata store, newest first, paged."""
    engine = request.app[ENGINE]
    limit = _int_query(request, "limit", 50, 1, MAX_PAGE)
    status = request.query.get("status")
    if status and status not in ("running", "ok", "failed", "cancelled"):
        raise ApiFailure(400, "bad_query", "status must be running, ok, failed or cancelled")
    flow = request.query.get("flow") or None
    if flow is not None:
        _check_name("flow", flow, layout.check_flow)
    tags = request.query.getall("tag", [])
    try:
        page = await engine.metadata.list_runs(
            flow=flow,
            status=status,
            user=request.query.get("owner") or None,
            tags=tags,
            limit=limit,
            cursor=request.query.get("cursor") or None,
        )
    except MetadataError as exc:
        if exc.retryable:
            raise
        raise ApiFailure(400, "bad_query", str(exc)) from None
    rows = []
    for record in page.items:
        live = engine.runs.get(record.pathspec)
        rows.append(live.summary() | {"system_tags": list(record.system_tags)} if live else _summary(record))
    return web.json_response({"runs": rows, "next_cursor": page.next_cursor})


def run_detail(run: Run) -> dict[str, Any]:
    """A run's summary with per-step counts and every task's attempts."""
    steps: dict[str, dict[str, int]] = {
        name: dict.fromkeys((sch.PENDING, sch.RUNNING, sch.OK, sch.FAILED, sch.CANCELLED), 0)
        for name in run.graph["steps"]
    }
    tasks = []
    for task in run.state.tasks.values():
        steps[task.step][task.status] += 1
        tasks.append(
            {
                "step": task.step,
                "task_id": task.task_id,
                "pathspec": f"{run.key}/{task.key}",
                "status": task.status,
                "attempts": [
                    {
                        "number": a.number,
                        "status": a.status,
                        "started_at": a.started_at,
                        "finished_at": a.finished_at,
                        "exit_code": a.exit_code,
                        "message": a.message,
                        "handle": a.handle,
                    }
                    for a in task.attempts
                ],
            }
        )
    return {**run.summary(), "steps": steps, "tasks": tasks, "params": run.params}


async def get_run(request: web.Request) -> web.Response:
    """One run in detail: live from this daemon, else from the metadata store."""
    engine = request.app[ENGINE]
    flow = _check_name("flow", request.match_info["flow"], layout.check_flow)
    run_id = _check_name("run id", request.match_info["run_id"], layout.check_run_id)
    run = engine.runs.get(f"{flow}/{run_id}")
    if run is not None:
        return web.json_response(run_detail(run))
    record = await engine.metadata.get_run(flow, run_id)
    tasks = await engine.metadata.list_tasks(flow, run_id)
    steps: dict[str, dict[str, int]] = {}
    for t in tasks:
        statuses = (sch.PENDING, sch.RUNNING, sch.OK, sch.FAILED, sch.CANCELLED)
        counts = steps.setdefault(t.step, dict.fromkeys(statuses, 0))
        counts[t.status] = counts.get(t.status, 0) + 1
    return web.json_response(
        {
            **_summary(record),
            "steps": steps,
            "params": record.params,
            "tasks": [
                {
                    "step": t.step,
                    "task_id": t.task_id,
                    "pathspec": t.pathspec,
                    "status": t.status,
                    "attempts": [
                        {
                            "number": a.attempt,
                            "status": a.status,
                            "started_at": a.started_at,
                            "finished_at": a.finished_at,
                            "exit_code": a.exit_code,
                            "message": a.message,
                            "handle": a.handle,
                        }
                        for a in t.attempts
                    ],
                }
                for t in tasks
            ],
        }
    )


async def _ndjson(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    request[STREAMING] = True
    return resp


async def run_events(request: web.Request) -> web.StreamResponse:
    """The run's events as NDJSON; ``follow=1`` keeps the stream open until the run ends."""
    run = _run_or_404(request)
    since = _int_query(request, "since", 0)
    resp = await _ndjson(request)
    batch: list[bytes] = []
    async for event in run.events.follow(since, follow=_flag(request, "follow")):
        batch.append(json.dumps(event, default=str).encode() + b"\n")
        if len(batch) >= 256 or event is run.events.events[-1]:
            await resp.write(b"".join(batch))
            batch.clear()
    if batch:
        await resp.write(b"".join(batch))
    await resp.write_eof()
    return resp


async def task_logs(request: web.Request) -> web.StreamResponse:
    """A task attempt's stdout or stderr from an offset; ``follow=1`` until the attempt ends."""
    engine = request.app[ENGINE]
    run = _run_or_404(request)
    step = _check_name("step", request.match_info["step"], layout.check_step)
    task_id = _check_name("task id", request.match_info["task_id"], layout.check_task_id)
    stream = request.query.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        raise ApiFailure(400, "bad_query", "stream must be stdout or stderr")
    task = run.state.tasks.get(sch.task_key(step, task_id))
    if task is None:
        raise ApiFailure(404, "not_found", f"no task {step}/{task_id} in run {run.key}")
    if not task.attempts:
        raise ApiFailure(404, "not_started", f"task {step}/{task_id} has not started")
    attempt_no = _int_query(request, "attempt", len(task.attempts) - 1, 0, len(task.attempts) - 1)
    offset = _int_query(request, "offset", 0)
    follow = _flag(request, "follow")
    akey = AttemptKey(run.flow, run.run_id, step, task_id, attempt_no)
    local_path = Path(engine._log_paths(run, akey)[0 if stream == "stdout" else 1])
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    request[STREAMING] = True
    attempt = task.attempts[attempt_no]
    while True:
        running = attempt.status == sch.RUNNING
        data = b""
        if local_path.exists():
            with open(local_path, "rb") as f:
                # Past the end there is nothing yet; seeking there may be EINVAL (huge offsets).
                if offset < os.fstat(f.fileno()).st_size:
                    f.seek(offset)
                    data = f.read(1 << 20)
        elif not running:
            key = akey.stdout_key if stream == "stdout" else akey.stderr_key
            try:
                data = await engine.store.get_range(key, offset)
            except NotFound:
                data = b""
        if data:
            await resp.write(data)
            offset += len(data)
            continue
        if not follow or not running:
            break
        await asyncio.sleep(0.2)
    await resp.write_eof()
    return resp


async def cancel_run(request: web.Request) -> web.Response:
    """Cancel a run: its owner or an admin only."""
    run = _run_or_404(request)
    require_owner(request, "cancel", f"run {run.key}", run.owner, run.owner_uid)
    if not request.app[ENGINE].cancel(run):
        raise ApiFailure(409, "finished", f"run {run.key} has already ended ({run.state.status})")
    return web.json_response({"status": "cancelling"}, status=202)


def _tag_list(body: dict[str, Any], name: str) -> list[str]:
    tags = _field(body, name, list, required=False) or []
    if not all(isinstance(t, str) and 0 < len(t) <= 512 for t in tags):
        raise ApiFailure(400, "bad_tags", f"{name} must be a list of non-empty strings of at most 512 characters")
    return list(tags)


async def change_tags(request: web.Request) -> web.Response:
    """Remove, then add, user tags of a run: its owner or an admin only; system tags never change."""
    engine = request.app[ENGINE]
    flow = _check_name("flow", request.match_info["flow"], layout.check_flow)
    run_id = _check_name("run id", request.match_info["run_id"], layout.check_run_id)
    body = await _json(request)
    add, remove = _tag_list(body, "add"), _tag_list(body, "remove")
    record = await engine.metadata.get_run(flow, run_id)
    live = engine.runs.get(record.pathspec)
    owner_uid = live.owner_uid if live is not None else user_uid(record.user)
    require_owner(request, "change the tags of", f"run {record.pathspec}", record.user, owner_uid)
    system = sorted(set(remove) & set(record.system_tags))
    if system:
        raise ApiFailure(400, "system_tag", f"system tags of run {record.pathspec} cannot be removed: "
                                            f"{', '.join(system)}")
    if remove:
        record = await engine.metadata.remove_tags(flow, run_id, remove)
    if add:
        record = await engine.metadata.add_tags(flow, run_id, add)
    if live is not None:
        # A live run's summary shows its tags from here on (tasks launched later see them too).
        live.options["tags"] = list(record.tags)
        engine.checkpoints.mark(live.key)
    return web.json_response(_summary(record))


async def create_schedule(request: web.Request) -> web.Response:
    """Save a schedule: a run submission plus cron and/or trigger flows."""
    engine = request.app[ENGINE]
    caller = require_submitter(request)
    uid, user = caller.uid, caller.name
    body = await _json(request)
    submission = _field(body, "submission", dict)
    flow = _check_name("flow", _field(submission, "flow", str), layout.check_flow)
    validate_graph(submission.get("graph"))
    _check_name("package", _field(submission, "package", str), layout.check_sha)
    if not await engine.store.exists(layout.package_key(submission["package"])):
        raise ApiFailure(409, "rejected", f"code package {submission['package']} was not uploaded")
    triggers = _field(body, "triggers", list, required=False) or []
    if not all(isinstance(t, str) for t in triggers):
        raise ApiFailure(400, "wrong_type", "triggers must be a list of flow names")
    name = _field(body, "name", str, required=False) or flow
    existing = engine.schedules.schedules.get(name)
    if existing is not None:
        require_owner(request, "replace", f"schedule {name!r}", existing.owner, existing.owner_uid)
    schedule = Schedule(
        name=name,
        flow=flow,
        owner=user,
        owner_uid=uid,
        submission=submission,
        cron=_field(body, "cron", str, required=False),
        timezone=_field(body, "timezone", str, required=False),
        catchup=_field(body, "catchup", str, required=False) or "latest",
        triggers=list(triggers),
    )
    if schedule.cron:
        # A valid expression may still never fire (0 0 30 2 *): refuse it before it is
        # saved, since every later listing would have to compute its next instant.
        try:
            cron.next_instant(cron.validate(schedule.cron), schedule.timezone, datetime.fromtimestamp(time.time(), UTC))
        except SchedulerError as exc:
            raise ApiFailure(400, "bad_schedule", str(exc)) from None
    saved = await engine.schedules.put(schedule)
    return web.json_response(saved.to_dict(time.time()), status=201)


async def list_schedules(request: web.Request) -> web.Response:
    """Every schedule with its next fire time."""
    now = time.time()
    book = request.app[ENGINE].schedules
    return web.json_response(
        {"schedules": [s.to_dict(now) for s in sorted(book.schedules.values(), key=lambda s: s.name)]}
    )


def _schedule_for_owner(request: web.Request) -> Schedule:
    book = request.app[ENGINE].schedules
    name = request.match_info["name"]
    if name not in book.schedules:
        raise ApiFailure(404, "not_found", f"no schedule named {name!r}")
    schedule = book.schedules[name]
    require_owner(request, "change", f"schedule {name!r}", schedule.owner, schedule.owner_uid)
    return schedule


async def pause_schedule(request: web.Request) -> web.Response:
    """Pause (``/pause``) or resume (``/resume``) a schedule."""
    schedule = _schedule_for_owner(request)
    paused = request.match_info["action"] == "pause"
    saved = await request.app[ENGINE].schedules.set_paused(schedule.name, paused)
    return web.json_response(saved.to_dict(time.time()))


async def delete_schedule(request: web.Request) -> web.Response:
    """Forget a schedule."""
    schedule = _schedule_for_owner(request)
    await request.app[ENGINE].schedules.delete(schedule.name)
    return web.json_response({"deleted": schedule.name})


def make_app(
    engine: Engine,
    *,
    max_body_bytes: int,
    authority: Authority | None = None,
    tokens: dict[str, str] | None = None,
) -> web.Application:
    """The aiohttp application serving the API (on the socket, and on TCP with ``tokens``)."""
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=max_body_bytes)
    app[ENGINE] = engine
    app[AUTHORITY] = authority or Authority(daemon_uid=os.getuid())
    app[TOKENS] = dict(tokens or {})
    app[METRICS] = metrics.engine_registry(engine)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_route("HEAD", "/v1/packages/{sha}", head_package)
    app.router.add_put("/v1/packages/{sha}", put_package)
    app.router.add_post("/v1/runs", submit_run)
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{flow}/{run_id}", get_run)
    app.router.add_get("/v1/runs/{flow}/{run_id}/events", run_events)
    app.router.add_get("/v1/runs/{flow}/{run_id}/logs/{step}/{task_id}", task_logs)
    app.router.add_post("/v1/runs/{flow}/{run_id}/cancel", cancel_run)
    app.router.add_post("/v1/runs/{flow}/{run_id}/tags", change_tags)
    app.router.add_post("/v1/schedules", create_schedule)
    app.router.add_get("/v1/schedules", list_schedules)
    app.router.add_post("/v1/schedules/{name}/{action:pause|resume}", pause_schedule)
    app.router.add_delete("/v1/schedules/{name}", delete_schedule)
    return app


__all__ = ["MillstreamError", "make_app", "run_detail", "validate_graph"]
