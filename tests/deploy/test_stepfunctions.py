"""The ASL compiler: every example compiles and validates, and each shape maps as documented."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from millstream.deploy.stepfunctions import BATCH_SYNC, compile_flow
from millstream.errors import DeployError
from tests.deploy.conftest import EXAMPLE_FILES, example_options


def all_states(scope: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every state of a definition, nested Parallel branches and Map bodies included."""
    for name, state in scope["States"].items():
        yield name, state
        for branch in state.get("Branches", []):
            yield from all_states(branch)
        if "ItemProcessor" in state:
            yield from all_states(state["ItemProcessor"])


def steps_of(scope: dict[str, Any]) -> set[str]:
    return {n for n, s in scope["States"].items() if s.get("Resource") == BATCH_SYNC}


@pytest.mark.parametrize("mode", ["distributed", "inline"])
@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_every_example_compiles_to_valid_asl(example: str, mode: str, compile_example: Callable[..., Any],
                                             asl_validator: Callable[..., tuple[bool, str]]) -> None:
    graph, compiled = compile_example(example, foreach_mode=mode)
    ok, output = asl_validator(compiled.definition)
    assert ok, output
    tasks = {s["Parameters"]["Parameters"]["step"] for _, s in all_states(compiled.definition)
             if s.get("Resource") == BATCH_SYNC}
    assert tasks == set(graph["steps"])  # each step is exactly one Batch task
    names = [n for n, _ in all_states(compiled.definition)]
    assert len(names) == len(set(names))  # state names are unique machine-wide


def test_the_validator_rejects_a_broken_definition(compile_example: Callable[..., Any],
                                                   asl_validator: Callable[..., tuple[bool, str]]) -> None:
    _, compiled = compile_example("hello.py")
    broken = copy.deepcopy(compiled.definition)
    broken["States"]["start"]["Next"] = "nowhere"
    ok, output = asl_validator(broken)
    assert not ok and "nowhere" in output


def test_linear_flow_is_a_chain_of_batch_tasks(compile_example: Callable[..., Any]) -> None:
    _, compiled = compile_example("hello.py")
    states = compiled.definition["States"]
    assert compiled.definition["StartAt"] == "millstream.init"
    assert states["millstream.init"]["Parameters"] == {"run_id.$": "States.Format('sfn-{}', $$.Execution.Name)"}
    chain, name = [], "millstream.init"
    while "Next" in states[name]:
        name = states[name]["Next"]
        chain.append(name)
    assert states[name]["End"] is True
    start = states["start"]
    assert start["Resource"] == "arn:aws:states:::batch:submitJob.sync"
    assert start["ResultPath"] is None  # the state stays {"run_id": ...}
    params = start["Parameters"]
    assert params["JobQueue"] == "queue-1" and params["JobName"] == "HelloFlow-start"
    assert params["JobDefinition"] in compiled.job_definitions
    assert params["Parameters"]["task_id"] == "0"
    assert params["Parameters"]["attempt.$"] == "States.Format('{}', $$.State.RetryCount)"
    # Only the start task gets the execution input (the parameter values).
    env = params["ContainerOverrides"]["Environment"]
    assert env == [{"Name": "MILLSTREAM_SFN_INPUT", "Value.$": "States.JsonToString($$.Execution.Input)"}]
    assert all("ContainerOverrides" not in states[n]["Parameters"] for n in chain[1:])


def test_branch_is_a_parallel_before_its_join(compile_example: Callable[..., Any]) -> None:
    graph, compiled = compile_example("branch.py")
    split = next(n for n, s in graph["steps"].items() if s["type"] == "split")
    join = next(n for n, s in graph["steps"].items() if s.get("closes") == split)
    states = compiled.definition["States"]
    parallel = states[states[split]["Next"]]
    assert parallel["Type"] == "Parallel"
    assert parallel["Next"] == join
    assert [b["StartAt"] for b in parallel["Branches"]] == graph["steps"][split]["out"]
    for branch in parallel["Branches"]:
        assert join not in branch["States"]
        assert any(s.get("End") for s in branch["States"].values())


@pytest.mark.parametrize("mode", ["distributed", "inline"])
def test_foreach_is_a_map_over_the_item_list_in_s3(mode: str, compile_example: Callable[..., Any]) -> None:
    graph, compiled = compile_example("foreach.py", foreach_mode=mode)
    foreach = next(n for n, s in graph["steps"].items() if s["type"] == "foreach")
    states = compiled.definition["States"]
    maps = [s for s in states.values() if s["Type"] == "Map"]
    assert len(maps) == 1
    m = maps[0]
    body = graph["steps"][foreach]["out"][0]
    assert m["ItemProcessor"]["StartAt"] == body
    assert m["ItemSelector"] == {"run_id.$": "$.run_id", "task_id.$": "States.Format('{}', $$.Map.Item.Index)"}
    key = f"States.Format('ms/ForeachFlow/{{}}/_run/sfn/{foreach}/{{}}/items.json', $.run_id, '0')"
    if mode == "distributed":
        assert m["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
        assert m["ItemReader"]["Parameters"] == {"Bucket": "ms-bucket", "Key.$": key}
        assert m["ItemReader"]["ReaderConfig"] == {"InputType": "JSON"}
    else:
        assert m["ItemProcessor"]["ProcessorConfig"] == {"Mode": "INLINE"}
        read = states[states[foreach]["Next"]]
        assert read["Resource"] == "arn:aws:states:::aws-sdk:s3:getObject"
        assert read["Parameters"] == {"Bucket": "ms-bucket", "Key.$": key}
        assert m["ItemsPath"] == "$.foreach_items.value"
    # Body tasks name themselves from the state's task id.
    body_task = m["ItemProcessor"]["States"][body]
    assert body_task["Parameters"]["Parameters"]["task_id.$"] == "$.task_id"


def test_nested_foreach_builds_task_ids_from_both_indexes(compile_example: Callable[..., Any]) -> None:
    _, compiled = compile_example("nested_foreach.py")
    outer = compiled.definition["States"]["start.foreach"]
    inner = outer["ItemProcessor"]["States"]["per_model.foreach"]
    assert inner["ItemSelector"]["task_id.$"] == "States.Format('{}-{}', $.task_id, $$.Map.Item.Index)"
    assert inner["ItemReader"]["Parameters"]["Key.$"].endswith("', $.run_id, $.task_id)")
    assert steps_of(inner["ItemProcessor"]) == {"fit"}
    assert "per_model_join" in outer["ItemProcessor"]["States"]


def test_retry_and_timeout(compile_example: Callable[..., Any]) -> None:
    _, compiled = compile_example("nested_foreach.py")
    outer = compiled.definition["States"]["start.foreach"]
    fit = outer["ItemProcessor"]["States"]["per_model.foreach"]["ItemProcessor"]["States"]["fit"]
    user, infra = fit["Retry"]
    # @retry(times=1, minutes_between_retries=0): one retry, the shortest interval ASL allows.
    assert user == {"ErrorEquals": ["States.TaskFailed"], "IntervalSeconds": 1, "MaxAttempts": 1,
                    "BackoffRate": 1.0, "JitterStrategy": "FULL"}
    assert infra["ErrorEquals"] == ["Batch.AWSBatchException"] and infra["JitterStrategy"] == "FULL"
    start = compiled.definition["States"]["start"]
    assert [r["ErrorEquals"] for r in start["Retry"]] == [["Batch.AWSBatchException"]]  # no @retry
    assert "TimeoutSeconds" not in start


def _graph_with(compile_example: Callable[..., Any], example: str, step: str, decorators: list[dict[str, Any]]
                ) -> dict[str, Any]:
    graph, _ = compile_example(example)
    graph = copy.deepcopy(graph)
    graph["steps"][step]["decorators"] = decorators
    return graph


def test_retry_minutes_and_timeout_seconds(compile_example: Callable[..., Any]) -> None:
    graph = _graph_with(compile_example, "hello.py", "start", [
        {"name": "retry", "attributes": {"times": 4, "minutes_between_retries": 1.5}},
        {"name": "timeout", "attributes": {"seconds": 30, "minutes": 1, "hours": 1}},
        {"name": "batch", "attributes": {"queue": "gpu-queue", "image": "gpu:2", "gpu": 1, "cpu": 8,
                                         "memory": 30000}},
    ])
    compiled = compile_flow(graph, example_options("HelloFlow"))
    start = compiled.definition["States"]["start"]
    assert start["Retry"][0]["IntervalSeconds"] == 90 and start["Retry"][0]["MaxAttempts"] == 4
    assert start["TimeoutSeconds"] == 3690
    assert start["Parameters"]["JobQueue"] == "gpu-queue"
    props = compiled.job_definitions[start["Parameters"]["JobDefinition"]]
    assert props["image"] == "gpu:2"
    assert {r["type"]: r["value"] for r in props["resourceRequirements"]} == {"VCPU": "8", "MEMORY": "30000",
                                                                              "GPU": "1"}


def test_switch_is_a_choice_on_the_recorded_branch(compile_example: Callable[..., Any],
                                                   asl_validator: Callable[..., tuple[bool, str]]) -> None:
    graph, compiled = compile_example("switch.py")
    states = compiled.definition["States"]
    read = states[states["start"]["Next"]]
    assert read["Resource"] == "arn:aws:states:::aws-sdk:s3:getObject"
    assert read["Parameters"]["Key.$"] == "States.Format('ms/SwitchFlow/{}/_run/sfn/start/{}/switch.json', " \
                                          "$.run_id, '0')"
    choice = states[read["Next"]]
    assert choice["Type"] == "Choice"
    assert {(c["StringEquals"], c["Next"]) for c in choice["Choices"]} == {("small", "small"), ("large", "large")}
    assert states[choice["Default"]]["Type"] == "Fail"
    assert states["small"]["Next"] == states["large"]["Next"] == "end"


def test_a_switch_loop_is_refused(compile_example: Callable[..., Any]) -> None:
    graph, _ = compile_example("switch.py")
    graph = copy.deepcopy(graph)
    graph["steps"]["large"]["out"] = ["start"]  # large -> start: a loop through the switch
    with pytest.raises(DeployError, match="loops back through 'large'"):
        compile_flow(graph, example_options("SwitchFlow"))


def test_bad_options_are_refused(compile_example: Callable[..., Any]) -> None:
    graph, _ = compile_example("hello.py")
    with pytest.raises(DeployError, match="foreach_mode must be one of distributed, inline"):
        compile_flow(graph, example_options("HelloFlow", foreach_mode="wide"))
    with pytest.raises(DeployError, match="needs an S3 datastore"):
        compile_flow(graph, example_options("HelloFlow", bucket=""))


def test_the_state_stays_small_for_a_wide_foreach(compile_example: Callable[..., Any]) -> None:
    # Nothing in the definition depends on the cardinality, and no state carries items.
    _, compiled = compile_example("nested_foreach.py")
    for _, state in all_states(compiled.definition):
        if state["Type"] == "Task" and state.get("Resource") == BATCH_SYNC:
            assert state["ResultPath"] is None
        if state["Type"] == "Map":
            assert state["ResultPath"] is None and "ItemsPath" not in state
