"""``millstream step-functions``: help and bad input, without AWS."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from millstream.client.cli import cli
from tests.deploy.conftest import EXAMPLES


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_help_and_bad_action() -> None:
    code, out = invoke("step-functions", "--help")
    assert code == 0 and "create|trigger|list-runs|delete" in out
    code, out = invoke("step-functions", "launch", "flow.py")
    assert code == 2 and "unknown action 'launch'; use one of create, trigger, list-runs, delete" in out
    code, out = invoke("step-functions", "create")
    assert code == 2 and "missing FLOW.py" in out


def test_only_json_needs_an_s3_datastore_and_prints_the_definition(tmp_path: Path) -> None:
    base = {"HOME": str(tmp_path), "MILLSTREAM_CONFIG": str(tmp_path / "none.toml")}
    code, out = invoke("step-functions", "create", str(EXAMPLES / "branch.py"), "--only-json", env=base)
    assert code == 1 and "need an S3 datastore" in out
    env = {**base, "MILLSTREAM_DATASTORE_TYPE": "s3", "MILLSTREAM_DATASTORE_BUCKET": "b",
           "MILLSTREAM_STEPFUNCTIONS_JOB_QUEUE": "q", "MILLSTREAM_STEPFUNCTIONS_IMAGE": "i"}
    code, out = invoke("step-functions", "create", str(EXAMPLES / "branch.py"), "--only-json", env=env)
    assert code == 0, out
    definition = json.loads(out)
    assert any(s["Type"] == "Parallel" for s in definition["States"].values())


def test_neither_the_daemon_nor_a_flow_command_line_imports_the_deploy_package() -> None:
    import subprocess
    import sys

    code = ("import sys; import millstream.daemon.main; from millstream.client.flowcli import make_flow_cli; "
            "from millstream.client.loader import load_flow; "
            f"make_flow_cli(load_flow({str(EXAMPLES / 'hello.py')!r}, None)); "
            "print(sorted(m for m in sys.modules if m.startswith('millstream.deploy')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
