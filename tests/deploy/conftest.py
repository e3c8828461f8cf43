"""Fixtures for the Step Functions export: compiled example flows and the ASL validator.

    asl_validator   session: a function ``validate(definition) -> (ok, output)`` running the
                    npm ``asl-validator`` (``.ci/node`` as ``.ci/run`` installs it, or PATH);
                    missing: skipped locally, a failure with CI=true
    compile_example ``compile_example("foreach.py", foreach_mode="inline")`` -> (graph, Compiled)
    moto_reset      the shared moto server (tests/aws/moto_server.py), emptied for the test
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from millstream.client.loader import load_flow
from millstream.deploy.batchjob import ContainerDefaults
from millstream.deploy.stepfunctions import Compiled, ExportOptions, compile_flow
from millstream.flow.graph import FlowGraph
from tests.aws.moto_server import MotoServer, shared_moto, stop_shared_moto
from tests.deploy.moto_sfn import local_batch  # noqa: F401 - a fixture for test_execution

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.py"))
SHA = "ab" * 32


def example_options(class_name: str, **overrides: Any) -> ExportOptions:
    """Export options for tests: bucket ``ms-bucket``, prefix ``ms``, image ``img:1``."""
    base: dict[str, Any] = {
        "bucket": "ms-bucket", "prefix": "ms", "job_queue": "queue-1", "package": SHA,
        "module_file": "flow.py", "class_name": class_name,
        "container": ContainerDefaults(image="img:1", environment={"MILLSTREAM_DATASTORE_TYPE": "s3"}),
    }
    base.update(overrides)
    return ExportOptions(**base)


@pytest.fixture
def compile_example() -> Callable[..., tuple[dict[str, Any], Compiled]]:
    """Compile one of examples/*.py."""

    def make(name: str, **overrides: Any) -> tuple[dict[str, Any], Compiled]:
        flow_cls = load_flow(str(EXAMPLES / name), None)
        graph = FlowGraph(flow_cls).to_dict()
        return graph, compile_flow(graph, example_options(flow_cls.__name__, **overrides))

    return make


def _validator_path() -> str | None:
    local = ROOT / ".ci/node/node_modules/.bin/asl-validator"
    return str(local) if local.exists() else shutil.which("asl-validator")


@pytest.fixture(scope="session")
def asl_validator(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], tuple[bool, str]]:
    """Run asl-validator on a definition: (valid, what it printed)."""
    path = _validator_path()
    if path is None:
        message = "asl-validator is not installed (npm install --prefix .ci/node asl-validator@4.0.0)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("asl")
    counter = iter(range(1_000_000))

    def validate(definition: dict[str, Any]) -> tuple[bool, str]:
        file = folder / f"definition-{next(counter)}.json"
        file.write_text(json.dumps(definition), encoding="utf-8")
        done = subprocess.run([path, "--json-path", str(file)], capture_output=True, text=True, timeout=60,
                              check=False)
        if done.returncode not in (0, 1):
            raise RuntimeError(f"asl-validator failed to run ({done.returncode}): {done.stderr}")
        return done.returncode == 0, done.stdout + done.stderr

    return validate


@pytest.fixture(scope="session")
def moto_session_server() -> Iterator[MotoServer]:
    """The shared moto server, stopped at the end of the session."""
    yield shared_moto()
    stop_shared_moto()


@pytest.fixture
def moto_reset(moto_session_server: MotoServer) -> MotoServer:
    """The moto server, emptied before the test."""
    moto_session_server.reset()
    return moto_session_server
