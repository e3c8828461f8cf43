"""millstream: Metaflow-style flows, driven by a long-running asyncio daemon.

``from millstream import FlowSpec, step, Parameter, current, ...`` is all a flow needs;
a flow written for Metaflow runs after changing its ``from metaflow import`` line.
"""

from __future__ import annotations

from typing import Any

from millstream.flow.current import current
from millstream.flow.decorators import (
    batch,
    card,
    catch,
    environment,
    project,
    resources,
    retry,
    schedule,
    step,
    timeout,
    trigger_on_finish,
)
from millstream.flow.parameters import IncludeFile, JSONType, Parameter
from millstream.flow.spec import FlowSpec

__version__ = "0.1.0"

# The Client API is imported on first use: flows that only run need none of it.
_CLIENT_NAMES = frozenset(
    {
        "Flow", "Run", "Step", "Task", "DataArtifact", "Metaflow", "namespace", "get_namespace",
        "default_namespace", "MetaflowNotFound", "MetaflowNamespaceMismatch", "MetaflowTaggingError",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from millstream.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'millstream' has no attribute {name!r}")


__all__ = [
    "DataArtifact",
    "Flow",
    "FlowSpec",
    "IncludeFile",
    "JSONType",
    "Metaflow",
    "MetaflowNamespaceMismatch",
    "MetaflowNotFound",
    "MetaflowTaggingError",
    "Parameter",
    "Run",
    "Step",
    "Task",
    "batch",
    "card",
    "catch",
    "current",
    "default_namespace",
    "environment",
    "get_namespace",
    "namespace",
    "project",
    "resources",
    "retry",
    "schedule",
    "step",
    "timeout",
    "trigger_on_finish",
]
