"""FlowSpec without a datastore: transitions, artifacts, merge_artifacts and ``current``."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from millstream import FlowSpec, current, step
from millstream.datastore.artifacts import ArtifactRef
from millstream.errors import FlowError
from millstream.flow.spec import ForeachFrame, Inputs, MergeArtifactsError, Transition

from .flows import RecursionFlow
from .loader import EXAMPLES, flow_class


def _example(stem: str, **params: Any) -> FlowSpec:
    flow = flow_class(EXAMPLES / f"{stem}.py")(use_cli=False)
    flow._ms_params = params
    return flow


# ------------------------------------------------------------------ self.next


def test_linear_transition() -> None:
    """self.next(self.a) records one step."""
    flow = _example("hello")
    flow.start()
    assert flow._ms_transition == Transition(("greet",), None, None, None)
    assert flow.message == "hello"


def test_branch_transition() -> None:
    """self.next(self.a, self.b) records both, in order."""
    flow = _example("branch")
    flow.start()
    assert flow._ms_transition == Transition(("linear_model", "tree_model"), None, None, None)


def test_foreach_transition() -> None:
    """foreach= names the artifact to fan out over."""
    flow = _example("foreach", count=3)
    flow.start()
    assert flow._ms_transition == Transition(("square",), "numbers", None, None)
    assert flow.numbers == [0, 1, 2]


def test_switch_transition() -> None:
    """A dict of cases with condition= records the cases, each step once."""
    flow = _example("switch", size=500)
    flow.start()
    assert flow.route == "large"
    assert flow._ms_transition == Transition(("small", "large"), None, "route", {"small": "small", "large": "large"})


def test_switch_with_repeated_target() -> None:
    """Two cases may lead to one step; the steps are listed once."""
    flow = RecursionFlow(use_cli=False)
    flow._ms_params = {"limit": 1}
    flow.count = 1
    flow.check()
    assert flow._ms_transition == Transition(("work", "end"), None, "verdict", {"again": "work", "done": "end"})
    assert flow.verdict == "done"


def test_end_records_no_transition() -> None:
    """end does not call self.next."""
    flow = _example("hello")
    flow.message = "hi"
    flow.end()
    assert flow._ms_transition is None


def test_next_twice_raises() -> None:
    """A second self.next in one task is an error naming the step."""
    flow = _example("hello")
    flow._ms_step_name = "start"
    flow.start()
    with pytest.raises(FlowError, match=r"step 'start' called self\.next more than once"):
        flow.next(flow.end)


class _Other(FlowSpec):
    """Another flow, whose steps are not this flow's."""

    @step
    def start(self):
        """First."""
        self.next(self.end)

    @step
    def end(self):
        """Last."""


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda f: f.next(), "at least one step"),
        (lambda f: f.next(f.greet, num_parallel=2), "num_parallel"),
        (lambda f: f.next(f.greet, foreach="x", condition="y"), "foreach= or condition=, not both"),
        (lambda f: f.next({"a": f.greet}), "needs condition="),
        (lambda f: f.next(f.greet, condition="c"), "takes one dict of branches"),
        (lambda f: f.next(f.greet, f.end, foreach="x"), "exactly one step"),
        (lambda f: f.next("greet"), "takes steps of this flow"),
        (lambda f: f.next(f.foreach_stack), "takes steps of this flow"),
        (lambda f: f.next(_Other(use_cli=False).end), "takes steps of this flow"),
    ],
)
def test_bad_next_calls(call: Any, fragment: str) -> None:
    """Malformed self.next calls raise FlowError and record nothing."""
    flow = _example("hello")
    with pytest.raises(FlowError) as raised:
        call(flow)
    assert fragment in str(raised.value)
    assert flow._ms_transition is None


# ------------------------------------------------------------------ artifacts and foreach


def test_artifacts_and_lazy_loading() -> None:
    """Set artifacts are plain attributes; inherited ones load on first read, once."""
    flow = _example("hello")
    loads: list[str] = []
    flow._ms_loader = lambda ref: loads.append(ref.sha) or f"value of {ref.sha[:4]}"
    flow._ms_lazy = {"old": _ref("old")}
    flow.new = 1
    assert "new" in flow and "old" in flow and "_ms_lazy" not in flow
    assert flow._ms_artifact_names() == {"new", "old"}
    assert flow.old == f"value of {_ref('old').sha[:4]}"
    assert flow.old == f"value of {_ref('old').sha[:4]}"
    assert loads == [_ref("old").sha]
    with pytest.raises(AttributeError, match="has no attribute 'missing' in step 'greet'"):
        flow._ms_step_name = "greet"
        _ = flow.missing


def test_unbound_loader_refuses() -> None:
    """Outside a task nothing can be loaded."""
    flow = _example("hello")
    flow._ms_lazy = {"old": _ref("old")}
    with pytest.raises(FlowError, match="inside a running task"):
        _ = flow.old


def test_deleting_a_lazy_artifact() -> None:
    """del drops an inherited artifact without loading it."""
    flow = _example("hello")
    flow._ms_lazy = {"old": _ref("old")}
    del flow.old
    assert "old" not in flow
    flow.new = 1
    del flow.new
    assert "new" not in flow


def test_foreach_accessors() -> None:
    """index, input and foreach_stack() describe the foreach frames; None outside one."""
    flow = _example("hello")
    assert flow.index is None and flow.input is None and flow.foreach_stack() == []
    flow._ms_foreach = [ForeachFrame(1, 3, "b"), ForeachFrame(0, 2, 10)]
    assert flow.index == 0 and flow.input == 10
    assert flow.foreach_stack() == [(1, 3, "b"), (0, 2, 10)]
    assert flow.name == "HelloFlow"


# ------------------------------------------------------------------ merge_artifacts


def _ref(value: str) -> ArtifactRef:
    return ArtifactRef(hashlib.sha256(value.encode()).hexdigest(), len(value), "str")


def _input(step_name: str, **artifacts: str) -> FlowSpec:
    flow = _example("branch")
    flow._ms_step_name = step_name
    flow._ms_input_refs = {name: _ref(value) for name, value in artifacts.items()}
    return flow


def _join(**own: Any) -> FlowSpec:
    flow = _example("branch")
    flow._ms_step_name = "pick"
    flow._ms_in_join = True
    for name, value in own.items():
        setattr(flow, name, value)
    return flow


def _inputs() -> Inputs:
    return Inputs(
        [
            _input("linear_model", seed="42", data="d", score="1", model="linear", only_a="a"),
            _input("tree_model", seed="42", data="d", score="2", model="tree"),
        ]
    )


def test_merge_same_values() -> None:
    """Artifacts equal in every input (same sha) are merged, lazily."""
    join = _join()
    inputs = _inputs()
    join.merge_artifacts(inputs, exclude=["score", "model"])
    assert join._ms_lazy == {"seed": _ref("42"), "data": _ref("d"), "only_a": _ref("a")}
    join._ms_loader = lambda ref: {_ref("42").sha: 42}[ref.sha]
    assert join.seed == 42


def test_merge_conflict_lists_the_names() -> None:
    """Artifacts that differ raise MergeArtifactsError naming each, sorted."""
    join = _join()
    with pytest.raises(MergeArtifactsError) as raised:
        join.merge_artifacts(_inputs())
    assert raised.value.artifact_names == ["model", "score"]
    assert "cannot merge artifacts whose values differ between inputs: model, score" in str(raised.value)
    assert "'pick'" in str(raised.value)
    assert isinstance(raised.value, FlowError)


def test_already_set_attribute_wins() -> None:
    """An artifact set in the join is neither merged nor a conflict."""
    join = _join(score=3, model="both")
    join.merge_artifacts(_inputs())
    assert join.score == 3 and join.model == "both"
    assert set(join._ms_lazy) == {"seed", "data", "only_a"}


def test_merge_include() -> None:
    """include= merges only the names given; conflicts elsewhere do not matter."""
    join = _join()
    join.merge_artifacts(_inputs(), include=["seed"])
    assert join._ms_lazy == {"seed": _ref("42")}
    with pytest.raises(MergeArtifactsError) as raised:
        _join().merge_artifacts(_inputs(), include=["seed", "score"])
    assert raised.value.artifact_names == ["score"]


def test_merge_include_missing_name_raises() -> None:
    """An included name that no input has is an error."""
    with pytest.raises(FlowError, match=r"include names artifacts no input has: \['nothing'\]"):
        _join().merge_artifacts(_inputs(), include=["seed", "nothing"])


def test_merge_include_and_exclude_together_raises() -> None:
    """include= and exclude= are exclusive."""
    with pytest.raises(FlowError, match="include= or exclude=, not both"):
        _join().merge_artifacts(_inputs(), include=["seed"], exclude=["score"])


def test_merge_outside_a_join_raises() -> None:
    """Only a join step may merge."""
    flow = _example("branch")
    with pytest.raises(FlowError, match="only be called in a join step"):
        flow.merge_artifacts(_inputs())


def test_inputs_access() -> None:
    """inputs iterates, indexes, has a length and names inputs by step."""
    inputs = _inputs()
    assert len(inputs) == 2
    assert [i._ms_step_name for i in inputs] == ["linear_model", "tree_model"]
    assert inputs[1] is inputs.tree_model
    with pytest.raises(AttributeError, match="no input from a step named 'nope'"):
        _ = inputs.nope


# ------------------------------------------------------------------ current


def test_current_outside_a_flow() -> None:
    """Outside a running task every field is None and is_running_flow is False."""
    assert current.is_running_flow is False
    assert current.flow_name is None
    assert current.run_id is None
    assert current.retry_count is None
    assert "not in a running flow" in repr(current)
    with pytest.raises(AttributeError, match="current has no attribute 'nope'"):
        _ = current.nope


def test_current_inside_a_task() -> None:
    """The task runner fills current and clears it afterwards."""
    current._set(flow_name="F", run_id="1", step_name="start", task_id="2", retry_count=0, pathspec="F/1/start/2")
    try:
        assert current.is_running_flow is True
        assert current.flow_name == "F" and current.retry_count == 0
        assert current.tags is None
        assert repr(current) == "<current F/1/start/2 retry=0>"
    finally:
        current._clear()
    assert current.is_running_flow is False
    with pytest.raises(TypeError, match="unknown current fields"):
        current._set(nope=1)
