"""The flow graph: the AST of the flow class turned into steps and transitions.

As in Metaflow, the graph is read from the source (each step's last statement,
``self.next(...)``), not from running it, so a malformed flow is rejected before any
task starts, with the file, the line and a fix. Node types follow Metaflow's names:
``start``, ``linear``, ``split`` (a branch), ``foreach``, ``split-switch``, ``join``
and ``end``.

Each node also carries the *split stack* it lives in: the branch and foreach splits
that enclose it, outermost first, as ``[kind, split_step, branch_step]`` triples. The
scheduler uses ``foreach_stack`` (the foreach steps alone) to name tasks, and a join
closes the innermost split of its inputs.

The graph travels to the daemon as plain JSON (:meth:`FlowGraph.to_dict`); the
daemon and ``show`` turn it into a networkx ``DiGraph`` with :func:`to_digraph`.
Building it needs no networkx, so ``run`` starts fast.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from millstream.errors import FlowValidationError
from millstream.flow.decorators import FlowDecorator, StepDecorator
from millstream.flow.parameters import Parameter, flow_parameters

if TYPE_CHECKING:
    import networkx as nx

# Names a step or an artifact may not take: FlowSpec's own members.
RESERVED_NAMES = frozenset(
    {"next", "input", "index", "foreach_stack", "merge_artifacts", "name", "inputs", "cmd", "script_name"}
)


@dataclass
class Node:
    """One step of the flow as the graph sees it."""

    name: str
    file: str
    line: int
    num_args: int = 1
    doc: str = ""
    type: str = "linear"
    out: list[str] = field(default_factory=list)
    foreach_var: str | None = None
    condition: str | None = None
    cases: dict[str, str] | None = None
    decorators: list[StepDecorator] = field(default_factory=list)
    tail_line: int | None = None
    in_funcs: list[str] = field(default_factory=list)
    split_stack: list[tuple[str, str, str | None]] = field(default_factory=list)
    closes: str | None = None  # the split step a join closes
    has_next: bool = False

    @property
    def is_join(self) -> bool:
        """True when the step takes ``inputs``."""
        return self.num_args > 1

    @property
    def foreach_stack(self) -> list[str]:
        """The foreach steps enclosing this one, outermost first."""
        return [split for kind, split, _ in self.split_stack if kind == "foreach"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form sent to the daemon."""
        return {
            "name": self.name,
            "type": self.type,
            "is_join": self.is_join,
            "out": list(self.out),
            "in": list(self.in_funcs),
            "foreach_var": self.foreach_var,
            "condition": self.condition,
            "cases": dict(self.cases) if self.cases else None,
            "decorators": [d.to_dict() for d in self.decorators],
            "file": self.file,
            "line": self.line,
            "doc": self.doc,
            "split_stack": [list(s) for s in self.split_stack],
            "foreach_stack": self.foreach_stack,
            "closes": self.closes,
        }


def _is_self_attr(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _is_next_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and _is_self_attr(node.value.func) == "next"


def _class_parameters(cls_node: ast.ClassDef, klass: type) -> set[str]:
    """Names the class body binds to a Parameter (by value, or by a Parameter(...) call)."""
    names: set[str] = set()
    for item in cls_node.body:
        targets: list[ast.expr]
        value: ast.expr | None
        if isinstance(item, ast.Assign):
            targets, value = item.targets, item.value
        elif isinstance(item, ast.AnnAssign):
            targets, value = [item.target], item.value
        else:
            continue
        func = value.func if isinstance(value, ast.Call) else None
        callee = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        for target in targets:
            if isinstance(target, ast.Name) and (
                callee in ("Parameter", "IncludeFile") or isinstance(klass.__dict__.get(target.id), Parameter)
            ):
                names.add(target.id)
    return names


class FlowGraph:
    """The steps of a flow class, their transitions and their validation."""

    def __init__(self, flow_cls: type) -> None:
        self.flow_cls = flow_cls
        self.name = flow_cls.__name__
        self.file = inspect.getsourcefile(flow_cls) or "<unknown>"
        try:
            self.line = inspect.getsourcelines(flow_cls)[1]
        except (OSError, TypeError):
            self.line = 1
        self.nodes: dict[str, Node] = {}
        self.problems: list[FlowValidationError] = []
        self.parameters: list[Parameter] = flow_parameters(flow_cls)
        self.flow_decorators: dict[str, FlowDecorator] = dict(getattr(flow_cls, "_flow_decorators", {}))
        self._assignments: dict[str, list[tuple[str, int]]] = {}  # artifact -> [(step, line)]
        self._parse()
        self._link()
        self._check()

    # ----------------------------------------------------------------- parsing
    def _problem(self, message: str, line: int | None = None, fix: str | None = None) -> None:
        self.problems.append(FlowValidationError(message, file=self.file, line=line or self.line, fix=fix))

    def _parse(self) -> None:
        from millstream.flow.spec import FlowSpec

        classes = [k for k in reversed(self.flow_cls.__mro__) if issubclass(k, FlowSpec) and k is not FlowSpec]
        for klass in classes:
            try:
                lines, start = inspect.getsourcelines(klass)
                file = inspect.getsourcefile(klass) or self.file
            except (OSError, TypeError):
                self._problem(f"cannot read the source of class {klass.__name__}", fix="define flows in a .py file")
                continue
            tree = ast.parse(textwrap.dedent("".join(lines)))
            cls_node = next(n for n in tree.body if isinstance(n, ast.ClassDef))
            seen: dict[str, int] = {}
            params = _class_parameters(cls_node, klass)
            for item in cls_node.body:
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                line = item.lineno + start - 1
                if item.name in params and any(
                    getattr(d, "id", getattr(d, "attr", None)) == "step" for d in item.decorator_list
                ):
                    # The later of the two class attributes silently replaces the other.
                    self._problem(
                        f"parameter {item.name!r} has the name of a step", line, fix="rename the parameter or the step"
                    )
                func = klass.__dict__.get(item.name)
                if not getattr(func, "is_step", False):
                    if item.name in seen and item.name in self.nodes:
                        pass
                    continue
                if item.name in seen:
                    self._problem(
                        f"step {item.name!r} is defined twice (lines {seen[item.name]} and {line})",
                        line,
                        fix="rename or remove one of them",
                    )
                seen[item.name] = line
                self.nodes[item.name] = self._parse_step(item, func, file, line, start)

    def _parse_step(
        self, item: ast.FunctionDef | ast.AsyncFunctionDef, func: Any, file: str, line: int, start: int
    ) -> Node:
        node = Node(
            name=item.name,
            file=file,
            line=line,
            num_args=len(item.args.args),
            doc=inspect.getdoc(func) or "",
            decorators=list(getattr(func, "decorators", [])),
        )
        if isinstance(item, ast.AsyncFunctionDef):
            self._problem(
                f"step {item.name!r} is async; steps are plain functions", line, fix=f"def {item.name}(self): ..."
            )
        if node.num_args > 2 or item.args.vararg or item.args.kwonlyargs:
            self._problem(
                f"step {item.name!r} takes too many arguments",
                line,
                fix=f"def {item.name}(self) or, for a join, def {item.name}(self, inputs)",
            )
        for sub in ast.walk(item):
            targets: list[ast.AST] = []
            if isinstance(sub, ast.Assign):
                targets = list(sub.targets)
            elif isinstance(sub, (ast.AugAssign, ast.AnnAssign)):
                targets = [sub.target]
            for target in targets:
                for t in ast.walk(target):
                    attr = _is_self_attr(t)
                    if attr is not None:
                        line_no = getattr(sub, "lineno", item.lineno)
                        self._assignments.setdefault(attr, []).append((item.name, line_no + start - 1))
        tail = item.body[-1]
        node.tail_line = tail.lineno + start - 1
        calls = [n for n in ast.walk(item) if isinstance(n, ast.Call) and _is_self_attr(n.func) == "next"]
        if item.name == "end":
            node.type = "end"
            if calls:
                self._problem(
                    "step 'end' must not call self.next",
                    calls[0].lineno + start - 1,
                    fix="remove the self.next call: end is the last step",
                )
            return node
        if not _is_next_call(tail):
            if calls:
                self._problem(
                    f"self.next must be the last statement of step {item.name!r}",
                    calls[0].lineno + start - 1,
                    fix="move self.next(...) to the end of the step",
                )
            else:
                self._problem(
                    f"step {item.name!r} does not end with self.next(...)",
                    line,
                    fix="end the step with self.next(self.<following step>)",
                )
            return node
        node.has_next = True
        call = tail.value  # type: ignore[attr-defined]
        self._parse_next(node, call, tail.lineno + start - 1)
        return node

    def _parse_next(self, node: Node, call: ast.Call, line: int) -> None:
        keywords = {}
        for kw in call.keywords:
            if kw.arg not in ("foreach", "condition"):
                self._problem(
                    f"self.next in step {node.name!r} takes unknown keyword {kw.arg!r}",
                    line,
                    fix="use foreach='attr' or condition='attr'",
                )
                return
            if not (isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)):
                self._problem(
                    f"self.next({kw.arg}=...) in step {node.name!r} must be a string literal",
                    line,
                    fix=f"self.next(..., {kw.arg}='attribute_name')",
                )
                return
            keywords[kw.arg] = kw.value.value
        if len(call.args) == 1 and isinstance(call.args[0], ast.Dict):
            if "condition" not in keywords:
                self._problem(
                    f"switch in step {node.name!r} needs condition='attr'",
                    line,
                    fix="self.next({'a': self.a, 'b': self.b}, condition='choice')",
                )
                return
            cases: dict[str, str] = {}
            for key, value in zip(call.args[0].keys, call.args[0].values, strict=False):
                target = _is_self_attr(value)
                if not (isinstance(key, ast.Constant) and isinstance(key.value, (str, int, bool))) or not target:
                    self._problem(
                        f"switch cases in step {node.name!r} must map literals to self.<step>",
                        line,
                        fix="self.next({'a': self.a, 'b': self.b}, condition='choice')",
                    )
                    return
                cases[str(key.value)] = target
            node.type, node.cases, node.condition = "split-switch", cases, keywords["condition"]
            node.out = list(dict.fromkeys(cases.values()))
            return
        if "condition" in keywords:
            self._problem(
                f"condition= in step {node.name!r} needs a dict of branches",
                line,
                fix="self.next({'a': self.a, 'b': self.b}, condition='choice')",
            )
            return
        targets = [_is_self_attr(a) for a in call.args]
        if not targets or any(t is None for t in targets):
            self._problem(
                f"self.next in step {node.name!r} must name steps as self.<step>",
                line,
                fix="self.next(self.a) or self.next(self.a, self.b)",
            )
            return
        node.out = [t for t in targets if t]
        if len(set(node.out)) != len(node.out):
            self._problem(f"step {node.name!r} names the same step twice in self.next", line)
        if "foreach" in keywords:
            if len(node.out) != 1:
                self._problem(
                    f"a foreach in step {node.name!r} must go to exactly one step",
                    line,
                    fix=f"self.next(self.body, foreach={keywords['foreach']!r})",
                )
                return
            node.type, node.foreach_var = "foreach", keywords["foreach"]
        elif len(node.out) > 1:
            node.type = "split"
        else:
            node.type = "linear"

    # ----------------------------------------------------------------- linking
    def _link(self) -> None:
        for node in self.nodes.values():
            for target in node.out:
                if target in self.nodes:
                    self.nodes[target].in_funcs.append(node.name)
        for node in self.nodes.values():
            if node.type == "linear" and node.is_join:
                node.type = "join"
            if node.name == "start" and node.type == "linear":
                node.type = "start"

    # ----------------------------------------------------------------- checks
    def _check(self) -> None:
        if "start" not in self.nodes:
            self._problem(f"flow {self.name} has no 'start' step", fix="add @step def start(self): ...")
        if "end" not in self.nodes:
            self._problem(f"flow {self.name} has no 'end' step", fix="add @step def end(self): ...")
        for node in self.nodes.values():
            if node.name in RESERVED_NAMES:
                self._problem(f"step name {node.name!r} is reserved", node.line, fix="rename the step")
            for target in node.out:
                if target not in self.nodes:
                    self._problem(
                        f"step {node.name!r} goes to unknown step {target!r}",
                        node.tail_line,
                        fix=f"define @step def {target}(self) or fix the name",
                    )
            if node.name == "start" and node.is_join:
                self._problem("step 'start' cannot take inputs", node.line, fix="def start(self): ...")
        self._check_parameters()
        self._check_artifact_names()
        if "start" not in self.nodes or any("unknown step" in p.bare_message for p in self.problems):
            return
        self._check_reachable()
        if self._check_cycles():
            self._walk_splits()

    def _check_parameters(self) -> None:
        by_cli: dict[str, Parameter] = {}
        for param in self.parameters:
            if param.name in by_cli:
                self._problem(f"two parameters are named {param.name!r}", fix="rename one of them")
            by_cli[param.name] = param
            for name in {param.attr_name, param.name}:
                if name in self.nodes:
                    self._problem(
                        f"parameter {name!r} has the name of a step",
                        self.nodes[name].line,
                        fix="rename the parameter or the step",
                    )
                for step, line in self._assignments.get(name, []):
                    self._problem(
                        f"step {step!r} assigns self.{name}, which is a parameter",
                        line,
                        fix="parameters are read-only: store the value under another name",
                    )

    def _check_artifact_names(self) -> None:
        for name, places in self._assignments.items():
            if name in RESERVED_NAMES:
                step, line = places[0]
                self._problem(
                    f"step {step!r} assigns self.{name}, a reserved name", line, fix="use another artifact name"
                )
            elif name in self.nodes:
                step, line = places[0]
                self._problem(
                    f"step {step!r} assigns self.{name}, which is the name of a step",
                    line,
                    fix="use another artifact name",
                )

    def _check_reachable(self) -> None:
        seen = set()
        todo = ["start"]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            todo.extend(self.nodes[name].out)
        for node in self.nodes.values():
            if node.name not in seen:
                self._problem(
                    f"step {node.name!r} cannot be reached from start",
                    node.line,
                    fix=f"call self.next(self.{node.name}) from another step, or remove it",
                )
        if "end" in self.nodes and "end" not in seen:
            pass

    def _check_cycles(self) -> bool:
        # Every cycle must pass through a switch: drop switch edges, the rest is a DAG.
        state: dict[str, int] = {}
        path: list[str] = []

        def visit(name: str) -> bool:
            state[name] = 1
            path.append(name)
            node = self.nodes[name]
            if node.type != "split-switch":
                for target in node.out:
                    if state.get(target) == 1:
                        cycle = [*path[path.index(target) :], target]
                        self._problem(
                            f"steps form a cycle: {' -> '.join(cycle)}",
                            node.tail_line,
                            fix="a loop must go through a switch (self.next({...}, condition=...))",
                        )
                        return False
                    if target not in state and not visit(target):
                        return False
            path.pop()
            state[name] = 2
            return True

        ok = all(visit(n) for n in list(self.nodes) if n not in state)
        if ok:
            for node in self.nodes.values():
                if node.type == "split-switch":
                    for target in node.out:
                        if target not in state:
                            ok = visit(target) and ok
        return ok

    def _walk_splits(self) -> None:
        # Propagate split stacks from start; every arrival at a step must agree.
        arrivals: dict[str, list[tuple[str, list[tuple[str, str, str | None]]]]] = {}
        done: set[str] = set()
        order: list[tuple[str, str | None, list[tuple[str, str, str | None]]]] = [("start", None, [])]
        while order:
            name, parent, stack = order.pop(0)
            node = self.nodes[name]
            if parent is not None:
                arrivals.setdefault(name, []).append((parent, stack))
            if node.is_join:
                if not stack:
                    self._problem(
                        f"step {name!r} takes inputs but no split precedes it",
                        node.line,
                        fix=f"def {name}(self) without inputs, or split before it",
                    )
                    return
                kind, split, _ = stack[-1]
                if node.closes is None:
                    node.closes = split
                elif node.closes != split:
                    self._problem(
                        f"join step {name!r} has inputs from different splits ({node.closes!r} and {split!r})",
                        node.line,
                        fix="join the branches of one split in each join step",
                    )
                    return
                own = stack[:-1]
            else:
                own = stack
            if name in done:
                if [tuple(s) for s in node.split_stack] != [tuple(s) for s in own]:
                    if not node.is_join:
                        self._not_a_join(node, arrivals[name])
                    else:
                        self._problem(
                            f"join step {name!r} has inputs from different splits",
                            node.line,
                            fix="join the branches of one split in each join step",
                        )
                    return
                continue
            done.add(name)
            node.split_stack = list(own)
            if node.type == "end" and own:
                kind, split, _ = own[-1]
                self._problem(
                    f"the {kind} in step {split!r} is never joined before 'end'",
                    self.nodes[split].tail_line,
                    fix="add a join step, def join(self, inputs), that every branch leads to",
                )
                return
            for target in node.out:
                if node.type == "split":
                    child_stack = [*own, ("split", name, target)]
                elif node.type == "foreach":
                    child_stack = [*own, ("foreach", name, None)]
                else:
                    child_stack = own
                order.append((target, name, child_stack))
        self._check_joins(arrivals)

    def _not_a_join(self, node: Node, arrivals: list[tuple[str, list[Any]]]) -> None:
        parents = sorted({p for p, _ in arrivals})
        self._problem(
            f"step {node.name!r} has inputs from the branches {', '.join(parents)}, so it must be a join",
            node.line,
            fix=f"def {node.name}(self, inputs): ...",
        )

    def _check_joins(self, arrivals: dict[str, list[tuple[str, list[Any]]]]) -> None:
        for node in self.nodes.values():
            if not node.is_join:
                # A switch case looping back to this step (recursion) is not a second branch.
                looped = self._descendants(node.name)
                parents = {
                    p
                    for p, _ in arrivals.get(node.name, [])
                    if not (self.nodes[p].type == "split-switch" and p in looped)
                }
                if len(parents) > 1 and not self._switch_merge(node, parents):
                    self._not_a_join(node, arrivals[node.name])
                continue
            if node.closes is None:
                continue
            split = self.nodes[node.closes]
            if split.type == "split":
                reached = {stack[-1][2] for _, stack in arrivals.get(node.name, []) if stack}
                missing = [b for b in split.out if b not in reached]
                if missing:
                    self._problem(
                        f"join step {node.name!r} does not join the branch(es) {', '.join(missing)} "
                        f"of the split in {split.name!r}",
                        node.line,
                        fix="let every branch of the split lead to this join",
                    )

    def _switch_merge(self, node: Node, parents: set[str]) -> bool:
        # Branches of a switch may meet again at a plain step: only one of them ran.
        for switch in self.nodes.values():
            if switch.type == "split-switch" and switch.split_stack == node.split_stack:
                descendants = self._descendants(switch.name)
                if parents <= descendants | {switch.name}:
                    return True
        return False

    def _descendants(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.nodes[name].out)
        while todo:
            n = todo.pop()
            if n not in seen and n in self.nodes:
                seen.add(n)
                todo.extend(self.nodes[n].out)
        return seen

    # ----------------------------------------------------------------- results
    def validate(self) -> None:
        """Raise the first problem, if any (``problems`` has them all)."""
        if self.problems:
            raise self.problems[0]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def sorted_nodes(self) -> list[Node]:
        """Steps in the order a run reaches them (breadth-first from start)."""
        order: list[str] = []
        todo = ["start"] if "start" in self.nodes else []
        while todo:
            name = todo.pop(0)
            if name in order or name not in self.nodes:
                continue
            order.append(name)
            todo.extend(self.nodes[name].out)
        order += [n for n in self.nodes if n not in order]
        return [self.nodes[n] for n in order]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the graph the daemon drives."""
        return {
            "flow": self.name,
            "file": self.file,
            "steps": {n.name: n.to_dict() for n in self.sorted_nodes()},
            "parameters": [p.describe() for p in self.parameters],
            "flow_decorators": {k: d.to_dict() for k, d in self.flow_decorators.items()},
        }


def to_digraph(graph: dict[str, Any]) -> nx.DiGraph:
    """A networkx DiGraph of a graph dict; node data is the step's JSON form."""
    import networkx as nx

    g = nx.DiGraph(flow=graph["flow"])
    for name, data in graph["steps"].items():
        g.add_node(name, **data)
    for name, data in graph["steps"].items():
        for target in data["out"]:
            g.add_edge(name, target)
    return g


def to_dot(graph: dict[str, Any]) -> str:
    """The graph in Graphviz DOT."""
    lines = [f'digraph "{graph["flow"]}" {{', "  rankdir=TB;"]
    for name, data in graph["steps"].items():
        shape = {"split": "diamond", "foreach": "diamond", "split-switch": "hexagon", "join": "invtriangle"}
        lines.append(f'  "{name}" [label="{name}\\n({data["type"]})", shape={shape.get(data["type"], "box")}];')
        for target in data["out"]:
            label = f' [label="foreach {data["foreach_var"]}"]' if data["foreach_var"] else ""
            if data["cases"]:
                keys = [k for k, v in data["cases"].items() if v == target]
                label = f' [label="{data["condition"]}={",".join(keys)}"]'
            lines.append(f'  "{name}" -> "{target}"{label};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(graph: dict[str, Any]) -> str:
    """The graph as a Mermaid flowchart."""
    lines = ["flowchart TD"]
    for name, data in graph["steps"].items():
        lines.append(f'  n_{name}["{name} ({data["type"]})"]')
        for target in data["out"]:
            label = ""
            if data["foreach_var"]:
                label = f"|foreach {data['foreach_var']}|"
            elif data["cases"]:
                keys = [k for k, v in data["cases"].items() if v == target]
                label = f"|{data['condition']}={','.join(keys)}|"
            lines.append(f"  n_{name} -->{label} n_{target}")
    return "\n".join(lines) + "\n"
