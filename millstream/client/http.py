"""The daemon's HTTP API over its Unix socket, with nothing but the standard library.

``python flow.py run`` must start fast, so this client is ``http.client`` with a
connection class that dials an ``AF_UNIX`` socket instead of TCP; aiohttp stays on the
daemon's side. Every request opens its own connection: on a local socket that costs
microseconds and means no pooled connection can go stale while a run is followed.

Errors map onto the project's tree in one place (:meth:`DaemonClient._send`):

    ApiError                    the daemon answered 4xx/5xx (its ``error`` code and message)
    └── DaemonUnavailable       nothing usable answered: timeout, reset, cut-off stream
        └── DaemonNotRunning    nothing listens on the socket (missing or refused)
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from millstream.errors import ApiError

API_PREFIX = "/v1"
DEFAULT_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 2.0
_READ_CHUNK_BYTES = 64 * 1024


class DaemonUnavailable(ApiError):
    """The daemon did not answer usefully: it timed out, reset or cut a stream short."""

    code_name: ClassVar[str] = "daemon_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(503, self.code_name, message)


class DaemonNotRunning(DaemonUnavailable):
    """No daemon listens on the socket: the file is missing or refuses connections."""

    code_name: ClassVar[str] = "daemon_not_running"


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose transport is a Unix stream socket."""

    def __init__(self, socket_path: str, timeout_s: float | None) -> None:
        # The host only fills the Host header; the socket path decides where we connect.
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = socket_path

    def connect(self) -> None:
        """Dial the Unix socket instead of a TCP address."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def api_path(*segments: str | int, **query: str | int | float | bool | None) -> str:
    """``/v1/<segments>?<query>`` with each segment quoted and ``None`` values dropped."""
    path = API_PREFIX + "".join("/" + quote(str(s), safe="") for s in segments)
    params = {k: _query_value(v) for k, v in query.items() if v is not None}
    return f"{path}?{urlencode(params)}" if params else path


def _query_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class DaemonClient:
    """A synchronous client of the daemon API on one Unix socket."""

    def __init__(self, socket_path: str | os.PathLike[str],
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"DaemonClient({self.socket_path!r})"

    # ----------------------------------------------------------------- requests
    def request(self, method: str, path: str, json_body: Any = None, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """Send one request and return ``(status, decoded JSON body)``; raise ApiError on 4xx/5xx."""
        send_headers = {"Accept": "application/json", **(headers or {})}
        if json_body is not None:
            if body is not None:
                raise ValueError("pass json_body or body, not both")
            body = json.dumps(json_body).encode("utf-8")
            send_headers.setdefault("Content-Type", "application/json")
        conn, response = self._send(method, path, body, send_headers, self.timeout_s)
        try:
            raw = self._read_all(response)
        finally:
            conn.close()
        if response.status >= 400:
            raise _api_error(response, raw)
        return response.status, _decode_object(response.status, raw)

    def stream_bytes(self, path: str, *, idle_timeout_s: float | None = None) -> Iterator[bytes]:
        """Yield the body of a GET as it arrives; ``idle_timeout_s=None`` waits forever between chunks."""
        conn, response = self._send("GET", path, None, {"Accept": "*/*"}, self.timeout_s)
        try:
            if response.status >= 400:
                raise _api_error(response, self._read_all(response))
            # Headers came back in time; from here a followed stream may be quiet for as
            # long as a task prints nothing, so the per-read limit changes.
            if conn.sock is not None:
                conn.sock.settimeout(idle_timeout_s)
            while True:
                try:
                    chunk = response.read1(_READ_CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise DaemonUnavailable(
                        f"the daemon on {self.socket_path} cut the stream {path} short: "
                        f"{_describe(exc)}") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            conn.close()

    def stream_ndjson(self, path: str, *, idle_timeout_s: float | None = None
                      ) -> Iterator[dict[str, Any]]:
        """Yield each JSON object of an NDJSON response as soon as its line is complete."""
        pending = b""
        for chunk in self.stream_bytes(path, idle_timeout_s=idle_timeout_s):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield _decode_line(path, line)
        if pending.strip():
            # A final line without its newline is still a whole object in NDJSON.
            yield _decode_line(path, pending)

    def health(self) -> dict[str, Any] | None:
        """The daemon's ``/v1/health``, or None when nothing listens on the socket."""
        probe = DaemonClient(self.socket_path, timeout_s=min(self.timeout_s, HEALTH_TIMEOUT_S))
        try:
            return probe.request("GET", api_path("health"))[1]
        except DaemonNotRunning:
            return None

    # ----------------------------------------------------------------- plumbing
    def _send(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str],
              timeout_s: float | None) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        conn = UnixHTTPConnection(self.socket_path, timeout_s)
        try:
            conn.request(method, path, body=body, headers=dict(headers))
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            raise DaemonNotRunning(
                f"no millstream daemon answers on {self.socket_path} ({_describe(exc)})") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DaemonUnavailable(
                f"the daemon on {self.socket_path} did not answer {method} {path}: "
                f"{_describe(exc)}") from exc

    def _read_all(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(
                f"the daemon on {self.socket_path} broke off its answer: {_describe(exc)}"
            ) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _api_error(response: http.client.HTTPResponse, raw: bytes) -> ApiError:
    """The daemon's ``{"error": code, "message": ...}``, or the best reading of a foreign body."""
    code, message = f"http_{response.status}", response.reason or "error"
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" in data:
        code = str(data["error"])
        message = str(data.get("message") or code)
    elif raw:
        message = raw.decode("utf-8", "replace").strip()[:500] or message
    return ApiError(response.status, code, message)


def _decode_object(status: int, raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}  # HEAD, 202 and 204 answers carry nothing
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(status, "bad_response", f"the daemon sent invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(status, "bad_response", "the daemon sent JSON that is not an object")
    return data


def _decode_line(path: str, line: bytes) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ApiError(200, "bad_response", f"invalid NDJSON line from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(200, "bad_response", f"NDJSON line from {path} is not an object")
    return data
