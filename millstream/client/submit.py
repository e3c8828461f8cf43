"""Turn a flow class and a command line into a run request, and send it.

Everything that runs user code happens here, in the client: parameter defaults
computed by functions, ``IncludeFile`` reads and JSON parsing. The daemon receives
plain JSON values and never imports the flow.

Parameter values travel as JSON. The one value JSON cannot hold, the ``bytes`` of an
``IncludeFile(is_text=False)``, is sent as ``{"__bytes__": "<base64>"}`` (inside lists
too, for a parameter with a ``separator``). :func:`decode_value` turns it back; whatever
hands the values to a flow must apply it first.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from millstream.client.http import DaemonClient, api_path
from millstream.client.loader import flow_file
from millstream.errors import ApiError, FlowError, ParameterError
from millstream.flow.decorators import parse_with_spec
from millstream.flow.graph import FlowGraph
from millstream.flow.parameters import ParameterContext, decode_value, encode_value  # noqa: F401 - decode_value is public here too


def resolve_parameters(graph: FlowGraph, raw_params: Mapping[str, str | None], *,
                       username: str, ds_type: str = "local",
                       logger: Callable[..., None] | None = None) -> dict[str, Any]:
    """Every parameter's JSON-ready value, from the command line or its default."""
    by_name = {p.name: p for p in graph.parameters}
    unknown = sorted(set(raw_params) - set(by_name))
    if unknown:
        known = ", ".join(f"--{n}" for n in by_name) or "none"
        raise ParameterError(f"flow {graph.name} has no parameter {', '.join(unknown)}; it has {known}")
    values: dict[str, Any] = {}
    for name, param in by_name.items():
        context = ParameterContext(flow_name=graph.name, user_name=username, parameter_name=name,
                                   logger=logger or _log, ds_type=ds_type)
        try:
            value = param.resolve(raw_params.get(name), context)
        except ParameterError:
            raise
        except Exception as exc:
            # A default function is user code; name the parameter it failed for.
            raise ParameterError(
                f"Parameter {name!r}: computing its default failed: {type(exc).__name__}: {exc}"
            ) from exc
        value = encode_value(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"Parameter {name!r}: its value is not JSON-serialisable: {exc}") from None
        values[name] = value
    return values


def apply_with_specs(graph_dict: dict[str, Any], with_specs: Sequence[str]) -> None:
    """Add each ``--with`` decorator to every step that does not already have one of its name."""
    for spec in with_specs:
        try:
            deco = parse_with_spec(spec).to_dict()
        except ValueError as exc:
            raise FlowError(str(exc)) from None
        for step in graph_dict["steps"].values():
            if not any(d["name"] == deco["name"] for d in step["decorators"]):
                step["decorators"].append(dict(deco, attributes=dict(deco["attributes"])))


def build_submission(flow_cls: type, raw_params: Mapping[str, str | None], *,
                     with_specs: Sequence[str] = (), tags: Sequence[str] = (),
                     max_workers: int, max_num_splits: int, username: str,
                     env: Mapping[str, str], ds_type: str = "local",
                     graph: FlowGraph | None = None,
                     python: str = sys.executable,
                     resume: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], bytes]:
    """The ``POST /v1/runs`` body for a run of ``flow_cls``, and its code package's bytes.

    With ``resume`` (``{"origin_run_id": id or None, "step": name or None}``) the run
    resumes an earlier one, whose parameter values the daemon reuses, as Metaflow does.
    """
    # The datastore package is imported on first use so that check and show stay fast.
    from millstream.datastore.package import build_package

    graph = graph or FlowGraph(flow_cls)
    graph.validate()
    for tag in tags:
        if not tag.strip() or len(tag) > 512:
            raise FlowError(f"tag {tag!r} must be non-empty and at most 512 characters")
    if max_workers < 1 or max_num_splits < 1:
        raise FlowError("--max-workers and --max-num-splits must be at least 1")
    graph_dict = graph.to_dict()
    apply_with_specs(graph_dict, with_specs)
    params = {} if resume is not None else resolve_parameters(graph, raw_params, username=username,
                                                               ds_type=ds_type)
    path = flow_file(flow_cls)
    sha, package = build_package(path.parent)
    body = {
        "flow": graph.name,
        "graph": graph_dict,
        "params": params,
        "package": sha,
        "module_file": path.name,
        "class_name": flow_cls.__name__,
        "python": python,
        "env": dict(env),
        "options": {
            "max_workers": max_workers,
            "max_num_splits": max_num_splits,
            "tags": list(tags),
            "with": list(with_specs),
            "cwd": os.getcwd(),
        },
    }
    if resume is not None:
        body["options"]["resume"] = dict(resume)  # type: ignore[index]
    return body, package


def upload_package(client: DaemonClient, sha: str, package_bytes: bytes) -> None:
    """Upload a code package unless the daemon already has it."""
    try:
        client.request("HEAD", api_path("packages", sha))
    except ApiError as exc:
        if exc.status != 404:
            raise
        client.request("PUT", api_path("packages", sha), body=package_bytes,
                       headers={"Content-Type": "application/gzip"})


def submit(client: DaemonClient, submission: Mapping[str, Any], package_bytes: bytes) -> dict[str, Any]:
    """Upload the code package unless the daemon has it, then start the run; the daemon's answer."""
    upload_package(client, str(submission["package"]), package_bytes)
    return client.request("POST", api_path("runs"), json_body=dict(submission))[1]


def _log(*args: Any, **_kwargs: Any) -> None:
    # What a default function's context.logger prints: to stderr, like Metaflow's echo.
    print(*args, file=sys.stderr)


def current_username(env: Mapping[str, str]) -> str:
    """The caller's OS account, the same name the daemon reads from the socket's peer."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return env.get("USER") or env.get("LOGNAME") or str(os.getuid())
