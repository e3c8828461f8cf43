"""The ``millstream`` console script: flows by path, settings and the daemon commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from millstream.client import launch
from millstream.client.cli import cli
from tests.client.conftest import EXAMPLES


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False)


def test_check_and_show_by_path() -> None:
    result = invoke("check", str(EXAMPLES / "branch.py"))
    assert result.exit_code == 0
    assert result.output == "Flow BranchFlow is valid: 5 steps\n"
    shown = invoke("show", "--format", "dot", str(EXAMPLES / "branch.py"))
    assert '"start" -> "linear_model";' in shown.output


def test_run_hands_everything_after_the_file_to_the_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(launch, "launch_run",
                        lambda flow_cls, raw, **kw: calls.append({"flow": flow_cls, "raw": raw, **kw}) or 0)
    result = invoke("--socket", "/tmp/ms-test-none.sock", "run", "--quiet", str(EXAMPLES / "foreach.py"),
                    "--count", "4", "--max-num-splits", "9")
    assert result.exit_code == 0, result.output
    [call] = calls
    assert call["flow"].__name__ == "ForeachFlow"
    assert call["raw"] == {"count": "4"} and call["max_num_splits"] == 9 and call["quiet"] is True
    assert call["settings"].daemon.socket == "/tmp/ms-test-none.sock"


def test_run_help_after_the_file_is_the_flows() -> None:
    result = invoke("run", str(EXAMPLES / "foreach.py"), "--help")
    assert result.exit_code == 0
    assert "--count INTEGER" in result.output


def test_run_options_before_the_file_are_refused() -> None:
    result = CliRunner().invoke(cli, ["run", "--max-workers", "3", str(EXAMPLES / "hello.py")])
    assert result.exit_code == 2
    assert "--max-workers must come after FLOW.py" in result.output


def test_a_file_with_several_flows_needs_flow(tmp_path: Path) -> None:
    path = tmp_path / "cli_two_flows.py"
    path.write_text((EXAMPLES / "hello.py").read_text().replace("HelloFlow", "OneFlow")
                    + (EXAMPLES / "switch.py").read_text().replace("if __name__", "if False and __name__"))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1 and "several flows (OneFlow, SwitchFlow)" in result.output
    assert invoke("check", "--flow", "SwitchFlow", str(path)).output.startswith("Flow SwitchFlow is valid")


def test_config_show_has_values_and_sources(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "MILLSTREAM_RUN_MAX_WORKERS": "7"}
    result = invoke("--datastore-root", str(tmp_path / "ds"), "config", "show", env=env)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert result.output.splitlines()[0].split() == ["KEY", "VALUE", "SOURCE"]
    assert rows["run.max_workers"][1:] == ["7", "environment", "$MILLSTREAM_RUN_MAX_WORKERS"]
    assert rows["datastore.root"][1] == str(tmp_path / "ds")
    assert rows["datastore.root"][2:] == ["command", "line"]
    assert rows["daemon.socket"][1:] == [str(tmp_path / "run/millstream/daemon.sock"), "default"]


def test_daemon_status_without_a_daemon(tmp_path: Path) -> None:
    result = invoke("--socket", str(tmp_path / "none.sock"), "daemon", "status")
    assert result.exit_code == 1
    assert f"no millstream daemon answers on {tmp_path / 'none.sock'}" in result.output


def test_daemon_stop_without_a_daemon(tmp_path: Path) -> None:
    result = invoke("--socket", str(tmp_path / "none.sock"), "daemon", "stop")
    assert result.exit_code == 0 and "no millstream daemon answers" in result.output


def test_bad_pathspecs() -> None:
    result = CliRunner().invoke(cli, ["cancel", "OnlyAFlow"])
    assert result.exit_code == 1 and "cancel takes FLOW/RUN" in result.output
