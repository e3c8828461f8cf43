"""Reading a finished run back from the datastore, for the end-to-end tests.

The checks read what is really stored, by a route independent of the code under test:
files under a local datastore's root, or plain boto3 calls straight to the moto server
(never through the fault proxy) for an S3 datastore.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from millstream.datastore import layout
from millstream.datastore.artifacts import deserialize
from tests.conftest import Daemon

FLOWS = Path(__file__).parent / "flows"


class StoredData:
    """A synchronous read-only view of one daemon's datastore."""

    def __init__(self, d: Daemon) -> None:
        env = d.env
        self.kind = env.get("MILLSTREAM_DATASTORE_TYPE", "local")
        self.root = Path(env["MILLSTREAM_DATASTORE_ROOT"]) if self.kind == "local" else None
        self.bucket = env.get("MILLSTREAM_DATASTORE_BUCKET", "")
        prefix = env.get("MILLSTREAM_DATASTORE_PREFIX", "").strip("/")
        self.prefix = f"{prefix}/" if prefix else ""

    def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None."""
        if self.root is not None:
            path = self.root / key
            return path.read_bytes() if path.is_file() else None
        client = _s3_client()
        try:
            response = client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except client.exceptions.NoSuchKey:
            return None
        data: bytes = response["Body"].read()
        return data

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted (temporary files of a local store excluded)."""
        if self.root is not None:
            base = self.root / prefix if (self.root / prefix).is_dir() else self.root
            keys = [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()]
            return sorted(k for k in keys if k.startswith(prefix) and "/.tmp-" not in f"/{k}")
        pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        return sorted(item["Key"][len(self.prefix) :] for page in pages for item in page.get("Contents", ()))

    def json(self, key: str) -> Any:
        """The JSON value under ``key``, or None."""
        data = self.get(key)
        return json.loads(data) if data is not None else None


@functools.cache
def _s3_client() -> Any:
    import boto3

    from tests.aws.moto_server import REGION, shared_moto

    return boto3.client("s3", region_name=REGION, endpoint_url=shared_moto().url)


def stored(d: Daemon) -> StoredData:
    """What ``d``'s datastore holds."""
    return StoredData(d)


def run_flow(d: Daemon, flow_file: Path, *args: str, command: str = "run",
             timeout_s: float = 120) -> tuple[str, Any]:
    """``python FLOW COMMAND --run-id-file ... ARGS`` through the daemon (``run`` or
    ``resume``); returns (run_id, completed process)."""
    id_file = d.root / f"run-id-{flow_file.stem}-{len(list(d.root.glob('run-id-*')))}"
    proc = d.run_flow(flow_file, command, "--run-id-file", str(id_file), *args, timeout_s=timeout_s)
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    return run_id, proc


def ok_attempt(task: dict[str, Any]) -> int:
    """The number of the attempt of a task (from GET /v1/runs/...) that succeeded."""
    oks = [a["number"] for a in task["attempts"] if a["status"] == "ok"]
    assert len(oks) == 1, task
    return oks[0]


def done_marker(d: Daemon, flow: str, run_id: str, step: str, task_id: str, attempt: int) -> dict[str, Any] | None:
    """An attempt's done marker as stored, or None."""
    done: dict[str, Any] | None = stored(d).json(layout.done_key(flow, run_id, step, task_id, attempt))
    return done


def artifact(d: Daemon, flow: str, run_id: str, step: str, name: str, task_id: str = "0") -> Any:
    """An artifact of a task's successful attempt, loaded from the datastore."""
    state = d.run_state(flow, run_id)
    task = next(t for t in state["tasks"] if t["step"] == step and t["task_id"] == task_id)
    handle = task["attempts"][ok_attempt(task)]["handle"] or {}
    if handle.get("cloned_from"):  # cloned by a resume: the origin's attempt holds the data
        run_id, attempt = handle["origin_run_id"], handle["origin_attempt"]
    else:
        attempt = ok_attempt(task)
    done = done_marker(d, flow, run_id, step, task_id, attempt)
    assert done is not None
    sha = done["artifacts"][name]["sha"]
    data = stored(d).get(layout.artifact_key(flow, sha))
    assert data is not None, f"artifact {name} of {flow}/{run_id}/{step}/{task_id}: blob {sha} missing"
    return deserialize(data)


def clone_origins(d: Daemon, flow: str, run_id: str) -> dict[str, str | None]:
    """task key (step/task) -> the origin pathspec a resume cloned it from (None: it ran)."""
    state = d.run_state(flow, run_id)
    return {
        f"{t['step']}/{t['task_id']}": (
            (t["attempts"][-1]["handle"] or {}).get("cloned_from") if t["attempts"] else None
        )
        for t in state["tasks"]
    }
