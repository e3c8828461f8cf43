"""DaemonClient against a real Unix socket and real HTTP parsing, with canned answers."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from millstream.client.http import DaemonClient, DaemonNotRunning, DaemonUnavailable, api_path
from millstream.errors import ApiError
from tests.client.conftest import CHUNKED_HEAD, LAST_CHUNK, CannedServer, chunk


def test_api_path_quotes_segments_and_drops_unset_query() -> None:
    assert api_path("runs", "Flow", 5, "events", since=0, follow=True, cursor=None) == \
        "/v1/runs/Flow/5/events?since=0&follow=1"
    assert api_path("runs", "a/b") == "/v1/runs/a%2Fb"


def test_request_returns_status_and_json(server: CannedServer) -> None:
    server.add_json("POST", "/v1/runs", 201, b'{"flow": "F", "run_id": "5"}')
    status, body = DaemonClient(server.socket_path).request("POST", "/v1/runs", json_body={"a": 1})
    assert (status, body) == (201, {"flow": "F", "run_id": "5"})
    sent = server.requests[0]
    assert json.loads(sent["body"]) == {"a": 1}
    assert sent["headers"]["content-type"] == "application/json"


def test_raw_body_is_sent_as_is(server: CannedServer) -> None:
    server.add_json("PUT", "/v1/packages/abc", 201, b'{"sha": "abc"}')
    DaemonClient(server.socket_path).request("PUT", "/v1/packages/abc", body=b"\x1f\x8b raw",
                                             headers={"Content-Type": "application/gzip"})
    assert server.requests[0]["body"] == b"\x1f\x8b raw"
    assert server.requests[0]["headers"]["content-type"] == "application/gzip"


def test_error_json_becomes_api_error(server: CannedServer) -> None:
    server.add_json("GET", "/v1/runs/F/9", 404, b'{"error": "not_found", "message": "no run F/9"}')
    with pytest.raises(ApiError) as info:
        DaemonClient(server.socket_path).request("GET", "/v1/runs/F/9")
    assert (info.value.status, info.value.code, info.value.message) == (404, "not_found", "no run F/9")


def test_error_without_json_keeps_status_and_text(server: CannedServer) -> None:
    server.add("GET", "/v1/x", b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 7\r\n\r\nupstrm!")
    with pytest.raises(ApiError) as info:
        DaemonClient(server.socket_path).request("GET", "/v1/x")
    assert (info.value.status, info.value.code, info.value.message) == (502, "http_502", "upstrm!")


def test_head_404_is_an_api_error(server: CannedServer) -> None:
    server.add("HEAD", "/v1/packages/abc", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ApiError) as info:
        DaemonClient(server.socket_path).request("HEAD", "/v1/packages/abc")
    assert info.value.status == 404


def test_invalid_json_is_a_bad_response(server: CannedServer) -> None:
    server.add_json("GET", "/v1/health", 200, b"{nope")
    with pytest.raises(ApiError, match="invalid JSON"):
        DaemonClient(server.socket_path).request("GET", "/v1/health")


def test_ndjson_lines_arrive_before_the_response_ends(server: CannedServer) -> None:
    gate = threading.Event()
    first = b'{"seq": 0, "event": "run_started"}\n{"seq": 1, "ev'
    rest = b'ent": "log"}\n\n{"seq": 2, "event": "run_finished"}'  # last line without newline
    server.add("GET", "/v1/runs/F/1/events?follow=1", CHUNKED_HEAD, chunk(first), gate,
               chunk(rest), LAST_CHUNK)
    stream = DaemonClient(server.socket_path).stream_ndjson("/v1/runs/F/1/events?follow=1")
    assert next(stream) == {"seq": 0, "event": "run_started"}
    gate.set()  # only now does the server send the rest
    assert [e["seq"] for e in stream] == [1, 2]
    assert server.waited == [True]


def test_stream_bytes_yields_chunks(server: CannedServer) -> None:
    server.add("GET", "/v1/logs", CHUNKED_HEAD, chunk(b"hello\n"), chunk(b"world\n"), LAST_CHUNK)
    data = b"".join(DaemonClient(server.socket_path).stream_bytes("/v1/logs"))
    assert data == b"hello\nworld\n"


def test_stream_error_status_raises_before_any_data(server: CannedServer) -> None:
    server.add_json("GET", "/v1/logs", 404, b'{"error": "not_found", "message": "no such task"}')
    with pytest.raises(ApiError, match="no such task"):
        list(DaemonClient(server.socket_path).stream_bytes("/v1/logs"))


def test_stream_cut_short_is_daemon_unavailable(server: CannedServer) -> None:
    server.add("GET", "/v1/ev", CHUNKED_HEAD, chunk(b'{"seq": 0}\n'))  # then the connection closes
    events = []
    with pytest.raises(DaemonUnavailable):
        for event in DaemonClient(server.socket_path).stream_ndjson("/v1/ev"):
            events.append(event)
    assert events == [{"seq": 0}]


def test_health_answers(server: CannedServer) -> None:
    server.add_json("GET", "/v1/health", 200, b'{"status": "ok", "pid": 7, "version": "0", "active_runs": 0}')
    assert DaemonClient(server.socket_path).health() == {"status": "ok", "pid": 7, "version": "0",
                                                         "active_runs": 0}


def test_health_is_none_without_a_socket(short_dir: Path) -> None:
    assert DaemonClient(short_dir / "missing.sock").health() is None


def test_health_is_none_on_a_stale_socket(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # bound but never listening: connections are refused
    try:
        assert DaemonClient(path).health() is None
        with pytest.raises(DaemonNotRunning, match="no millstream daemon answers"):
            DaemonClient(path).request("GET", "/v1/runs")
    finally:
        sock.close()


def test_timeout_is_daemon_unavailable(short_dir: Path) -> None:
    path = short_dir / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # accepts, never answers
    try:
        with pytest.raises(DaemonUnavailable, match="timed out"):
            DaemonClient(path, timeout_s=0.1).request("GET", "/v1/health")
    finally:
        listener.close()
