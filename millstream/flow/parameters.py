"""``Parameter``, ``JSONType`` and ``IncludeFile``: the inputs of a run.

A Parameter is a read-only class attribute of the flow. Its value is fixed when the
run is submitted (from the command line, or the default, which may be computed by a
function of a :class:`ParameterContext`) and every task of the run sees the same value.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from millstream.errors import ParameterError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

# Names the run command takes for itself; a parameter may not shadow them.
RESERVED_PARAMETER_NAMES = frozenset(
    {
        "params",
        "with",
        "tag",
        "tags",
        "namespace",
        "obj",
        "decospecs",
        "run-id-file",
        "run_id_file",
        "max-num-splits",
        "max_num_splits",
        "max-workers",
        "max_workers",
        "max-log-size",
        "user-namespace",
        "run-id",
        "run_id",
        "origin-run-id",
        "help",
        "quiet",
        "datastore",
        "metadata",
        "environment",
        "wait",
    }
)


class ParameterContext(NamedTuple):
    """What a callable default is given."""

    flow_name: str
    user_name: str
    parameter_name: str
    logger: Callable[..., None]
    ds_type: str


class _JSONType:
    """Marks a parameter whose value is JSON, parsed before the run starts."""

    name = "JSON"

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return json.loads(value)

    def __repr__(self) -> str:
        return "JSONType"


JSONType = _JSONType()

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


class Parameter:
    """A run parameter: ``alpha = Parameter('alpha', default=0.5, help='...')``."""

    def __init__(
        self,
        name: str,
        default: Any = None,
        type: Any = None,  # noqa: A002 - Metaflow's keyword
        help: str | None = None,  # noqa: A002 - Metaflow's keyword
        required: bool = False,
        show_default: bool = True,
        separator: str | None = None,
        **_kwargs: Any,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ParameterError(
                f"Parameter name {name!r} is invalid: use letters, digits, '_' and '-', starting with a letter"
            )
        if name.lower() in RESERVED_PARAMETER_NAMES:
            raise ParameterError(f"Parameter name {name!r} is reserved by the run command")
        self.name = name
        self.default = default
        self.help = help
        self.required = required
        self.show_default = show_default
        self.separator = separator
        self.attr_name: str = name.replace("-", "_")
        self.type = type if type is not None else self._infer_type(default)
        if self.type not in (str, int, float, bool) and self.type is not JSONType:
            raise ParameterError(
                f"Parameter {name!r}: type must be str, int, float, bool or JSONType, got {self.type!r}"
            )

    @staticmethod
    def _infer_type(default: Any) -> Any:
        if callable(default) or default is None:
            return str
        for kind in (bool, int, float, str):
            if isinstance(default, kind):
                return kind
        return JSONType if isinstance(default, (dict, list)) else str

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr_name = attr

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        values = instance.__dict__.get("_ms_params", {})
        if self.name not in values:
            raise AttributeError(f"parameter {self.name!r} has no value in this task")
        return values[self.name]

    def __set__(self, instance: Any, value: Any) -> None:
        raise AttributeError(f"Parameter {self.name!r} is read-only; assign another artifact instead")

    def convert(self, value: Any) -> Any:
        """Turn a command-line string (or a default) into the parameter's value."""
        if value is None:
            return None
        try:
            if self.separator and isinstance(value, str):
                return [self._convert_one(v) for v in value.split(self.separator)]
            return self._convert_one(value)
        except (ValueError, TypeError) as exc:
            raise ParameterError(f"Parameter {self.name!r}: {exc}") from None

    def _convert_one(self, value: Any) -> Any:
        if self.type is bool:
            return _to_bool(value)
        if self.type is JSONType:
            try:
                return JSONType(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if self.type in (int, float) and isinstance(value, bool):
            raise ValueError(f"{value!r} is not a {self.type.__name__}")
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not an int")
        try:
            return self.type(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a {self.type.__name__}") from None

    def resolve(self, raw: Any, context: ParameterContext) -> Any:
        """The value of the parameter given the command-line value (or None)."""
        if raw is None:
            default = self.default
            if callable(default) and not isinstance(default, type):
                default = default(context)
            if default is None:
                if self.required:
                    raise ParameterError(f"Parameter {self.name!r} is required: pass --{self.name} VALUE")
                return None
            return self.convert(default)
        return self.convert(raw)

    def describe(self) -> dict[str, Any]:
        """The JSON form of the parameter, for ``show`` and the daemon."""
        default = self.default
        if callable(default) and not isinstance(default, type):
            default = "<computed>"
        return {
            "name": self.name,
            "type": getattr(self.type, "__name__", None) or getattr(self.type, "name", "str"),
            "default": default if _jsonable(default) else repr(default),
            "required": self.required,
            "help": self.help,
        }

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, default={self.default!r})"


BYTES_KEY = "__bytes__"


def encode_value(value: Any) -> Any:
    """A parameter value in its JSON form: bytes become ``{"__bytes__": base64}``."""
    if isinstance(value, (bytes, bytearray)):
        return {BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    return value


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if isinstance(value, dict) and set(value) == {BYTES_KEY}:
        return base64.b64decode(value[BYTES_KEY])
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class IncludeFile(Parameter):
    """A parameter whose value is the content of a local file, read at submission."""

    def __init__(
        self,
        name: str,
        required: bool = False,
        is_text: bool = True,
        encoding: str = "utf-8",
        help: str | None = None,  # noqa: A002 - Metaflow's keyword
        default: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, default=default, type=str, help=help, required=required, **kwargs)
        self.is_text = is_text
        self.encoding = encoding

    def _convert_one(self, value: Any) -> Any:
        path = Path(str(value)).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        return data.decode(self.encoding) if self.is_text else data


def flow_parameters(flow_cls: type) -> list[Parameter]:
    """The parameters of a flow class, in definition order (base classes first)."""
    seen: dict[str, Parameter] = {}
    for klass in reversed(flow_cls.__mro__):
        for value in vars(klass).values():
            if isinstance(value, Parameter):
                seen[value.attr_name] = value
    return list(seen.values())
