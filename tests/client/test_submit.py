"""Building the POST /v1/runs body: parameters, --with, the code package; and sending it."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from millstream.client.http import DaemonClient
from millstream.client.loader import load_flow
from millstream.client.submit import build_submission, decode_value, encode_value, submit
from millstream.errors import FlowError, FlowValidationError, ParameterError
from tests.client.conftest import CannedServer

ENV = {"HOME": "/nowhere", "ONLY": "this"}


def build(flow_cls: type, raw: dict[str, str | None] | None = None, **kwargs: Any) -> tuple[dict[str, Any], bytes]:
    options: dict[str, Any] = {"max_workers": 4, "max_num_splits": 10, "username": "alice", "env": ENV}
    options.update(kwargs)
    return build_submission(flow_cls, raw or {}, **options)


def write_flow(tmp_path: Path, stem: str, body: str) -> type:
    path = tmp_path / f"{stem}.py"
    path.write_text(body)
    return load_flow(path)


def test_body_of_a_run(example: Any) -> None:
    body, package = build(example("hello"), tags=["x"], with_specs=["retry:times=2"])
    assert body["flow"] == "HelloFlow"
    assert body["class_name"] == "HelloFlow"
    assert body["module_file"] == "hello.py"
    assert body["python"] == sys.executable
    assert body["env"] == ENV
    assert body["params"] == {}
    assert body["options"] == {"max_workers": 4, "max_num_splits": 10, "tags": ["x"],
                               "with": ["retry:times=2"], "cwd": os.getcwd()}
    assert list(body["graph"]["steps"]) == ["start", "greet", "end"]
    assert len(body["package"]) == 64 and package[:2] == b"\x1f\x8b"
    json.dumps(body)  # all of it travels as JSON


def test_package_is_stable_across_builds(example: Any) -> None:
    first, data = build(example("hello"))
    second, again = build(example("hello"))
    assert first["package"] == second["package"]
    assert data == again


def test_parameters_resolve_from_command_line_and_defaults(example: Any) -> None:
    body, _ = build(example("parameters"), {"alpha": "0.25", "verbose": "true", "config": '{"k": [1]}'})
    assert body["params"] == {"alpha": 0.25, "epochs": 3, "verbose": True, "config": {"k": [1]},
                              "greeting": "hello from alice"}


def test_with_adds_decorators_except_where_a_step_has_one(example: Any) -> None:
    body, _ = build(example("nested_foreach"), with_specs=["retry:times=4", "timeout:seconds=60"])
    steps = body["graph"]["steps"]
    retries = {name: [d["attributes"]["times"] for d in s["decorators"] if d["name"] == "retry"]
               for name, s in steps.items()}
    assert retries["fit"] == [1]  # its own @retry(times=1) wins
    assert all(times == [4] for name, times in retries.items() if name != "fit")
    assert all(any(d["name"] == "timeout" for d in s["decorators"]) for s in steps.values())


def test_bad_with_spec(example: Any) -> None:
    with pytest.raises(FlowError, match="unknown decorator 'nope'"):
        build(example("hello"), with_specs=["nope:x=1"])


def test_bad_value_names_the_parameter(example: Any) -> None:
    with pytest.raises(ParameterError, match="Parameter 'alpha': 'fast' is not a float"):
        build(example("parameters"), {"alpha": "fast"})
    with pytest.raises(ParameterError, match="Parameter 'config': not valid JSON"):
        build(example("parameters"), {"config": "{"})


def test_unknown_parameter(example: Any) -> None:
    with pytest.raises(ParameterError, match="no parameter beta; it has --alpha"):
        build(example("parameters"), {"beta": "1"})


FLOW_WITH_PARAMS = '''
from millstream import FlowSpec, IncludeFile, Parameter, step


def broken_default(context):
    raise RuntimeError("no network")


class {name}(FlowSpec):
    """Parameters that go wrong."""

    size = Parameter("size", type=int, required=True)
    lazy = Parameter("lazy", default=broken_default)
    blob = IncludeFile("blob", is_text=False)

    @step
    def start(self):
        """Only step."""
        self.next(self.end)

    @step
    def end(self):
        """Done."""
'''


def test_required_and_failing_defaults(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, "submit_params_flow", FLOW_WITH_PARAMS.format(name="ParamsFlow"))
    with pytest.raises(ParameterError, match="Parameter 'size' is required: pass --size VALUE"):
        build(flow, {"lazy": "x"})
    with pytest.raises(ParameterError, match="Parameter 'lazy': computing its default failed: "
                                             "RuntimeError: no network"):
        build(flow, {"size": "3"})


def test_binary_include_file_travels_as_base64(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, "submit_blob_flow", FLOW_WITH_PARAMS.format(name="BlobFlow"))
    (tmp_path / "data.bin").write_bytes(b"\x00\xffbin")
    body, _ = build(flow, {"size": "3", "lazy": "x", "blob": str(tmp_path / "data.bin")})
    assert body["params"]["blob"] == {"__bytes__": base64.b64encode(b"\x00\xffbin").decode()}
    assert decode_value(body["params"]["blob"]) == b"\x00\xffbin"
    assert decode_value(encode_value([b"a", "b"])) == [b"a", "b"]


def test_an_invalid_flow_raises_its_first_problem(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, "submit_broken_flow", '''
from millstream import FlowSpec, step


class SubmitBrokenFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.nowhere)
''')
    with pytest.raises(FlowValidationError, match=r"submit_broken_flow.py:5: flow SubmitBrokenFlow has no 'end' step"):
        build(flow)


def test_submit_uploads_a_missing_package_then_posts(server: CannedServer) -> None:
    server.add("HEAD", "/v1/packages/abc", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    server.add_json("PUT", "/v1/packages/abc", 201, b'{"sha": "abc"}')
    server.add_json("POST", "/v1/runs", 201, b'{"flow": "F", "run_id": "1", "pathspec": "F/1", "owner": "a"}')
    answer = submit(DaemonClient(server.socket_path), {"flow": "F", "package": "abc"}, b"tgz")
    assert answer["run_id"] == "1"
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("HEAD", "/v1/packages/abc"), ("PUT", "/v1/packages/abc"), ("POST", "/v1/runs")]
    assert server.requests[1]["body"] == b"tgz"
    assert json.loads(server.requests[2]["body"]) == {"flow": "F", "package": "abc"}


def test_submit_skips_a_package_the_daemon_has(server: CannedServer) -> None:
    server.add("HEAD", "/v1/packages/abc", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    server.add_json("POST", "/v1/runs", 201, b'{"flow": "F", "run_id": "2"}')
    submit(DaemonClient(server.socket_path), {"flow": "F", "package": "abc"}, b"tgz")
    assert [r["method"] for r in server.requests] == ["HEAD", "POST"]
