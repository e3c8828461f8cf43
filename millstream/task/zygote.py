"""A warm per-code-package process that forks task attempts.

Metaflow starts a fresh interpreter per task, which re-imports Python, the flow and
its libraries every time. The zygote imports them once and forks a child per
attempt, so an attempt starts in about a millisecond. With an S3 datastore it also loads
the S3 client machinery once, before the first fork that needs it (~0.6 s saved per
attempt).

Protocol, JSON lines on stdin/stdout:

    -> {"op": "launch", "id": ID, "spec": {...}, "stdout": PATH, "stderr": PATH}
    <- {"ready": true, "fork_safe": BOOL}            once, after importing the flow
    <- {"id": ID, "pid": PID}                        the child is running
    <- {"id": ID, "pid": PID, "exit": CODE}          the child ended
    <- {"id": ID, "error": MESSAGE}                  the child could not be started

Each child calls ``setsid`` so it has its own session and process group: it outlives
the daemon and the zygote, and a timeout kills the whole group. The zygote exits
when its stdin closes; running children carry on.

Forking is unsafe once a process runs threads (a lock held by another thread stays
held forever in the child). If importing the flow started threads, the zygote says
``fork_safe: false`` and the daemon runs that code package's attempts in fresh
interpreters instead (``python -m millstream.task``), as it does when
``local.fork = false`` is configured.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
import signal
import sys
import threading
import traceback
from typing import Any


def _emit(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def _child(request: dict[str, Any], flow_cls: type) -> int:
    from millstream.task.runner import run_spec
    from millstream.task.spec import TaskSpec

    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)  # noqa: SIM115
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True)  # noqa: SIM115
    env = request.get("env")
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    return run_spec(TaskSpec.from_dict(request["spec"]), flow_cls)


def _preload_s3() -> bool:
    """Warm the S3 client machinery once, before the first fork that needs it."""
    try:
        from millstream.datastore import s3

        s3.preload()
    except Exception:
        # A child that cannot open S3 says so in its own stderr; the zygote goes on.
        traceback.print_exc()
    return True


def main() -> int:
    """Import the flow named on the command line, then serve launch requests."""
    package_dir, module_file, class_name = sys.argv[1:4]
    stdin = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    # Children must not inherit our stdout (the pipe to the daemon).
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    try:
        # Import once here what every child needs, so a fork starts with it loaded.
        from millstream.datastore import local  # noqa: F401
        from millstream.task import runner

        flow_cls = runner.load_flow_class(package_dir, module_file, class_name)
    except BaseException:
        _emit(out, {"ready": False, "error": traceback.format_exc()})
        return 1
    fork_safe = threading.active_count() == 1
    _emit(out, {"ready": True, "fork_safe": fork_safe})
    if not fork_safe:
        return 0

    children: dict[int, Any] = {}
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    os.set_blocking(rfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ, "stdin")
    sel.register(rfd, selectors.EVENT_READ, "signal")
    buffer = b""
    open_input = True
    s3_loaded = False
    while open_input or children:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "signal":
                with contextlib.suppress(BlockingIOError):
                    os.read(rfd, 4096)
                continue
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                open_input = False
                sel.unregister(stdin)
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                if not s3_loaded and request["spec"].get("datastore", {}).get("type") == "s3":
                    s3_loaded = _preload_s3()
                try:
                    pid = os.fork()
                except OSError as exc:
                    _emit(out, {"id": request["id"], "error": str(exc)})
                    continue
                if pid == 0:
                    code = 2
                    try:
                        sel.close()
                        os.close(rfd)
                        os.close(wfd)
                        out.close()
                        code = _child(request, flow_cls)
                    except BaseException:
                        traceback.print_exc()
                    finally:
                        os._exit(code)
                children[pid] = request["id"]
                _emit(out, {"id": request["id"], "pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ident = children.pop(pid, None)
            if ident is not None:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    _emit(out, {"id": ident, "pid": pid, "exit": os.waitstatus_to_exitcode(status)})
        if not open_input:
            # The daemon is gone: leave the running children to themselves.
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
