"""``python -m millstream.compute.bootstrap``: the entry point of a Batch container.

The job's environment names everything (see :mod:`millstream.compute.batch`):
``MILLSTREAM_DATASTORE`` (the datastore configuration, JSON), ``MILLSTREAM_CODE_PACKAGE``
(its sha) and ``MILLSTREAM_SPEC_KEY`` (the list of task specs of the job). The
bootstrap fetches the code package, verifies and unpacks it into a scratch directory,
picks spec ``AWS_BATCH_JOB_ARRAY_INDEX`` (0 for a single job) and runs the task runner
in this process, whose exit code becomes the container's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from millstream.datastore.backends import open_store
from millstream.datastore.package import extract_package, fetch_package
from millstream.task.runner import run_spec
from millstream.task.spec import EXIT_INFRA_FAILURE, TaskSpec


async def _fetch(config: dict[str, Any], sha: str, key: str) -> tuple[bytes, list[dict[str, Any]]]:
    store = open_store(config)
    try:
        package = await fetch_package(store, sha)
        specs = json.loads(await store.get(key))
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            await close()
    return package, specs


def prepare(env: Mapping[str, str], scratch: Path) -> TaskSpec:
    """The spec this container runs, with its code package unpacked under ``scratch``."""
    missing = [n for n in ("MILLSTREAM_DATASTORE", "MILLSTREAM_CODE_PACKAGE", "MILLSTREAM_SPEC_KEY") if not env.get(n)]
    if missing:
        raise RuntimeError(f"the job's environment lacks {', '.join(missing)}")
    config = json.loads(env["MILLSTREAM_DATASTORE"])
    sha = env["MILLSTREAM_CODE_PACKAGE"]
    package, specs = asyncio.run(_fetch(config, sha, env["MILLSTREAM_SPEC_KEY"]))
    index = int(env.get("AWS_BATCH_JOB_ARRAY_INDEX") or 0)
    if not 0 <= index < len(specs):
        raise RuntimeError(f"array index {index} outside the job's {len(specs)} specs")
    target = scratch / sha
    extract_package(package, target)
    data = dict(specs[index], package_dir=str(target))
    return TaskSpec.from_dict(data)


def main() -> int:
    """Fetch, unpack, run; the runner's exit code."""
    scratch = Path(tempfile.mkdtemp(prefix="millstream-"))
    try:
        spec = prepare(os.environ, scratch)
    except Exception:
        traceback.print_exc()
        return EXIT_INFRA_FAILURE
    os.chdir(spec.package_dir)
    return run_spec(spec)


if __name__ == "__main__":
    sys.exit(main())
