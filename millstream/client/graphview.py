"""What ``check`` and ``show`` print about a flow's graph."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from millstream.errors import FlowValidationError
from millstream.flow.graph import FlowGraph, Node, to_dot, to_mermaid

SHOW_FORMATS = ("text", "dot", "mermaid")


def format_problems(graph: FlowGraph, problems: Sequence[FlowValidationError] | None = None) -> str:
    """Every problem of the graph as ``file:line: message`` with its ``Fix:`` line."""
    problems = graph.problems if problems is None else problems
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    body = "".join(f"{p}\n" for p in problems)
    return f"Flow {graph.name} has {count}:\n{body}"


def check_report(graph: FlowGraph) -> tuple[bool, str]:
    """``(valid, text)``: the step count of a valid flow, or every problem of an invalid one."""
    if graph.problems:
        return False, format_problems(graph)
    steps = len(graph.nodes)
    return True, f"Flow {graph.name} is valid: {steps} step{'s' if steps != 1 else ''}\n"


def render_graph(graph: FlowGraph, fmt: str) -> str:
    """The graph as ``text`` (like Metaflow's ``show``), Graphviz ``dot`` or ``mermaid``."""
    if fmt == "dot":
        return to_dot(graph.to_dict())
    if fmt == "mermaid":
        return to_mermaid(graph.to_dict())
    if fmt == "text":
        return show_text(graph)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(SHOW_FORMATS)}")


def show_text(graph: FlowGraph) -> str:
    """The flow's docstring, parameters and each step with its type, doc and next steps."""
    out: list[str] = []
    doc = inspect.getdoc(graph.flow_cls)
    if doc:
        out += [doc, ""]
    if graph.parameters:
        out.append("Parameters")
        for param in graph.parameters:
            info = param.describe()
            extra = " (required)" if info["required"] else f" (default: {_default_text(info['default'])})"
            help_text = f": {info['help']}" if info["help"] else ""
            out.append(f"    --{info['name']} {info['type']}{extra}{help_text}")
        out.append("")
    for node in graph.sorted_nodes():
        out.append(f"Step {node.name} ({node.type})")
        first_doc = node.doc.strip().splitlines()[0] if node.doc.strip() else ""
        if first_doc:
            out.append(f"    {first_doc}")
        # Decorators are stored innermost first; show them as they are written.
        for deco in reversed(node.decorators):
            out.append(f"    {deco!r}")
        targets = _targets(node)
        if targets:
            out.append(f"    => {targets}")
        out.append("")
    return "\n".join(out)


def _default_text(default: object) -> str:
    if default == "<computed>":
        return "computed"
    return repr(default) if default == "" else str(default)


def _targets(node: Node) -> str:
    if node.type == "foreach":
        return f"{', '.join(node.out)} (foreach {node.foreach_var})"
    if node.type == "split-switch" and node.cases:
        cases: dict[str, list[str]] = {}
        for key, target in node.cases.items():
            cases.setdefault(target, []).append(key)
        return ", ".join(f"{t} ({node.condition}={'|'.join(keys)})" for t, keys in cases.items())
    return ", ".join(node.out)

