"""``python flow.py ...``: check, show and how run hands its options on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from millstream.client import launch
from millstream.client.flowcli import main, make_flow_cli
from millstream.client.loader import load_flow
from tests.client.conftest import EXAMPLES

EXAMPLE_STEMS = sorted(p.stem for p in EXAMPLES.glob("*.py"))


def invoke(flow_cls: type, *args: str) -> Any:
    return CliRunner().invoke(make_flow_cli(flow_cls), list(args), catch_exceptions=False)


@pytest.mark.parametrize("stem", EXAMPLE_STEMS)
def test_check_examples(example: Any, stem: str) -> None:
    flow = example(stem)
    result = invoke(flow, "check")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Flow {flow.__name__} is valid: ")


@pytest.mark.parametrize("stem", EXAMPLE_STEMS)
def test_show_examples_in_every_format(example: Any, stem: str) -> None:
    flow = example(stem)
    text = invoke(flow, "show").output
    assert "Step start (" in text and "Step end (end)" in text
    dot = invoke(flow, "show", "--format", "dot").output
    assert dot.startswith(f'digraph "{flow.__name__}" {{') and dot.rstrip().endswith("}")
    mermaid = invoke(flow, "show", "--format", "mermaid").output
    assert mermaid.startswith("flowchart TD\n") and "n_start" in mermaid


def test_show_text_is_like_metaflows(example: Any) -> None:
    assert invoke(example("hello"), "show").output == (
        "Say hello and pass a message along.\n\n"
        "Step start (start)\n    Set a message.\n    => greet\n\n"
        "Step greet (linear)\n    Add to it.\n    => end\n\n"
        "Step end (end)\n    Show the result.\n"
    )


def test_show_text_names_foreach_switch_and_decorators(example: Any) -> None:
    foreach = invoke(example("nested_foreach"), "show").output
    assert "    => per_model (foreach models)\n" in foreach
    assert "    @retry(times=1, minutes_between_retries=0)\n    @catch(" in foreach
    switch = invoke(example("switch"), "show").output
    assert "    => small (route=small), large (route=large)\n" in switch
    params = invoke(example("parameters"), "show").output
    assert "    --alpha float (default: 0.5): learning rate\n" in params
    assert "    --greeting str (default: computed): a computed default\n" in params


BROKEN = '''"""Two mistakes."""
from millstream import FlowSpec, step


class CliBrokenFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.missing)

    @step
    def middle(self):
        self.next(self.end)
        print("too late")

    @step
    def end(self):
        pass
'''


def test_check_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "flowcli_broken.py"
    path.write_text(BROKEN)
    result = invoke(load_flow(path), "check")
    assert result.exit_code == 1
    assert f"{path}:8: step 'start' goes to unknown step 'missing'\n" in result.output
    assert "    Fix: define @step def missing(self) or fix the name\n" in result.output
    assert f"{path}:12: self.next must be the last statement of step 'middle'\n" in result.output
    assert result.output.startswith("Flow CliBrokenFlow has 2 problems:\n")
    # show refuses the broken graph the same way
    shown = invoke(load_flow(path), "show")
    assert shown.exit_code == 1 and "unknown step 'missing'" in shown.output


def test_run_help_has_an_option_per_parameter(example: Any) -> None:
    output = invoke(example("parameters"), "run", "--help").output
    assert "--alpha FLOAT" in output and "learning rate [default: 0.5]" in output
    assert "--config JSON" in output
    assert "--greeting TEXT" in output and "[default: computed]" in output
    assert "--max-workers" in output and "--run-id-file" in output and "--with SPEC" in output


def test_run_passes_options_and_parameters_on(example: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_launch(flow_cls: type, raw: dict[str, str], **kwargs: Any) -> int:
        calls.append({"flow": flow_cls.__name__, "raw": raw, **kwargs})
        return 1

    monkeypatch.setattr(launch, "launch_run", fake_launch)
    result = invoke(example("parameters"), "--quiet", "--with", "retry", "--no-pylint", "run",
                    "--alpha", "0.3", "--tag", "a", "--tag", "b", "--max-workers", "2",
                    "--with", "timeout:seconds=5", "--run-id-file", "rid")
    assert result.exit_code == 1
    [call] = calls
    assert call["flow"] == "ParameterFlow"
    assert call["raw"] == {"alpha": "0.3"}
    assert call["tags"] == ("a", "b")
    assert call["with_specs"] == ("retry", "timeout:seconds=5")
    assert (call["max_workers"], call["max_num_splits"], call["run_id_file"], call["quiet"]) == \
        (2, None, "rid", True)


def test_bad_parameter_fails_before_any_daemon(example: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_daemon(*_args: Any) -> None:
        raise AssertionError("the daemon must not be contacted")

    monkeypatch.setattr(launch, "ensure_daemon", no_daemon)
    result = invoke(example("parameters"), "run", "--epochs", "many")
    assert result.exit_code == 1
    assert "Error: Parameter 'epochs': 'many' is not a int" in result.output


def test_run_of_an_invalid_flow_prints_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "flowcli_broken_run.py"
    path.write_text(BROKEN.replace("CliBrokenFlow", "CliBrokenRunFlow"))
    result = invoke(load_flow(path), "run")
    assert result.exit_code == 1
    assert "unknown step 'missing'" in result.output and "must be the last statement" in result.output


def test_environment_other_than_local_is_refused(example: Any) -> None:
    result = CliRunner().invoke(make_flow_cli(example("hello")), ["--environment", "conda", "check"])
    assert result.exit_code == 2


def test_main_exits_with_the_commands_code(example: Any) -> None:
    with pytest.raises(SystemExit) as info:
        main(example("hello"), ["check"])
    assert info.value.code == 0
