"""One moto server per test process, shared by every test that needs AWS.

moto's in-process ``mock_aws`` does not work with aiobotocore, so tests talk HTTP to a
``ThreadedMotoServer`` on loopback. It is started on first use (about 0.3 s, plus a lazy
first call per service) and stopped at the end of the session; tests reset its state
with ``POST /moto-api/reset``. Starting it also installs dummy credentials in the
environment, so code under test uses the standard AWS credential chain unchanged.

This is a plain module rather than a conftest so that both ``tests/aws`` and the S3
backend of the datastore contract suite (``tests/datastore/conftest.py``) reach the
same server.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REGION = "us-east-1"

#: What the test session's environment holds while the server runs.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # Never ask an instance-metadata endpoint (1 s timeouts) or read a real profile.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass
class MotoServer:
    """A running ``ThreadedMotoServer`` and the helpers tests need around it."""

    host: str
    port: int
    _server: Any = field(repr=False)
    _saved_env: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        """The endpoint URL to give clients."""
        return f"http://{self.host}:{self.port}"

    def api(self, path: str, body: Any = None) -> Any:
        """POST (or GET without a body) to moto's ``/moto-api/PATH``."""
        data = json.dumps(body).encode() if body is not None else None
        method = "POST" if data is not None or path == "reset" else "GET"
        request = urllib.request.Request(f"{self.url}/moto-api/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def reset(self) -> None:
        """Forget every resource in every service."""
        self.api("reset")

    def configure(self, config: dict[str, Any]) -> Any:
        """``POST /moto-api/config``, e.g. ``{"batch": {"use_docker": False}}``."""
        return self.api("config", config)

    def create_bucket(self, name: str) -> None:
        """Create an S3 bucket (moto does not check signatures, so a bare PUT will do)."""
        request = urllib.request.Request(f"{self.url}/{name}", method="PUT", data=b"")
        with urllib.request.urlopen(request, timeout=30):
            pass

    def stop(self) -> None:
        """Stop the server and restore the environment it changed."""
        if self._server is None:
            return
        self._server.stop()
        self._server = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_lock = threading.Lock()
_shared: MotoServer | None = None


def shared_moto() -> MotoServer:
    """The process's moto server, started on first call."""
    global _shared  # noqa: PLW0603 - one server per process is the point
    with _lock:
        if _shared is None or _shared._server is None:
            _shared = _start()
            atexit.register(_shared.stop)
        return _shared


def stop_shared_moto() -> None:
    """Stop the shared server if it runs (the session fixture's teardown)."""
    with _lock:
        if _shared is not None:
            _shared.stop()


def _start() -> MotoServer:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # access log and 500 tracebacks
    _make_conditional_writes_atomic()
    saved: dict[str, str | None] = {name: os.environ.get(name) for name in (*DUMMY_AWS_ENV, *_UNSET,
                                                                            "MOTO_PORT")}
    for name in _UNSET:
        os.environ.pop(name, None)
    os.environ.update(DUMMY_AWS_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # Step Functions' interpreter calls back to localhost:$MOTO_PORT.
    os.environ["MOTO_PORT"] = str(port)
    return MotoServer(host, port, server, saved)


@functools.cache
def _make_conditional_writes_atomic() -> None:
    """Serialise moto's PutObject and CompleteMultipartUpload handlers.

    moto checks ``If-None-Match`` and then stores, without a lock, so two racing
    conditional writers can both succeed; S3 itself decides atomically. The lock makes
    the emulator keep S3's promise, so a race test checks our protocol, not moto's.
    """
    from moto.s3.responses import S3Response

    lock = threading.Lock()

    def serialised(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return method(*args, **kwargs)

        return wrapper

    S3Response.put_object = serialised(S3Response.put_object)  # type: ignore[method-assign]
    S3Response._key_response_post = serialised(  # type: ignore[method-assign]
        S3Response._key_response_post)
