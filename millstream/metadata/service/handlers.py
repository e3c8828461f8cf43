"""The service's HTTP handlers: validate, call the store, answer JSON.

Each handler checks every path segment, query parameter and body field before the
store sees it, so that a malformed request gets a 4xx ``{"error": code, "message": ...}``
(the middleware in :mod:`millstream.metadata.service.app` turns the failures below into
responses). Names follow the datastore's rules (:mod:`millstream.datastore.layout`), so
anything the metadata accepts can also be a datastore key.

Routes (all under ``/v1``; ``R`` is ``/flows/{flow}/runs/{run_id}``, ``T`` is
``R/steps/{step}/tasks/{task_id}``)::

    GET    /health                      database reachable? (no key needed)
    GET    /version                     service and schema versions (no database needed)
    GET    /flows                       flow names
    POST   /flows/{flow}/runs           create_run (request_id makes it idempotent)
    GET    /runs, /flows/{flow}/runs    list_runs: status, user, tag (repeated), created_after,
                                        created_before, limit, cursor
    GET    R                            get_run
    POST   R/finish                     finish_run
    POST   R/heartbeat                  heartbeat_run
    PATCH  R/tags                       add_tags / remove_tags: {"add": [...], "remove": [...]}
    GET    R/tasks, R/steps/{step}/tasks  list_tasks with attempts
    PUT    T                            record_task
    GET    T                            get_task with attempts
    PUT    T/attempts/{attempt}         record_attempt
    PUT    T/attempts/{attempt}/artifacts  record_artifacts
    GET    T/artifacts[?attempt=N], T/attempts/{attempt}/artifacts  get_artifacts
    PATCH  T/metadata                   set_metadata: {"fields": {...}}
    GET    T/metadata                   get_metadata
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

import millstream
from millstream.datastore import layout
from millstream.errors import DatastoreError
from millstream.metadata.model import RUN_STATUSES, TASK_STATUSES, ArtifactRecord, AttemptRecord
from millstream.metadata.service.db import FINAL_RUN_STATUSES, MAX_PAGE, PostgresMetadataStore
from millstream.metadata.service.schema import load_migrations

STORE = web.AppKey("store", PostgresMetadataStore)

MAX_TEXT = 256           # users, tags, request ids, metadata field names
MAX_MESSAGE = 64 << 10   # run and attempt messages, metadata values, origins
MAX_ITEMS = 1000         # tags, parents, foreach indexes, artifacts, fields per request
_INT32 = (1 << 31) - 1
_INT63 = (1 << 63) - 1
SCHEMA_VERSION = len(load_migrations())  # what a started service has migrated its database to


class ApiFailure(Exception):
    """A request the service refuses; the middleware answers it as JSON."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str, code: str = "bad_request") -> ApiFailure:
    return ApiFailure(400, code, message)


# --------------------------------------------------------------------- input
async def _body(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge, answered as 413
    if not raw.strip() and allow_empty:
        return {}
    if request.content_type != "application/json":
        raise ApiFailure(415, "unsupported_media_type", "send Content-Type: application/json")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}", "malformed_json") from None
    except RecursionError:
        raise _bad("the body is nested too deeply", "malformed_json") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _text(value: Any, what: str, *, max_len: int = MAX_TEXT, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string", "wrong_type")
    if not value and not empty:
        raise _bad(f"{what} must not be empty")
    if len(value) > max_len:
        raise _bad(f"{what} is longer than {max_len} characters")
    _check_chars(value, what)
    return value


def _check_chars(value: str, what: str) -> None:
    """What PostgreSQL cannot store in text: NUL, and lone surrogates (JSON lets "\\ud800" through)."""
    if "\x00" in value:
        raise _bad(f"{what} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{what} must be valid Unicode (no lone surrogates)") from None


def _opt_text(body: dict[str, Any], name: str, *, max_len: int = MAX_TEXT) -> str | None:
    value = body.get(name)
    return None if value is None else _text(value, name, max_len=max_len, empty=True)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{what} must be a finite number", "wrong_type")
    return float(value)


def _opt_number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    return None if value is None else _number(value, name)


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{what} must be an integer", "wrong_type")
    if not lo <= value <= hi:
        raise _bad(f"{what} must be from {lo} to {hi}")
    return value


def _list(value: Any, what: str, item: Callable[[Any, str], Any]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(f"{what} must be a list", "wrong_type")
    if len(value) > MAX_ITEMS:
        raise _bad(f"{what} has more than {MAX_ITEMS} items")
    return [item(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _tag(value: Any, what: str) -> str:
    return _text(value, what)


def _json_safe(value: Any, what: str, depth: int = 0) -> Any:
    """Refuse what PostgreSQL's jsonb would: NUL, lone surrogates (numbers were checked by the parser)."""
    if depth > 64:
        raise _bad(f"{what} is nested too deeply")
    if isinstance(value, str):
        _check_chars(value, what)
    if isinstance(value, dict):
        for k, v in value.items():
            _json_safe(k, what, depth + 1)
            _json_safe(v, what, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _json_safe(v, what, depth + 1)
    return value


def _name(what: str, value: str, check: Callable[[str], str]) -> str:
    try:
        return check(value)
    except DatastoreError as exc:
        raise _bad(f"{what}: {exc}", "bad_name") from None


def _flow(request: web.Request) -> str:
    return _name("flow", request.match_info["flow"], layout.check_flow)


def _run_key(request: web.Request) -> tuple[str, str]:
    return _flow(request), _name("run id", request.match_info["run_id"], layout.check_run_id)


def _task_key(request: web.Request) -> tuple[str, str, str, str]:
    flow, run_id = _run_key(request)
    return (flow, run_id, _name("step", request.match_info["step"], layout.check_step),
            _name("task id", request.match_info["task_id"], layout.check_task_id))


def _attempt_no(raw: str, what: str = "attempt") -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
        raise _bad(f"{what} must be a non-negative integer")
    return _int(int(raw), what, 0, _INT32)


def _query_number(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad(f"{name} must be a number", "bad_query") from None
    if not math.isfinite(value):
        raise _bad(f"{name} must be a finite number", "bad_query")
    return value


def _query_text(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    return None if raw is None else _text(raw, name)


# --------------------------------------------------------------------- service
async def health(request: web.Request) -> web.Response:
    """200 when the database answers, 503 (retryable) when it does not; needs no key."""
    version = await request.app[STORE].ping()
    return web.json_response({"status": "ok", "schema_version": version})


async def version(request: web.Request) -> web.Response:
    """The service's version and the schema version it runs with; answers without the database."""
    return web.json_response({"service": "millstream-metadata", "version": millstream.__version__, "api": "v1",
                              "schema_version": SCHEMA_VERSION})


# --------------------------------------------------------------------- runs
async def create_run(request: web.Request) -> web.Response:
    """Create a run: 201 when new, 200 when ``request_id`` replays an earlier create."""
    flow = _flow(request)
    body = await _body(request)
    user = _text(body.get("user"), "user")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise _bad("params must be an object", "wrong_type")
    _json_safe(params, "params")
    tags = _list(body.get("tags"), "tags", _tag)
    system_tags = _list(body.get("system_tags"), "system_tags", _tag)
    daemon_id = body.get("daemon_id")
    if daemon_id is not None:
        daemon_id = _name("daemon_id", _text(daemon_id, "daemon_id"), layout.check_daemon_id)
    origin_run_id = body.get("origin_run_id")
    if origin_run_id is not None:
        origin_run_id = _name("origin_run_id", _text(origin_run_id, "origin_run_id"), layout.check_run_id)
    request_id = body.get("request_id")
    if request_id is not None:
        request_id = _text(request_id, "request_id")
    run, created = await request.app[STORE].create_run_once(
        flow, user=user, params=params, tags=tags, system_tags=system_tags, daemon_id=daemon_id,
        origin_run_id=origin_run_id, request_id=request_id, now=_opt_number(body, "now"))
    return web.json_response(run.to_dict(), status=201 if created else 200)


async def list_runs(request: web.Request) -> web.Response:
    """A page of runs, newest first."""
    flow = _flow(request) if "flow" in request.match_info else request.query.get("flow")
    if flow is not None and "flow" not in request.match_info:
        flow = _name("flow", flow, layout.check_flow)
    status = request.query.get("status")
    if status is not None and status not in RUN_STATUSES:
        raise _bad(f"status must be one of {', '.join(RUN_STATUSES)}", "bad_query")
    tags = request.query.getall("tag", [])
    if len(tags) > MAX_ITEMS:
        raise _bad(f"at most {MAX_ITEMS} tags", "bad_query")
    for tag in tags:
        _text(tag, "tag")
    raw_limit = request.query.get("limit", "50")
    if not (raw_limit.isascii() and raw_limit.isdigit()) or len(raw_limit) > 9 or int(raw_limit) < 1:
        raise _bad(f"limit must be a positive integer (pages hold at most {MAX_PAGE} runs)", "bad_query")
    cursor = request.query.get("cursor") or None
    page = await request.app[STORE].list_runs(
        flow=flow, status=status, user=_query_text(request, "user"), tags=tags,
        created_after=_query_number(request, "created_after"), created_before=_query_number(request, "created_before"),
        limit=int(raw_limit), cursor=cursor)
    return web.json_response({"runs": [r.to_dict() for r in page.items], "next_cursor": page.next_cursor})


async def list_flows(request: web.Request) -> web.Response:
    """Every flow with a run."""
    return web.json_response({"flows": await request.app[STORE].list_flows()})


async def get_run(request: web.Request) -> web.Response:
    """One run."""
    return web.json_response((await request.app[STORE].get_run(*_run_key(request))).to_dict())


async def finish_run(request: web.Request) -> web.Response:
    """Record a run's end status."""
    flow, run_id = _run_key(request)
    body = await _body(request)
    status = body.get("status")
    if status not in FINAL_RUN_STATUSES:
        raise _bad(f"status must be one of {', '.join(FINAL_RUN_STATUSES)}", "bad_status")
    run = await request.app[STORE].finish_run(flow, run_id, status=status,
                                              message=_opt_text(body, "message", max_len=MAX_MESSAGE),
                                              now=_opt_number(body, "now"))
    return web.json_response(run.to_dict())


async def heartbeat_run(request: web.Request) -> web.Response:
    """The run's daemon is alive."""
    flow, run_id = _run_key(request)
    body = await _body(request, allow_empty=True)
    await request.app[STORE].heartbeat_run(flow, run_id, now=_opt_number(body, "now"))
    return web.Response(status=204)


async def patch_tags(request: web.Request) -> web.Response:
    """Add then remove user tags."""
    flow, run_id = _run_key(request)
    body = await _body(request)
    add = _list(body.get("add"), "add", _tag)
    remove = _list(body.get("remove"), "remove", _tag)
    store = request.app[STORE]
    if remove:
        if add:
            await store.add_tags(flow, run_id, add)
        run = await store.remove_tags(flow, run_id, remove)
    else:
        run = await store.add_tags(flow, run_id, add)
    return web.json_response(run.to_dict())


# --------------------------------------------------------------------- tasks
async def list_tasks(request: web.Request) -> web.Response:
    """Every task of a run, or of one of its steps, with attempts."""
    flow, run_id = _run_key(request)
    step = request.match_info.get("step")
    if step is not None:
        step = _name("step", step, layout.check_step)
    tasks = await request.app[STORE].list_tasks(flow, run_id, step=step)
    return web.json_response({"tasks": [t.to_dict() for t in tasks]})


async def record_task(request: web.Request) -> web.Response:
    """A task exists (pending); idempotent."""
    key = _task_key(request)
    body = await _body(request, allow_empty=True)
    foreach_index = _list(body.get("foreach_index"), "foreach_index", lambda v, w: _int(v, w, 0, _INT32))
    parents = _list(body.get("parents"), "parents", lambda v, w: _text(v, w, max_len=2 * layout.MAX_ID_LENGTH + 1))
    await request.app[STORE].record_task(*key, foreach_index=foreach_index, parents=parents,
                                         origin=_opt_text(body, "origin", max_len=MAX_MESSAGE),
                                         now=_opt_number(body, "now"))
    return web.Response(status=204)


async def get_task(request: web.Request) -> web.Response:
    """One task with its attempts."""
    return web.json_response((await request.app[STORE].get_task(*_task_key(request))).to_dict())


async def put_attempt(request: web.Request) -> web.Response:
    """Create or update an attempt."""
    key = _task_key(request)
    number = _attempt_no(request.match_info["attempt"])
    body = await _body(request)
    if "attempt" in body and body["attempt"] != number:
        raise _bad("the body's attempt differs from the path's")
    status = body.get("status")
    if status not in TASK_STATUSES:
        raise _bad(f"status must be one of {', '.join(TASK_STATUSES)}", "bad_status")
    exit_code = body.get("exit_code")
    if exit_code is not None:
        exit_code = _int(exit_code, "exit_code", -_INT32 - 1, _INT32)
    handle = body.get("handle")
    if handle is not None and not isinstance(handle, dict):
        raise _bad("handle must be an object", "wrong_type")
    attempt = AttemptRecord(attempt=number, status=status, started_at=_opt_number(body, "started_at"),
                            finished_at=_opt_number(body, "finished_at"), exit_code=exit_code,
                            message=_opt_text(body, "message", max_len=MAX_MESSAGE),
                            handle=_json_safe(handle, "handle"))
    await request.app[STORE].record_attempt(*key, attempt)
    return web.Response(status=204)


def _artifact(value: Any, what: str) -> ArtifactRecord:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be an object", "wrong_type")
    return ArtifactRecord(name=_text(value.get("name"), f"{what}.name", max_len=MAX_TEXT),
                          sha=_text(value.get("sha"), f"{what}.sha", max_len=MAX_TEXT),
                          size=_int(value.get("size"), f"{what}.size", 0, _INT63),
                          type_name=_text(value.get("type_name"), f"{what}.type_name", max_len=MAX_MESSAGE))


async def put_artifacts(request: web.Request) -> web.Response:
    """The artifact index of an attempt; idempotent."""
    key = _task_key(request)
    number = _attempt_no(request.match_info["attempt"])
    body = await _body(request)
    artifacts = _list(body.get("artifacts"), "artifacts", _artifact)
    if len({a.name for a in artifacts}) != len(artifacts):
        raise _bad("artifact names must be unique within an attempt")
    await request.app[STORE].record_artifacts(*key, number, artifacts)
    return web.Response(status=204)


async def get_artifacts(request: web.Request) -> web.Response:
    """The artifacts of an attempt (default: the successful one, else the latest)."""
    key = _task_key(request)
    raw = request.match_info.get("attempt", request.query.get("attempt"))
    number = None if raw is None or raw == "" else _attempt_no(raw)
    artifacts = await request.app[STORE].get_artifacts(*key, number)
    return web.json_response({"artifacts": [a.to_dict() for a in artifacts]})


async def patch_metadata(request: web.Request) -> web.Response:
    """Merge string fields into a task's metadata."""
    key = _task_key(request)
    body = await _body(request)
    fields = body.get("fields")
    if not isinstance(fields, dict):
        raise _bad("fields must be an object", "wrong_type")
    if len(fields) > MAX_ITEMS:
        raise _bad(f"at most {MAX_ITEMS} fields per request")
    clean = {_text(k, "field name"): _text(v, f"fields.{k}", max_len=MAX_MESSAGE, empty=True)
             for k, v in fields.items()}
    await request.app[STORE].set_metadata(*key, clean)
    return web.Response(status=204)


async def get_metadata(request: web.Request) -> web.Response:
    """A task's metadata fields."""
    return web.json_response({"fields": await request.app[STORE].get_metadata(*_task_key(request))})


def add_routes(app: web.Application) -> None:
    """Every route of the API."""
    r = "/v1/flows/{flow}/runs/{run_id}"
    t = r + "/steps/{step}/tasks/{task_id}"
    add = app.router.add_route
    add("GET", "/v1/health", health)
    add("GET", "/v1/version", version)
    add("GET", "/v1/flows", list_flows)
    add("GET", "/v1/runs", list_runs)
    add("GET", "/v1/flows/{flow}/runs", list_runs)
    add("POST", "/v1/flows/{flow}/runs", create_run)
    add("GET", r, get_run)
    add("POST", r + "/finish", finish_run)
    add("POST", r + "/heartbeat", heartbeat_run)
    add("PATCH", r + "/tags", patch_tags)
    add("GET", r + "/tasks", list_tasks)
    add("GET", r + "/steps/{step}/tasks", list_tasks)
    add("PUT", t, record_task)
    add("GET", t, get_task)
    add("PUT", t + "/attempts/{attempt}", put_attempt)
    add("PUT", t + "/attempts/{attempt}/artifacts", put_artifacts)
    add("GET", t + "/attempts/{attempt}/artifacts", get_artifacts)
    add("GET", t + "/artifacts", get_artifacts)
    add("PATCH", t + "/metadata", patch_metadata)
    add("GET", t + "/metadata", get_metadata)
