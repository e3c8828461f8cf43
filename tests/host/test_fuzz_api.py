"""Hostile input, generated: schemathesis fuzzes every operation of the daemon's own
OpenAPI document against a real daemon over its Unix socket.

Bounded (``MAX_EXAMPLES`` per operation and mode, no shrinking database), so the whole
module takes seconds. Asserted for every response: no 5xx; every error is JSON with
exactly ``error`` and ``message``; and afterwards the daemon is healthy and still runs
a flow.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode

from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import run_flow
from tests.host.conftest import Shared

MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
BASE_URL = "http://daemon"

# Code packages are sent as raw bytes, whatever bytes the fuzzer makes.
schemathesis.serializer.alias("application/gzip", "application/octet-stream")


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.path)
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("daemon")
        self.path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.path, host="daemon", port=None, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    """A requests transport that sends every request to one Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(path)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> urllib3.HTTPConnectionPool:
        """Always the socket's pool, whatever the URL says."""
        return self.pool

    def close(self) -> None:
        """Close the pool's connections."""
        self.pool.close()
        super().close()


@pytest.fixture(scope="module")
def fuzzed(shared: Shared) -> Iterator[tuple[Daemon, requests.Session]]:
    """The module's daemon (each operation's fuzzing reuses it), and a session to it."""
    shared.daemon.env["FUZZ_RUN_ID"] = shared.run_id
    with requests.Session() as session:
        session.mount("http://", UnixAdapter(shared.daemon.socket))
        yield shared.daemon, session


def _schema() -> Any:
    from millstream.daemon.openapi import OPENAPI

    return schemathesis.openapi.from_dict(copy.deepcopy(OPENAPI))


def _operations() -> list[str]:
    return [result.ok().label for result in _schema().get_all_operations()]


def _can_be_invalid(label: str, *, fixed_path: bool) -> bool:
    """Whether an operation has an input a negative case can break: a body, a query
    parameter, or (unless the path is fixed) a path parameter constrained beyond "any string"."""
    from millstream.daemon.openapi import OPENAPI

    method, path = label.split(" ", 1)
    item = OPENAPI["paths"][path]
    operation = item[method.lower()]
    if "requestBody" in operation:
        return True
    parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
    return any(p["in"] != "path" or (not fixed_path and set(p["schema"]) != {"type"}) for p in parameters)


def _cases(labels: list[str], *, fixed_path: bool = False) -> list[tuple[str, GenerationMode]]:
    """Every operation with positive cases; those with breakable inputs with negative ones too."""
    return [(label, GenerationMode.POSITIVE) for label in labels] + [
        (label, GenerationMode.NEGATIVE) for label in labels if _can_be_invalid(label, fixed_path=fixed_path)
    ]


def check_response(case: Any, response: Any) -> None:
    """What every answer to hostile input must look like (``response``: schemathesis's)."""
    where = f"{case.method} {case.formatted_path} query={case.query} body={str(case.body)[:200]!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400 and case.method.upper() != "HEAD":
        content_type = response.headers.get("content-type") or ""
        if isinstance(content_type, list):  # schemathesis's Response keeps every value
            content_type = content_type[0]
        assert content_type.startswith("application/json"), f"{where} -> {content_type}"
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error", "message"}, f"{where} -> {body}"
        assert isinstance(body["error"], str) and body["error"], where
        assert isinstance(body["message"], str) and body["message"], where


def _fuzz(session: requests.Session, label: str, mode: GenerationMode, **fixed: Any) -> list[int]:
    """Run ``MAX_EXAMPLES`` generated requests of one operation; returns their statuses."""
    operation = _schema().find_operation_by_label(label)
    if operation is None:
        raise AssertionError(f"no operation {label}")
    sent: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode, **fixed))
    def fuzz(case: Any) -> None:
        response = case.call(base_url=BASE_URL, session=session)
        sent.append(response.status_code)
        check_response(case, response)

    fuzz()
    assert sent
    if os.environ.get("FUZZ_REPORT"):
        print(label, mode, fixed, sorted(collections.Counter(sent).items()))
    return sent


@pytest.mark.parametrize(("label", "mode"), _cases(_operations()), ids=str)
def test_fuzz_operation(fuzzed: tuple[Daemon, requests.Session], label: str, mode: GenerationMode) -> None:
    _fuzz(fuzzed[1], label, mode)


@pytest.mark.parametrize(
    ("label", "mode"), _cases([label for label in _operations() if "{run_id}" in label], fixed_path=True), ids=str
)
def test_fuzz_the_queries_of_a_real_run(
    fuzzed: tuple[Daemon, requests.Session], label: str, mode: GenerationMode
) -> None:
    """The same, aimed at a run that exists, so queries reach the code behind the lookup."""
    d, session = fuzzed
    path = {"flow": "HelloFlow", "run_id": d.env["FUZZ_RUN_ID"]}
    if "{step}" in label:
        path |= {"step": "start", "task_id": "0"}
    _fuzz(session, label, mode, path_parameters=path)


# --------------------------------------------------------------------- past the first checks
def _uploaded(d: Daemon) -> str:
    """The examples' code package, uploaded; its sha."""
    from millstream.datastore.package import build_package

    sha, data = build_package(EXAMPLES)
    status, _ = d.request("PUT", f"/v1/packages/{sha}", raw=data, headers={"Content-Type": "application/gzip"})
    assert status in (200, 201)
    return sha


_CRON_FIELDS = st.sampled_from(
    [
        "*",
        "0",
        "5",
        "30",
        "31",
        "59",
        "60",
        "23",
        "24",
        "2",
        "12",
        "L",
        "1W",
        "?",
        "*/5",
        "*/0",
        "1-5",
        "5-1",
        "1#5",
        "MON",
        "jan",
        ",",
        "-",
        "0x1",
        "\x00",
        "٣",
    ]
)
_CRONS = st.one_of(
    st.builds(" ".join, st.lists(_CRON_FIELDS, min_size=5, max_size=5)),
    st.text(max_size=40),
    st.sampled_from(["0 0 30 2 *", "0 0 31 4,6,9,11 *", "* * * * *", "@daily", "0 0 29 2 *"]),
)
_NAMES = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.-]{1,300}", fullmatch=True), st.text(max_size=40), st.sampled_from(["..", ".x", "a/b"])
)
# Any JSON at all, NaN and Infinity included (Python's json module reads them).
_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _mostly(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Plausible values for every field, and now and then junk in one of them."""

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        values = {name: draw(strategy) for name, strategy in fields.items()}
        spoiled = draw(st.one_of(st.none(), st.none(), st.sampled_from(sorted(fields))))
        if spoiled is not None:
            values[spoiled] = draw(_JUNK)
        return values

    return build()


_SCHEDULE_FIELDS = _mostly(
    {
        "name": _NAMES,
        "cron": _CRONS,
        "timezone": st.sampled_from(["UTC", "Europe/Berlin", "../../etc/passwd", "", "Mars/Olympus"])
        | st.text(max_size=30),
        "catchup": st.sampled_from(["latest", "all", "none"]) | st.text(max_size=10),
        "triggers": st.lists(_NAMES, max_size=3),
    }
)
_SUBMISSION_FIELDS = _mostly(
    {
        # The real names twice as often: past the name checks is where the rest is.
        "flow": st.just("HelloFlow") | st.just("HelloFlow") | _NAMES,
        "module_file": st.just("hello.py")
        | st.just("hello.py")
        | st.sampled_from(["nope.py", ".py", "../hello.py", "hello.pyc"])
        | st.text(max_size=20),
        "class_name": st.just("HelloFlow") | st.sampled_from(["Nope", "os"]) | st.text(max_size=20),
        "params": st.dictionaries(st.text(max_size=10), _JUNK, max_size=3),
        "env": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=2),
        "options": st.fixed_dictionaries(
            {},
            optional={
                "max_workers": st.integers(-5, 20_000) | _JUNK,
                "max_num_splits": st.integers(-5, 2_000_000) | _JUNK,
                "tags": st.lists(st.text(max_size=300), max_size=3) | _JUNK,
                "cwd": st.sampled_from(["/", "/nonexistent", "relative"]) | _JUNK,
                "resume": st.fixed_dictionaries(
                    {}, optional={"origin_run_id": st.text(max_size=10) | _JUNK, "step": st.text(max_size=10) | _JUNK}
                )
                | _JUNK,
                "request_id": st.text(max_size=20) | _JUNK,
            },
        ),
    }
)
DEEP = settings(
    max_examples=MAX_EXAMPLES * 3,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
REPORT: collections.Counter[tuple[str, int, str]] = collections.Counter()


class _Sent:
    """What check_response needs to know of a hand-made request."""

    def __init__(self, method: str, path: str, body: Any) -> None:
        self.method, self.formatted_path, self.query, self.body = method, path, {}, body


def _post(session: requests.Session, path: str, body: Any) -> requests.Response:
    """POST ``body`` as JSON the way Python writes it (NaN and Infinity included), and check the answer."""
    response = session.post(
        f"{BASE_URL}{path}", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30
    )
    if os.environ.get("FUZZ_REPORT"):
        error = response.json().get("error", "") if response.status_code >= 400 else ""
        REPORT[(path, response.status_code, error)] += 1
    check_response(_Sent("POST", path, body), response)
    return response


def _uploaded(d: Daemon) -> str:
    """The examples' code package, uploaded; its sha."""
    from millstream.datastore.package import build_package

    sha, data = build_package(EXAMPLES)
    status, _ = d.request("PUT", f"/v1/packages/{sha}", raw=data, headers={"Content-Type": "application/gzip"})
    assert status in (200, 201)
    return sha


def test_fuzz_schedule_fields(fuzzed: tuple[Daemon, requests.Session]) -> None:
    """Cron, time zone, catch-up, name and triggers of a schedule whose submission is valid."""
    from tests.e2e.test_api_input import _submission

    d, session = fuzzed
    sha = _uploaded(d)
    made: set[str] = set()

    @DEEP
    @given(_SCHEDULE_FIELDS)
    def fuzz(fields: dict[str, Any]) -> None:
        response = _post(session, "/v1/schedules", {"submission": _submission(package=sha), **fields})
        if response.status_code == 201:
            name = response.json()["name"]
            made.add(name)
            # Paused at once: these test parsing, not HelloFlow every minute.
            assert session.post(f"{BASE_URL}/v1/schedules/{name}/pause", timeout=30).status_code == 200
        listing = session.get(f"{BASE_URL}/v1/schedules", timeout=30)
        assert listing.status_code == 200, f"the listing broke after {fields}: {listing.text[:300]}"

    try:
        fuzz()
    finally:
        for name in made:
            session.delete(f"{BASE_URL}/v1/schedules/{name}", timeout=30)
        if REPORT:
            print(sorted(REPORT.items()))
            REPORT.clear()


def test_fuzz_submissions_with_a_real_package(fuzzed: tuple[Daemon, requests.Session]) -> None:
    """Fields of a submission whose graph and package are real: a run may start, and must then end."""
    from tests.e2e.test_api_input import _submission

    d, session = fuzzed
    sha = _uploaded(d)
    started: list[str] = []

    @DEEP
    @given(_SUBMISSION_FIELDS)
    def fuzz(fields: dict[str, Any]) -> None:
        body = _submission(package=sha, **fields)
        if isinstance(fields["flow"], str):
            body["graph"]["flow"] = fields["flow"]  # type: ignore[index]
        response = _post(session, "/v1/runs", body)
        if response.status_code == 201:
            started.append(response.json()["pathspec"])

    fuzz()
    if REPORT:
        print(sorted(REPORT.items()))
        REPORT.clear()
    for pathspec in started:
        wait_until(lambda p=pathspec: d.request("GET", f"/v1/runs/{p}")[1]["status"] != "running", 60)


# --------------------------------------------------------------------- afterwards
def test_the_daemon_is_healthy_after_fuzzing(fuzzed: tuple[Daemon, requests.Session]) -> None:
    """Last in the module: after everything above, the daemon serves and runs flows."""
    d, _ = fuzzed
    assert d.proc is not None and d.proc.poll() is None
    status, health = d.request("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok"
    run_id, proc = run_flow(d, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert d.run_state("HelloFlow", run_id)["status"] == "ok"
    # Nothing failed out of sight either: no handler bug, no crashed driver task.
    log = d.logs[-1].read_text()
    assert "request_failed" not in log, log[-3000:]
    assert "task_crashed" not in log, log[-3000:]
