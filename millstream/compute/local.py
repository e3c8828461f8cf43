"""Local task processes, forked from warm zygotes (see :mod:`millstream.task.zygote`).

One zygote per (code package, interpreter, environment) is started on first use and
kept while it is used; an idle one is retired after ``zygote_idle_s``. Where a zygote
reports that forking is unsafe, or ``fork`` is off, each attempt is a fresh
``python -u -m millstream.task SPEC`` in its own session.

Handles are ``{"pid", "proc_start", "pgid", "via"}``. ``proc_start`` (the process
start time in clock ticks from ``/proc/PID/stat``) guards against a recycled pid when
a restarted daemon re-attaches through a pidfd.

With ``run_as_owner`` (a daemon that may switch uids, see :mod:`millstream.compute.runas`)
zygotes and fresh task processes start as the run's owner, so a zygote is per owner
too: user code is imported as its user, never as the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from millstream.compute.base import ExitReason, LaunchRequest
from millstream.compute.runas import TaskUser
from millstream.errors import ComputeError

log = structlog.get_logger(__name__)


def proc_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


@dataclass
class _Zygote:
    key: str
    proc: asyncio.subprocess.Process
    fork_safe: bool
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    exits: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    last_used: float = 0.0
    running: int = 0


class LocalBackend:
    """Runs attempts as local processes; see the module docstring."""

    def __init__(
        self, *, fork: bool = True, spool_dir: Path, zygote_idle_s: float = 300.0, run_as_owner: bool = False
    ) -> None:
        self.fork = fork
        self.run_as_owner = run_as_owner
        self.spool_dir = spool_dir
        self.zygote_idle_s = zygote_idle_s
        self._zygotes: dict[str, _Zygote] = {}
        self._starting: dict[str, asyncio.Future[_Zygote]] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._exit_futures: dict[int, asyncio.Future[int]] = {}
        self._ids = 0
        self.launches_forked = 0
        self.launches_fresh = 0

    # ----------------------------------------------------------------- zygotes
    @staticmethod
    def _zygote_key(request: LaunchRequest) -> str:
        spec = request.spec
        digest = hashlib.sha256(
            json.dumps(
                [
                    spec.package_dir,
                    spec.module_file,
                    spec.class_name,
                    request.python,
                    sorted(request.env.items()),
                    request.cwd,
                    request.owner_uid,
                ]
            ).encode()
        ).hexdigest()
        return digest[:16]

    def _user(self, request: LaunchRequest) -> TaskUser | None:
        """The account to switch to, or None to run as the daemon's own."""
        uid = request.owner_uid
        if not self.run_as_owner or uid is None or uid < 0 or uid == os.geteuid():
            return None
        try:
            return TaskUser.of(uid)
        except KeyError:
            raise ComputeError(f"the run's owner, uid {uid}, has no account on this host", retryable=False) from None

    def _command(self, request: LaunchRequest, argv: list[str]) -> tuple[list[str], dict[str, str] | None, str]:
        """The argv, environment and working directory that start ``argv`` for ``request``."""
        user = self._user(request)
        if user is None:
            return argv, request.env or None, _cwd(request)
        # The switch enters the working directory itself, as the user: the daemon may
        # not be able to see into it (a home directory of mode 0700).
        wrapped = user.command(argv, cwd=request.cwd or "", fallback_cwd=request.spec.package_dir)
        return wrapped, user.environment(request.env), "/"

    async def _zygote(self, request: LaunchRequest) -> _Zygote:
        key = self._zygote_key(request)
        zyg = self._zygotes.get(key)
        if zyg is not None and zyg.proc.returncode is None:
            return zyg
        if key in self._starting:
            return await asyncio.shield(self._starting[key])
        fut: asyncio.Future[_Zygote] = asyncio.get_running_loop().create_future()
        self._starting[key] = fut
        try:
            zyg = await self._start_zygote(key, request)
            self._zygotes[key] = zyg
            fut.set_result(zyg)
            return zyg
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._starting[key]

    async def _start_zygote(self, key: str, request: LaunchRequest) -> _Zygote:
        spec = request.spec
        err = self.spool_dir / f"zygote-{key}.stderr"
        err.parent.mkdir(parents=True, exist_ok=True)
        argv, env, cwd = self._command(
            request,
            [request.python, "-m", "millstream.task.zygote", spec.package_dir, spec.module_file, spec.class_name],
        )
        with open(err, "ab") as err_file:
            proc = await _exec(
                request,
                argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err_file,
                env=env,
                cwd=cwd,
                limit=1 << 20,
            )
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        try:
            hello = json.loads(line) if line else {"ready": False, "error": "zygote exited"}
        except json.JSONDecodeError:
            hello = {"ready": False, "error": line.decode(errors="replace")}
        if not hello.get("ready"):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ComputeError(f"cannot import the flow: {hello.get('error', '')}".strip(), retryable=False)
        zyg = _Zygote(key=key, proc=proc, fork_safe=bool(hello.get("fork_safe")), last_used=time.monotonic())
        if zyg.fork_safe:
            zyg.reader = asyncio.create_task(self._read_zygote(zyg), name=f"zygote-{key}")
        else:
            log.info("zygote_not_fork_safe", zygote=key)
            await proc.wait()
        return zyg

    async def _read_zygote(self, zyg: _Zygote) -> None:
        assert zyg.proc.stdout is not None
        while True:
            line = await zyg.proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            ident = msg.get("id")
            if "exit" in msg:
                exited = zyg.exits.pop(ident, None) or self._exit_futures.get(msg["pid"])
                if exited is not None and not exited.done():
                    exited.set_result(int(msg["exit"]))
                zyg.running -= 1
            elif ident in zyg.pending:
                started = zyg.pending.pop(ident)
                if not started.done():  # the launcher may have been cancelled meanwhile
                    started.set_result(msg)
        # The zygote is gone: its children live on, watch them by pidfd instead.
        for started in zyg.pending.values():
            if not started.done():
                started.set_exception(ComputeError("the zygote exited before launching the attempt"))
        zyg.pending.clear()
        for exited in list(zyg.exits.values()):
            if not exited.done():
                exited.set_result(-1)
        zyg.exits.clear()

    # ----------------------------------------------------------------- launching
    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Start one attempt, forked from a zygote where possible."""
        for path in (request.stdout_path, request.stderr_path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if self.fork:
            zyg = await self._zygote(request)
            if zyg.fork_safe and zyg.proc.returncode is None:
                return await self._fork(zyg, request)
        return await self._spawn(request)

    async def _fork(self, zyg: _Zygote, request: LaunchRequest) -> dict[str, Any]:
        self._ids += 1
        ident = self._ids
        loop = asyncio.get_running_loop()
        started: asyncio.Future[dict[str, Any]] = loop.create_future()
        exited: asyncio.Future[int] = loop.create_future()
        zyg.pending[ident] = started
        zyg.exits[ident] = exited
        zyg.running += 1
        zyg.last_used = time.monotonic()
        message = {
            "op": "launch",
            "id": ident,
            "spec": request.spec.to_dict(),
            "stdout": request.stdout_path,
            "stderr": request.stderr_path,
        }
        assert zyg.proc.stdin is not None
        zyg.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await zyg.proc.stdin.drain()
        reply = await started
        if "error" in reply:
            zyg.exits.pop(ident, None)
            raise ComputeError(f"fork failed: {reply['error']}")
        pid = int(reply["pid"])
        self._exit_futures[pid] = exited
        self.launches_forked += 1
        return {"pid": pid, "pgid": pid, "proc_start": proc_start_time(pid), "via": "zygote"}

    async def _spawn(self, request: LaunchRequest) -> dict[str, Any]:
        spec = request.spec
        spec_path = (
            self.spool_dir
            / "specs"
            / "-".join((spec.flow, spec.run_id, spec.step, spec.task_id, f"{spec.attempt}.json"))
        )
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(request.spec.to_dict()))
        argv, env, cwd = self._command(request, [request.python, "-u", "-m", "millstream.task", str(spec_path)])
        with open(request.stdout_path, "ab") as out, open(request.stderr_path, "ab") as err:
            proc = await _exec(
                request,
                argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self._procs[proc.pid] = proc
        self.launches_fresh += 1
        return {"pid": proc.pid, "pgid": proc.pid, "proc_start": proc_start_time(proc.pid), "via": "exec"}

    # ----------------------------------------------------------------- watching
    async def wait(self, handle: dict[str, Any]) -> int | None:
        """The attempt's exit code once it ends (None when it was re-attached)."""
        pid = int(handle["pid"])
        proc = self._procs.get(pid)
        if proc is not None:
            try:
                return await proc.wait()
            finally:
                self._procs.pop(pid, None)
        fut = self._exit_futures.get(pid)
        if fut is not None:
            try:
                code = await fut
            finally:
                self._exit_futures.pop(pid, None)
            if code != -1:
                return code
        await self._wait_pidfd(handle)
        return None

    async def _wait_pidfd(self, handle: dict[str, Any]) -> None:
        pid = int(handle["pid"])
        if not self._same_process(handle):
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, readable)
        try:
            # A zombie (exited, unreaped by a parent that is not us) never becomes readable
            # for non-children on old kernels; poll its state as a backstop.
            while not done.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), 1.0)
                if _is_zombie(pid):
                    break
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    @staticmethod
    def _same_process(handle: dict[str, Any]) -> bool:
        start = proc_start_time(int(handle["pid"]))
        return start is not None and (handle.get("proc_start") in (None, start))

    async def reattach(self, handle: dict[str, Any]) -> bool:
        """True when the process behind the handle is still the attempt and alive."""
        return self._same_process(handle) and not _is_zombie(int(handle["pid"]))

    def exit_reason(self, handle: dict[str, Any]) -> ExitReason | None:
        """Local processes tell all through their exit code and done marker."""
        return None

    async def cancel(self, handle: dict[str, Any], *, grace_s: float) -> None:
        """SIGTERM the attempt's process group, SIGKILL it after ``grace_s``."""
        if not self._same_process(handle):
            return
        pgid = int(handle.get("pgid") or handle["pid"])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        if grace_s <= 0:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not await self.reattach(handle):
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    async def retire_idle(self) -> None:
        """Stop zygotes that have been idle for ``zygote_idle_s``."""
        now = time.monotonic()
        for key, zyg in list(self._zygotes.items()):
            if zyg.running <= 0 and now - zyg.last_used > self.zygote_idle_s:
                await self._stop_zygote(zyg)
                del self._zygotes[key]

    async def _stop_zygote(self, zyg: _Zygote) -> None:
        if zyg.proc.stdin is not None and not zyg.proc.stdin.is_closing():
            zyg.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(zyg.proc.wait(), 2.0)
        if zyg.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                zyg.proc.kill()
            await zyg.proc.wait()
        if zyg.reader is not None:
            zyg.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await zyg.reader
                except Exception:
                    log.exception("zygote_reader_failed", zygote=zyg.key)

    async def close(self) -> None:
        """Stop every zygote; running attempts carry on in their own sessions."""
        for zyg in list(self._zygotes.values()):
            await self._stop_zygote(zyg)
        self._zygotes.clear()


async def _exec(request: LaunchRequest, argv: list[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """Start ``argv`` (``request.python`` and its arguments, or the uid switch that runs them).

    An interpreter that cannot start is the submission's fault.
    """
    try:
        return await asyncio.create_subprocess_exec(*argv, **kwargs)
    except OSError as exc:
        raise ComputeError(f"cannot start the interpreter {request.python}: {exc.strerror or exc}",
                           retryable=False) from exc


def _cwd(request: LaunchRequest) -> str:
    # As in Metaflow, a local task runs where the user ran the flow, so relative paths
    # in a step mean what they meant there; the code itself comes from the package.
    if request.cwd and os.path.isdir(request.cwd):
        return request.cwd
    return request.spec.package_dir


def default_python() -> str:
    """The interpreter the daemon itself runs on."""
    return sys.executable
