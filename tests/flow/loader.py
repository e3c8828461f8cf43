"""Import a flow file by path, as ``python flow.py`` would, and find its flow class."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from millstream import FlowSpec
from millstream.errors import FlowValidationError

HERE = Path(__file__).resolve().parent
BROKEN = HERE / "broken"
EXAMPLES = HERE.parents[1] / "examples"
ERROR_MARK = "# <- error"


def import_path(path: Path) -> ModuleType:
    """Import the file under a unique module name; ``inspect`` needs it in sys.modules."""
    name = f"ms_test_{path.parent.name}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def flow_class(path: Path) -> type[FlowSpec]:
    """The one FlowSpec subclass the file defines."""
    module = import_path(path)
    found = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, FlowSpec) and v.__module__ == module.__name__
    ]
    assert len(found) == 1, f"{path} defines {len(found)} flows"
    return found[0]


def import_error(path: Path) -> FlowValidationError:
    """The FlowValidationError importing the file raises (fails the test if none)."""
    try:
        import_path(path)
    except FlowValidationError as exc:
        return exc
    raise AssertionError(f"importing {path} raised no FlowValidationError")


def marked_line(path: Path) -> int:
    """The number of the one line that ends with the error mark."""
    lines = [n for n, text in enumerate(path.read_text().splitlines(), 1) if text.rstrip().endswith(ERROR_MARK)]
    assert len(lines) == 1, f"{path} marks {len(lines)} lines with {ERROR_MARK!r}"
    return lines[0]
