"""Where everything lives in the object store: pure functions from names to keys.

The layout is the same on every backend::

    <flow>/data/<sha[:2]>/<sha>                               pickled artifacts
    <flow>/<run>/<step>/<task>/<attempt>/started.json         attempt began
    <flow>/<run>/<step>/<task>/<attempt>/done.json            attempt outcome (written last)
    <flow>/<run>/<step>/<task>/<attempt>/stdout, stderr       attempt logs
    <flow>/<run>/_run/checkpoint.json, params.json            run-level state
    packages/<sha>.tar.gz                                     code packages
    daemon/<daemon_id>/active.json                            a daemon's active runs

Every component is validated before it becomes part of a key, because some of them
come from users (pathspecs on the command line). A few names are reserved so the
shapes above can never collide: no flow may be called ``packages`` or ``daemon``, no
run id may be ``data``, and no step may be called ``_run``.
"""

from __future__ import annotations

import re

from millstream.errors import DatastoreError

STARTED = "started.json"
DONE = "done.json"
STDOUT = "stdout"
STDERR = "stderr"
CHECKPOINT = "checkpoint.json"
PARAMS = "params.json"
ACTIVE = "active.json"

DATA_DIR = "data"
RUN_DIR = "_run"
PACKAGES_DIR = "packages"
DAEMON_DIR = "daemon"

RESERVED_FLOW_NAMES = frozenset({PACKAGES_DIR, DAEMON_DIR})
RESERVED_RUN_IDS = frozenset({DATA_DIR})
RESERVED_STEP_NAMES = frozenset({RUN_DIR})

MAX_ID_LENGTH = 128

# A leading "." is refused (beyond "." and ".."): such names are hidden on disk and
# ".tmp-" is what backends use for files being written.
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def check_flow(name: str) -> str:
    """Return ``name`` if it is a valid flow name (an ASCII identifier), else raise."""
    _check_identifier("flow name", name)
    if name in RESERVED_FLOW_NAMES:
        raise DatastoreError(f"flow name {name!r} is reserved by the datastore layout")
    return name


def check_step(name: str) -> str:
    """Return ``name`` if it is a valid step name (an ASCII identifier), else raise."""
    _check_identifier("step name", name)
    if name in RESERVED_STEP_NAMES:
        raise DatastoreError(f"step name {name!r} is reserved by the datastore layout")
    return name


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it matches ``[A-Za-z0-9_.-]+`` (no leading dot), else raise."""
    _check_id("run id", run_id)
    if run_id in RESERVED_RUN_IDS:
        raise DatastoreError(f"run id {run_id!r} is reserved by the datastore layout")
    return run_id


def check_task_id(task_id: str) -> str:
    """Return ``task_id`` if it matches ``[A-Za-z0-9_.-]+`` (no leading dot), else raise."""
    return _check_id("task id", task_id)


def check_attempt(attempt: int) -> int:
    """Return ``attempt`` if it is a non-negative int, else raise."""
    # bool is an int subclass, and True as an attempt number is always a bug.
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise DatastoreError(f"invalid attempt {attempt!r}: must be an int >= 0")
    return attempt


def check_sha(sha: str) -> str:
    """Return ``sha`` if it is a lowercase hex sha256 digest, else raise."""
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise DatastoreError(f"invalid sha256 {sha!r}: must be 64 lowercase hex digits")
    return sha


def check_daemon_id(daemon_id: str) -> str:
    """Return ``daemon_id`` if it matches ``[A-Za-z0-9_.-]+`` (no leading dot), else raise."""
    return _check_id("daemon id", daemon_id)


def artifacts_prefix(flow: str) -> str:
    """The folder holding all of a flow's artifacts, ending in ``/``."""
    return f"{check_flow(flow)}/{DATA_DIR}/"


def artifact_key(flow: str, sha: str) -> str:
    """The key of one content-addressed artifact blob."""
    check_sha(sha)
    return f"{artifacts_prefix(flow)}{sha[:2]}/{sha}"


def run_prefix(flow: str, run: str) -> str:
    """The folder of one run, ending in ``/``."""
    return f"{check_flow(flow)}/{check_run_id(run)}/"


def task_prefix(flow: str, run: str, step: str, task: str) -> str:
    """The folder holding every attempt of one task, ending in ``/``."""
    return f"{run_prefix(flow, run)}{check_step(step)}/{check_task_id(task)}/"


def attempt_prefix(flow: str, run: str, step: str, task: str, attempt: int) -> str:
    """The folder of one attempt, ending in ``/``."""
    return f"{task_prefix(flow, run, step, task)}{check_attempt(attempt)}/"


def started_key(flow: str, run: str, step: str, task: str, attempt: int) -> str:
    """The key of an attempt's start record."""
    return attempt_prefix(flow, run, step, task, attempt) + STARTED


def done_key(flow: str, run: str, step: str, task: str, attempt: int) -> str:
    """The key of an attempt's done marker, the one source of truth of its outcome."""
    return attempt_prefix(flow, run, step, task, attempt) + DONE


def stdout_key(flow: str, run: str, step: str, task: str, attempt: int) -> str:
    """The key of an attempt's captured standard output."""
    return attempt_prefix(flow, run, step, task, attempt) + STDOUT


def stderr_key(flow: str, run: str, step: str, task: str, attempt: int) -> str:
    """The key of an attempt's captured standard error."""
    return attempt_prefix(flow, run, step, task, attempt) + STDERR


def checkpoint_key(flow: str, run: str) -> str:
    """The key of a run's scheduler checkpoint."""
    return f"{run_prefix(flow, run)}{RUN_DIR}/{CHECKPOINT}"


def params_key(flow: str, run: str) -> str:
    """The key of a run's parameter values."""
    return f"{run_prefix(flow, run)}{RUN_DIR}/{PARAMS}"


def package_key(sha: str) -> str:
    """The key of a code package, named by the sha256 of its bytes."""
    return f"{PACKAGES_DIR}/{check_sha(sha)}.tar.gz"


def active_runs_key(daemon_id: str) -> str:
    """The key of the index of runs a daemon is driving."""
    return f"{DAEMON_DIR}/{check_daemon_id(daemon_id)}/{ACTIVE}"


def _check_identifier(what: str, name: str) -> None:
    # ASCII only: keys must mean the same bytes on every filesystem and on S3.
    if not isinstance(name, str) or not (name.isascii() and name.isidentifier()):
        raise DatastoreError(f"invalid {what} {name!r}: must be an ASCII Python identifier")
    if len(name) > MAX_ID_LENGTH:
        raise DatastoreError(f"invalid {what} {name[:40]!r}...: over {MAX_ID_LENGTH} characters")


def _check_id(what: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise DatastoreError(
            f"invalid {what} {value!r}: use letters, digits, '_', '.' and '-', "
            "not starting with '.'")
    if len(value) > MAX_ID_LENGTH:
        raise DatastoreError(f"invalid {what} {value[:40]!r}...: over {MAX_ID_LENGTH} characters")
    return value
