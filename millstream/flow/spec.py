"""``FlowSpec``: the base class of every flow.

A flow object plays two parts. In the client (``python flow.py run``) constructing it
hands control to the command line. In a task it is the step's ``self``: artifacts are
its attributes, inherited ones are loaded from the datastore only when first read,
and ``self.next(...)`` records the transition the task runner checks against the graph.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from millstream.errors import FlowError

# Attributes of a flow object that are the machinery's, never artifacts.
INTERNAL_PREFIX = "_ms_"


@dataclass(frozen=True)
class ForeachFrame:
    """One level of foreach nesting; ``foreach_stack()`` returns them as tuples."""

    index: int
    num_splits: int
    value: Any


class MergeArtifactsError(FlowError):
    """``merge_artifacts`` found artifacts whose values differ between inputs."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.artifact_names = names


class UnboundArtifactLoader:
    """Stands in until the task runner binds the datastore."""

    def __call__(self, sha: str) -> Any:
        raise FlowError("artifacts can only be loaded inside a running task")


class Transition(NamedTuple):
    """What ``self.next`` was called with."""

    steps: tuple[str, ...]
    foreach: str | None
    condition: str | None
    cases: dict[str, str] | None


class FlowSpec:
    """Subclass this and write ``@step`` methods; ``start`` and ``end`` are required."""

    _flow_decorators: dict[str, Any] = {}

    def __init__(self, use_cli: bool = True) -> None:
        self._ms_params: dict[str, Any] = {}
        self._ms_lazy: dict[str, Any] = {}  # name -> ArtifactRef of inherited artifacts
        self._ms_loader: Callable[[Any], Any] = UnboundArtifactLoader()
        self._ms_transition: Transition | None = None
        self._ms_foreach: list[ForeachFrame] = []
        self._ms_step_name: str | None = None
        self._ms_in_join = False
        if use_cli:
            from millstream.client.flowcli import main

            main(type(self), sys.argv[1:])

    # ----------------------------------------------------------------- artifacts
    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: an inherited artifact not yet loaded.
        if name.startswith("__") or name.startswith(INTERNAL_PREFIX):
            raise AttributeError(name)
        lazy = self.__dict__.get("_ms_lazy", {})
        if name in lazy:
            value = self._ms_loader(lazy.pop(name))
            self.__dict__[name] = value
            return value
        step = self.__dict__.get("_ms_step_name")
        where = f" in step {step!r}" if step else ""
        raise AttributeError(f"Flow {type(self).__name__} has no attribute {name!r}{where}")

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get("_ms_lazy", {}):
            del self._ms_lazy[name]
            return
        super().__delattr__(name)

    def _ms_artifact_names(self) -> set[str]:
        names = {n for n in self.__dict__ if not n.startswith("__") and not n.startswith(INTERNAL_PREFIX)}
        return names | set(self._ms_lazy)

    def _ms_refs(self) -> dict[str, Any]:
        # The stored artifact refs of an input of a join (set by the task runner).
        return dict(self.__dict__.get("_ms_input_refs", {}))

    def __contains__(self, name: str) -> bool:
        return name in self._ms_artifact_names()

    # ----------------------------------------------------------------- foreach
    @property
    def index(self) -> int | None:
        """The index of this task in the innermost foreach, or None outside one."""
        return self._ms_foreach[-1].index if self._ms_foreach else None

    @property
    def input(self) -> Any:
        """The item of the innermost foreach this task handles, or None outside one."""
        return self._ms_foreach[-1].value if self._ms_foreach else None

    def foreach_stack(self) -> list[tuple[int, int, Any]]:
        """``[(index, num_splits, value), ...]`` from the outermost foreach inwards."""
        return [(frame.index, frame.num_splits, frame.value) for frame in self._ms_foreach]

    @property
    def name(self) -> str:
        """The flow's name (its class name)."""
        return type(self).__name__

    # ----------------------------------------------------------------- transitions
    def next(
        self, *steps: Any, foreach: str | None = None, condition: str | None = None, num_parallel: int | None = None
    ) -> None:
        """Name the step(s) that follow this one; must be the step's last statement."""
        if self._ms_transition is not None:
            raise FlowError(f"step {self._ms_step_name!r} called self.next more than once")
        if num_parallel is not None:
            raise FlowError("self.next(num_parallel=...) is not supported by millstream")
        if foreach is not None and condition is not None:
            raise FlowError("self.next takes foreach= or condition=, not both")
        cases: dict[str, str] | None = None
        if len(steps) == 1 and isinstance(steps[0], dict):
            if condition is None:
                raise FlowError("self.next({...}) needs condition='attribute' naming the branch")
            cases = {str(key): self._step_name_of(fn) for key, fn in steps[0].items()}
            names = tuple(dict.fromkeys(cases.values()))
        else:
            if condition is not None:
                raise FlowError("self.next(..., condition=...) takes one dict of branches")
            if not steps:
                raise FlowError("self.next() needs at least one step")
            names = tuple(self._step_name_of(fn) for fn in steps)
        if foreach is not None and len(names) != 1:
            raise FlowError("self.next(..., foreach=...) takes exactly one step")
        self._ms_transition = Transition(names, foreach, condition, cases)

    def _step_name_of(self, fn: Any) -> str:
        func = getattr(fn, "__func__", fn)
        if not getattr(func, "is_step", False) or getattr(fn, "__self__", self) is not self:
            raise FlowError(f"self.next takes steps of this flow like self.a, got {fn!r}")
        return str(func.__name__)

    # ----------------------------------------------------------------- joins
    def merge_artifacts(
        self, inputs: Inputs, exclude: list[str] | None = None, include: list[str] | None = None
    ) -> None:
        """Carry artifacts of the inputs into this join, as Metaflow does.

        An artifact already set in this step is left alone; one whose value is the
        same in every input that has it is merged; one that differs is a conflict
        and raises unless it is excluded (or not included). ``include`` and
        ``exclude`` are mutually exclusive; an included name that no input has is an
        error.
        """
        if not self._ms_in_join:
            raise FlowError("merge_artifacts can only be called in a join step")
        if include and exclude:
            raise FlowError("merge_artifacts takes include= or exclude=, not both")
        exclude_set = set(exclude or [])
        include_set = set(include or [])
        own = set(self.__dict__) - {n for n in self.__dict__ if n.startswith(INTERNAL_PREFIX)}
        candidates: dict[str, dict[str, Any]] = {}  # name -> sha -> ref
        for inp in inputs:
            for name, ref in inp._ms_refs().items():
                candidates.setdefault(name, {})[ref.sha] = ref
        if include_set:
            missing = sorted(include_set - set(candidates))
            if missing:
                raise FlowError(f"merge_artifacts: include names artifacts no input has: {missing}")
        conflicts = []
        for name, by_sha in candidates.items():
            if name in own or name in exclude_set or (include_set and name not in include_set):
                continue
            if len(by_sha) > 1:
                conflicts.append(name)
                continue
            self._ms_lazy[name] = next(iter(by_sha.values()))
        if conflicts:
            conflicts.sort()
            raise MergeArtifactsError(
                f"Step {self._ms_step_name!r} cannot merge artifacts whose values differ between "
                f"inputs: {', '.join(conflicts)}. Set them in the join step before calling "
                "merge_artifacts, or pass exclude=[...].",
                conflicts,
            )


class Inputs:
    """The ``inputs`` of a join: iterate, index, ``len``, or ``inputs.stepname``."""

    def __init__(self, flows: list[FlowSpec]) -> None:
        self._flows = flows
        self._by_step = {f._ms_step_name: f for f in flows}

    def __iter__(self) -> Iterator[FlowSpec]:
        return iter(self._flows)

    def __len__(self) -> int:
        return len(self._flows)

    def __getitem__(self, index: int) -> FlowSpec:
        return self._flows[index]

    def __getattr__(self, name: str) -> FlowSpec:
        by_step: dict[str | None, FlowSpec] = self.__dict__.get("_by_step", {})
        if name in by_step:
            return by_step[name]
        raise AttributeError(f"no input from a step named {name!r}; inputs come from {sorted(str(s) for s in by_step)}")
