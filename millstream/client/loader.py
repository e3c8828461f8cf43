"""Import a flow file by path, as ``millstream run flow.py`` needs, and find its flow class.

The file is imported as a module named after its stem, never as ``__main__``, so its
``if __name__ == "__main__": Flow()`` line does not fire. Its directory goes first on
``sys.path``, as when Python runs the file, so imports of its neighbours work.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from millstream.errors import FlowError
from millstream.flow.spec import FlowSpec


def load_module_file(path: str | Path) -> object:
    """Import the file at ``path`` as a module named after its stem."""
    file = Path(path).resolve()
    if not file.is_file():
        raise FlowError(f"{path}: no such file")
    name = file.stem
    if not name.isidentifier():
        raise FlowError(f"{path}: a flow file's name must be a Python identifier")
    existing = sys.modules.get(name)
    if existing is not None:
        existing_file = getattr(existing, "__file__", None)
        if existing_file and Path(existing_file).resolve() == file:
            return existing
        raise FlowError(f"{path}: the module name {name!r} is taken by {existing_file or 'a built-in'}; "
                        "rename the flow file")
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise FlowError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    # Registered before it runs, as the import system does, so the flow's module resolves.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def find_flow(module: object, flow_name: str | None = None) -> type[FlowSpec]:
    """The FlowSpec subclass the module defines: the only one, or the one named ``flow_name``."""
    found = {obj.__name__: obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, FlowSpec) and obj is not FlowSpec
             and obj.__module__ == getattr(module, "__name__", None)}
    where = getattr(module, "__file__", module)
    if flow_name is not None:
        if flow_name not in found:
            raise FlowError(f"{where} defines no flow {flow_name!r}; it defines {', '.join(sorted(found)) or 'none'}")
        return found[flow_name]
    if not found:
        raise FlowError(f"{where} defines no FlowSpec subclass")
    if len(found) > 1:
        raise FlowError(f"{where} defines several flows ({', '.join(sorted(found))}); pick one with --flow NAME")
    return next(iter(found.values()))


def flow_file(flow_cls: type) -> Path:
    """The file that defines the flow class."""
    module = sys.modules.get(flow_cls.__module__)
    path = getattr(module, "__file__", None)
    if not path:
        raise FlowError(f"flow {flow_cls.__name__} is not defined in a file; put it in a .py file")
    return Path(path).resolve()


def load_flow(path: str | Path, flow_name: str | None = None) -> type[FlowSpec]:
    """Import a flow file and return its flow class."""
    return find_flow(load_module_file(path), flow_name)
