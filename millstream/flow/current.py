"""``current``: what a running task knows about itself.

The task runner fills it before the step body runs; outside a running flow every
attribute is ``None`` (and ``is_running_flow`` is ``False``), as in Metaflow.
"""

from __future__ import annotations

from typing import Any

_FIELDS = (
    "flow_name",
    "run_id",
    "step_name",
    "task_id",
    "retry_count",
    "origin_run_id",
    "pathspec",
    "username",
    "tags",
    "parameter_names",
    "is_production",
    "namespace",
    "trigger",
)


class Trigger:
    """``current.trigger``: what started this run (``@trigger_on_finish``)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.type: str = str(data.get("type", "run"))
        self.pathspec: str = str(data.get("pathspec", ""))
        self.flow_name: str = str(data.get("flow", self.pathspec.split("/")[0]))
        self.run_id: str = str(data.get("run_id", self.pathspec.split("/")[-1]))

    @property
    def run(self) -> Any:
        """The triggering run, through the Client API."""
        from millstream.client.api import Run, namespace

        namespace(None)
        return Run(self.pathspec)

    def __repr__(self) -> str:
        return f"Trigger({self.type} {self.pathspec})"


class Current:
    """The singleton behind ``from millstream import current``."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def _set(self, **values: Any) -> None:
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown current fields: {sorted(unknown)}")
        self._values = dict(values)

    def _clear(self) -> None:
        self._values = {}

    @property
    def is_running_flow(self) -> bool:
        """True inside a task of a running flow."""
        return bool(self._values)

    def __getattr__(self, name: str) -> Any:
        if name in _FIELDS:
            return self.__dict__.get("_values", {}).get(name)
        raise AttributeError(f"current has no attribute {name!r}")

    def __repr__(self) -> str:
        if not self._values:
            return "<current: not in a running flow>"
        return f"<current {self._values.get('pathspec')} retry={self._values.get('retry_count')}>"


current = Current()
