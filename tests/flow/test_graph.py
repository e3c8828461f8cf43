"""The flow graph: every validation rule on a broken flow file, and well-formed flows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import networkx as nx
import pytest

from millstream.errors import FlowValidationError
from millstream.flow.graph import FlowGraph, to_digraph, to_dot, to_mermaid

from . import flows
from .loader import BROKEN, EXAMPLES, flow_class, import_error, marked_line

# (file stem in broken/, fragment of the problem's message, whether it is the only problem)
GRAPH_CASES = [
    ("no_start", "has no 'start' step", True),
    ("no_end", "has no 'end' step", True),
    ("no_next", "does not end with self.next", False),
    ("next_not_last", "self.next must be the last statement", False),
    ("unknown_step", "goes to unknown step 'middel'", True),
    ("unreachable", "step 'orphan' cannot be reached from start", True),
    ("cycle_without_switch", "steps form a cycle: a -> b -> a", True),
    ("join_different_splits", "has inputs from different splits", True),
    ("branch_never_joined", "the split in step 'start' is never joined", True),
    ("foreach_never_joined", "the foreach in step 'start' is never joined", True),
    ("inputs_not_join", "takes inputs but no split precedes it", True),
    ("join_without_inputs", "so it must be a join", True),
    ("join_misses_branch", "does not join the branch(es) c of the split in 'start'", False),
    ("reserved_step_name", "step name 'index' is reserved", True),
    ("step_defined_twice", "step 'middle' is defined twice", True),
    ("parameter_step_collision", "parameter 'greet' has the name of a step", True),
    ("parameter_after_step", "parameter 'greet' has the name of a step", False),
    ("parameter_cli_name_collision", "parameter 'greet' has the name of a step", True),
    ("assigns_parameter", "assigns self.alpha, which is a parameter", True),
    ("reserved_artifact", "assigns self.index, a reserved name", True),
    ("end_calls_next", "step 'end' must not call self.next", True),
    ("foreach_non_literal", "self.next(foreach=...) in step 'start' must be a string literal", False),
    ("switch_without_condition", "needs condition='attr'", False),
]

# Decorator errors raise while the class body runs, so importing the file fails.
IMPORT_CASES = [
    ("retry_negative", "@retry(times=...) must be a non-negative integer, got -1"),
    ("timeout_without_time", "@timeout needs seconds=, minutes= or hours="),
    ("unknown_decorator_attribute", "@retry got unknown attribute(s) tims"),
    ("decorator_twice", "step 'start' has @retry twice"),
]


def test_every_broken_file_has_a_case() -> None:
    """No broken flow goes untested, and no case names a missing file."""
    stems = {p.stem for p in BROKEN.glob("*.py")}
    cases = [c[0] for c in GRAPH_CASES] + [c[0] for c in IMPORT_CASES]
    assert sorted(cases) == sorted(stems)


@pytest.mark.parametrize(("stem", "fragment", "only"), GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_broken_flow_is_rejected(stem: str, fragment: str, only: bool) -> None:
    """The graph reports the rule at the marked line of the file, with a fix."""
    path = BROKEN / f"{stem}.py"
    graph = FlowGraph(flow_class(path))
    matching = [p for p in graph.problems if fragment in p.bare_message]
    assert matching, [p.bare_message for p in graph.problems]
    problem = matching[0]
    assert problem.line == marked_line(path)
    assert Path(problem.file).resolve() == path
    assert problem.fix
    assert f"{path.name}:{problem.line}: " in str(problem)
    assert "Fix: " in str(problem)
    if only:
        assert graph.problems == [problem]
    with pytest.raises(FlowValidationError) as raised:
        graph.validate()
    assert raised.value is graph.problems[0]


@pytest.mark.parametrize(("stem", "fragment"), IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_broken_decorator_fails_at_import(stem: str, fragment: str) -> None:
    """A bad decorator raises while the class is defined, naming the file and line."""
    path = BROKEN / f"{stem}.py"
    error = import_error(path)
    assert fragment in error.bare_message
    assert error.line == marked_line(path)
    assert error.file is not None and Path(error.file).resolve() == path
    assert error.fix


# ------------------------------------------------------------------ the examples

S = "split"
F = "foreach"
# example -> step -> (type, split_stack, closes)
EXAMPLE_SHAPES: dict[str, dict[str, tuple[str, list[tuple[str, str, str | None]], str | None]]] = {
    "hello": {
        "start": ("start", [], None),
        "greet": ("linear", [], None),
        "end": ("end", [], None),
    },
    "branch": {
        "start": ("split", [], None),
        "linear_model": ("linear", [(S, "start", "linear_model")], None),
        "tree_model": ("linear", [(S, "start", "tree_model")], None),
        "pick": ("join", [], "start"),
        "end": ("end", [], None),
    },
    "foreach": {
        "start": ("foreach", [], None),
        "square": ("linear", [(F, "start", None)], None),
        "join": ("join", [], "start"),
        "end": ("end", [], None),
    },
    "nested_foreach": {
        "start": ("foreach", [], None),
        "per_model": ("foreach", [(F, "start", None)], None),
        "fit": ("linear", [(F, "start", None), (F, "per_model", None)], None),
        "per_model_join": ("join", [(F, "start", None)], "per_model"),
        "join": ("join", [], "start"),
        "end": ("end", [], None),
    },
    "parameters": {
        "start": ("start", [], None),
        "end": ("end", [], None),
    },
    "switch": {
        "start": ("split-switch", [], None),
        "small": ("linear", [], None),
        "large": ("linear", [], None),
        "end": ("end", [], None),
    },
}


def test_every_example_has_a_shape() -> None:
    """A new example must be described here too."""
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(EXAMPLE_SHAPES)


def _example(stem: str) -> FlowGraph:
    return FlowGraph(flow_class(EXAMPLES / f"{stem}.py"))


@pytest.mark.parametrize("stem", sorted(EXAMPLE_SHAPES))
def test_example_graph(stem: str) -> None:
    """Each example parses cleanly, with the expected types, stacks and joins."""
    graph = _example(stem)
    assert graph.problems == []
    graph.validate()
    shape = EXAMPLE_SHAPES[stem]
    assert set(graph.nodes) == set(shape)
    for name, (kind, stack, closes) in shape.items():
        node = graph[name]
        assert node.type == kind, name
        assert [tuple(s) for s in node.split_stack] == stack, name
        assert node.foreach_stack == [split for k, split, _ in stack if k == F], name
        assert node.closes == closes, name


def test_example_details() -> None:
    """Transitions, inputs, foreach variables, switch cases and decorators are recorded."""
    foreach = _example("foreach")
    assert foreach["start"].out == ["square"]
    assert foreach["start"].foreach_var == "numbers"
    assert foreach["join"].is_join and foreach["join"].in_funcs == ["square"]
    assert [p.name for p in foreach.parameters] == ["count"]

    switch = _example("switch")
    assert switch["start"].condition == "route"
    assert switch["start"].cases == {"small": "small", "large": "large"}
    assert sorted(switch["end"].in_funcs) == ["large", "small"]
    assert not switch["end"].is_join

    branch = _example("branch")
    assert branch["start"].out == ["linear_model", "tree_model"]
    assert branch["pick"].doc.startswith("Keep the best")
    assert [n.name for n in branch.sorted_nodes()] == ["start", "linear_model", "tree_model", "pick", "end"]
    assert [n.name for n in branch] == ["start", "linear_model", "tree_model", "pick", "end"]

    fit = _example("nested_foreach")["fit"]
    assert [d.name for d in fit.decorators] == ["catch", "retry"]
    assert fit.line == _def_line(EXAMPLES / "nested_foreach.py", "fit")


def _def_line(path: Path, name: str) -> int:
    lines = path.read_text().splitlines()
    return next(n for n, text in enumerate(lines, 1) if text.strip().startswith(f"def {name}("))


# ------------------------------------------------------------------ accepted shapes


def test_switch_recursion_is_accepted() -> None:
    """A switch case back to an earlier step is a loop, not a merge of branches."""
    graph = FlowGraph(flows.RecursionFlow)
    assert graph.problems == []
    assert graph["check"].type == "split-switch"
    assert graph["check"].out == ["work", "end"]
    assert sorted(graph["work"].in_funcs) == ["check", "start"]
    assert graph["work"].type == "linear" and graph["work"].split_stack == []


def test_switch_looping_to_itself_is_accepted() -> None:
    """A switch may name itself as a case: poll until ready."""
    graph = FlowGraph(flows.SelfLoopFlow)
    assert graph.problems == []
    assert graph["poll"].out == ["poll", "end"]
    assert sorted(graph["poll"].in_funcs) == ["poll", "start"]


def test_switch_branches_may_merge_at_a_plain_step() -> None:
    """Only one case of a switch runs, so the step they meet at needs no inputs."""
    graph = FlowGraph(flows.SwitchMergeFlow)
    assert graph.problems == []
    assert graph["merge"].type == "linear"
    assert sorted(graph["merge"].in_funcs) == ["a", "b", "start"]
    assert graph["start"].cases == {"a": "a", "b": "b", "skip": "merge"}


def test_branch_and_switch_inside_a_foreach() -> None:
    """Splits nest: each join closes the innermost split of its inputs."""
    graph = FlowGraph(flows.BranchInForeachFlow)
    assert graph.problems == []
    fe = (F, "start", None)
    assert graph["right_x"].split_stack == [fe, (S, "body", "right")]
    assert graph["inner_join"].closes == "body"
    assert graph["inner_join"].split_stack == [fe]
    assert graph["inner_join"].foreach_stack == ["start"]
    assert graph["outer_join"].closes == "start"
    assert graph["outer_join"].split_stack == []


# ------------------------------------------------------------------ exports

ALL_GRAPHS = [
    *sorted(EXAMPLE_SHAPES),
    "RecursionFlow",
    "SelfLoopFlow",
    "SwitchMergeFlow",
    "BranchInForeachFlow",
    "DecoratedFlow",
]


def _graph(name: str) -> FlowGraph:
    return FlowGraph(getattr(flows, name)) if name[0].isupper() else _example(name)


@pytest.mark.parametrize("name", ALL_GRAPHS)
def test_to_dict_is_json(name: str) -> None:
    """The graph survives a JSON round trip unchanged."""
    data = _graph(name).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert next(iter(data["steps"])) == "start"


def test_to_dict_content() -> None:
    """Parameters, decorators and steps appear in the JSON form."""
    data = json.loads(json.dumps(_example("parameters").to_dict()))
    assert data["flow"] == "ParameterFlow"
    params = {p["name"]: p for p in data["parameters"]}
    assert params["alpha"] == {
        "name": "alpha",
        "type": "float",
        "default": 0.5,
        "required": False,
        "help": "learning rate",
    }
    assert params["config"]["type"] == "JSON"
    assert params["greeting"]["default"] == "<computed>"
    assert params["verbose"]["type"] == "bool"

    decorated = json.loads(json.dumps(FlowGraph(flows.DecoratedFlow).to_dict()))
    assert decorated["flow_decorators"]["schedule"]["attributes"]["cron"] == "*/5 * * * *"
    start = decorated["steps"]["start"]
    assert {d["name"]: d["attributes"] for d in start["decorators"]} == {
        "retry": {"times": 2, "minutes_between_retries": 0},
        "timeout": {"seconds": 0, "minutes": 1, "hours": 0},
    }
    end = decorated["steps"]["end"]
    assert {d["name"] for d in end["decorators"]} == {"catch", "environment"}
    assert end["type"] == "end" and end["in"] == ["start"] and end["out"] == []


@pytest.mark.parametrize("name", ALL_GRAPHS)
def test_to_digraph(name: str) -> None:
    """The DiGraph has a node per step carrying its JSON form, and an edge per transition."""
    graph = _graph(name)
    data = graph.to_dict()
    g = to_digraph(data)
    assert isinstance(g, nx.DiGraph)
    assert g.graph["flow"] == graph.name
    assert set(g.nodes) == set(graph.nodes)
    assert set(g.edges) == {(n.name, t) for n in graph for t in n.out}
    for node in graph:
        assert g.nodes[node.name]["type"] == node.type
        assert g.nodes[node.name] == data["steps"][node.name]


def test_to_digraph_edges_of_an_example() -> None:
    """The nested foreach's edges, spelled out."""
    g = to_digraph(_example("nested_foreach").to_dict())
    assert set(g.edges) == {
        ("start", "per_model"),
        ("per_model", "fit"),
        ("fit", "per_model_join"),
        ("per_model_join", "join"),
        ("join", "end"),
    }
    assert g.nodes["per_model"]["foreach_var"] == "folds"
    assert g.nodes["per_model_join"]["closes"] == "per_model"


@pytest.mark.parametrize("name", ALL_GRAPHS)
def test_to_dot(name: str) -> None:
    """The DOT text declares every step and every edge."""
    graph = _graph(name)
    text = to_dot(graph.to_dict())
    assert text.startswith(f'digraph "{graph.name}" {{')
    assert text.rstrip().endswith("}")
    for node in graph:
        assert f'"{node.name}" [label="{node.name}\\n({node.type})"' in text
        for target in node.out:
            assert f'"{node.name}" -> "{target}"' in text


def _mermaid_ids(line: str) -> list[str]:
    # Labels ("..." and |...|) are free text; what is left are node ids and arrows.
    bare = re.sub(r'"[^"]*"|\|[^|]*\|', "", line)
    return re.findall(r"[A-Za-z_]\w*", bare)


@pytest.mark.parametrize("name", ALL_GRAPHS)
def test_to_mermaid(name: str) -> None:
    """Every step is a node and every transition an edge; no node id is the keyword ``end``."""
    graph = _graph(name)
    lines = to_mermaid(graph.to_dict()).splitlines()
    assert lines[0] == "flowchart TD"
    ids = [i for line in lines[1:] for i in _mermaid_ids(line)]
    assert "end" not in ids
    for node in graph:
        assert any(f'["{node.name} ({node.type})"]' in line for line in lines)
        for target in node.out:
            assert any(re.fullmatch(rf"\s*n_{node.name} -->(\|[^|]*\|)? n_{target}", line) for line in lines)


def test_mermaid_and_dot_label_switch_and_foreach_edges() -> None:
    """Edge labels say which foreach variable or switch case they stand for."""
    switch = _example("switch").to_dict()
    assert "n_start -->|route=small| n_small" in to_mermaid(switch)
    assert '"start" -> "large" [label="route=large"];' in to_dot(switch)
    foreach = _example("foreach").to_dict()
    assert "n_start -->|foreach numbers| n_square" in to_mermaid(foreach)
    assert '"start" -> "square" [label="foreach numbers"];' in to_dot(foreach)
