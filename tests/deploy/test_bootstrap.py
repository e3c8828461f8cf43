"""The bootstrap's pure parts: a task's inputs from the graph and its task id; output keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from millstream.deploy.bootstrap import output_key, output_key_template, task_inputs
from millstream.errors import DatastoreError


def counts(**splits: int) -> Callable[[str, str], Any]:
    async def num_splits(step: str, task: str) -> int:
        return splits[f"{step}:{task}"]

    return num_splits


def ran(*tasks: str) -> Callable[[str, str], Any]:
    async def succeeded(step: str, task: str) -> bool:
        return f"{step}/{task}" in tasks

    return succeeded


async def test_linear_and_branch(compile_example: Callable[..., Any]) -> None:
    graph, _ = compile_example("branch.py")
    steps = graph["steps"]
    assert await task_inputs(steps, "start", "0", num_splits=counts(), succeeded=ran()) == ([], None)
    split = next(n for n, s in steps.items() if s["type"] == "split")
    join = next(n for n, s in steps.items() if s.get("closes") == split)
    branches = steps[split]["out"]
    assert await task_inputs(steps, branches[0], "0", num_splits=counts(), succeeded=ran()) == ([(split, "0")], None)
    inputs, _ = await task_inputs(steps, join, "0", num_splits=counts(), succeeded=ran())
    assert sorted(inputs) == sorted((p, "0") for p in steps[join]["in"])


async def test_nested_foreach(compile_example: Callable[..., Any]) -> None:
    graph, _ = compile_example("nested_foreach.py")
    steps = graph["steps"]
    # The body head of the outer foreach: parent start/0, split index from the id.
    assert await task_inputs(steps, "per_model", "2", num_splits=counts(), succeeded=ran()) == ([("start", "0")], 2)
    assert await task_inputs(steps, "fit", "2-1", num_splits=counts(), succeeded=ran()) == ([("per_model", "2")], 1)
    # The inner join of model 2 takes fit/2-0 and fit/2-1; the outer join every per_model_join.
    inner = await task_inputs(steps, "per_model_join", "2", num_splits=counts(**{"per_model:2": 2}),
                              succeeded=ran())
    assert inner == ([("fit", "2-0"), ("fit", "2-1")], None)
    outer = await task_inputs(steps, "join", "0", num_splits=counts(**{"start:0": 3}), succeeded=ran())
    assert outer == ([("per_model_join", "0"), ("per_model_join", "1"), ("per_model_join", "2")], None)


async def test_after_a_switch_the_branch_that_ran(compile_example: Callable[..., Any]) -> None:
    graph, _ = compile_example("switch.py")
    steps = graph["steps"]
    assert await task_inputs(steps, "end", "0", num_splits=counts(), succeeded=ran("large/0")) == (
        [("large", "0")], None)
    with pytest.raises(RuntimeError, match="none of the possible inputs"):
        await task_inputs(steps, "end", "0", num_splits=counts(), succeeded=ran())


def test_output_keys_match_the_template() -> None:
    key = output_key("Flow", "sfn-abc", "start", "3-1", "items")
    assert key == "Flow/sfn-abc/_run/sfn/start/3-1/items.json"
    assert output_key_template("ms/", "Flow", "start", "items").format("sfn-abc", "3-1") == "ms/" + key
    with pytest.raises(DatastoreError, match="invalid run id"):
        output_key("Flow", "bad/run", "start", "0", "items")
