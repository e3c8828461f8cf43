"""Keep in-process task runs from leaking process-wide state into other tests."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from millstream.flow.current import current


@pytest.fixture(autouse=True)
def isolated_process() -> Iterator[None]:
    """Restore sys.path, flow modules, SIGALRM (pytest-timeout's) and check ``current``.

    ``load_flow_class`` puts the code package on sys.path and its module in
    sys.modules; ``@timeout`` installs its own SIGALRM handler and timer.
    """
    path = list(sys.path)
    modules = set(sys.modules)
    handler = signal.getsignal(signal.SIGALRM)
    timer = signal.getitimer(signal.ITIMER_REAL)
    yield
    added = [p for p in sys.path if p not in path]
    for name in set(sys.modules) - modules:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if any(Path(file).is_relative_to(p) for p in added):
            del sys.modules[name]
    sys.path[:] = path
    signal.signal(signal.SIGALRM, handler)
    if timer[0] > 0:
        signal.setitimer(signal.ITIMER_REAL, *timer)
    assert not current.is_running_flow, "a test left `current` set"
