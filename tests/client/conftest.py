"""Fixtures of the client tests: the example flows, short socket paths and a canned server."""

from __future__ import annotations

import shutil
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millstream.client.loader import load_flow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def example() -> Any:
    """Load an example flow class by file stem: ``example("hello")``."""
    return lambda stem: load_flow(EXAMPLES / f"{stem}.py")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A scratch directory with a path short enough for a Unix socket (108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def utc() -> Iterator[None]:
    """Local time is UTC for the test, so rendered timestamps are fixed."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "UTC")
    time.tzset()
    yield
    mp.undo()
    time.tzset()


Piece = bytes | threading.Event


class CannedServer:
    """An HTTP/1.1 server on a Unix socket that answers each path with fixed bytes.

    A response is a list of pieces: bytes are written and flushed as they come, and a
    ``threading.Event`` makes the server wait until the test sets it, so a test can
    check that the client sees data before the response is complete.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = str(socket_path)
        self.responses: dict[tuple[str, str], list[list[Piece]]] = {}
        self.requests: list[dict[str, Any]] = []
        self.waited: list[bool] = []
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request_line = self.rfile.readline().decode("latin-1").strip()
                method, path, _ = request_line.split(" ", 2)
                headers: dict[str, str] = {}
                while (line := self.rfile.readline().decode("latin-1").strip()):
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = self.rfile.read(int(headers.get("content-length", "0")))
                server.requests.append({"method": method, "path": path, "headers": headers, "body": body})
                queue = server.responses.get((method, path)) or [[b"HTTP/1.1 599 Unexpected\r\n"
                                                                    b"Content-Length: 0\r\n\r\n"]]
                pieces = queue.pop(0) if len(queue) > 1 else queue[0]
                for piece in pieces:
                    if isinstance(piece, threading.Event):
                        server.waited.append(piece.wait(5))
                    else:
                        self.wfile.write(piece)
                        self.wfile.flush()

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self._server = Server(self.socket_path, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def add(self, method: str, path: str, *pieces: Piece) -> None:
        """Answer the next ``method path`` with these pieces (the last answer repeats)."""
        self.responses.setdefault((method, path), []).append(list(pieces))

    def add_json(self, method: str, path: str, status: int, body: bytes, reason: str = "X") -> None:
        """Answer with a complete JSON response."""
        self.add(method, path, f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
LAST_CHUNK = b"0\r\n\r\n"


@pytest.fixture
def server(short_dir: Path) -> Iterator[CannedServer]:
    """A canned HTTP server listening on a fresh Unix socket."""
    canned = CannedServer(short_dir / "d.sock")
    yield canned
    canned.close()
