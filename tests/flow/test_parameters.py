"""Parameters: type inference, conversion, defaults, names, IncludeFile and read-only values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from millstream import FlowSpec, IncludeFile, JSONType, Parameter, step
from millstream.errors import ParameterError
from millstream.flow.parameters import RESERVED_PARAMETER_NAMES, ParameterContext, flow_parameters


def _context(name: str = "p") -> ParameterContext:
    return ParameterContext(flow_name="F", user_name="ada", parameter_name=name, logger=print, ds_type="local")


@pytest.mark.parametrize(
    ("default", "kind"),
    [
        ("text", str),
        (3, int),
        (0.5, float),
        (True, bool),
        (False, bool),
        (None, str),
        ({"a": 1}, JSONType),
        ([1, 2], JSONType),
        (lambda ctx: 1, str),
    ],
    ids=["str", "int", "float", "true", "false", "none", "dict", "list", "callable"],
)
def test_type_is_inferred_from_the_default(default: Any, kind: Any) -> None:
    """bool before int; containers become JSON; no default or a computed one is str."""
    assert Parameter("p", default=default).type is kind


@pytest.mark.parametrize(
    ("kind", "raw", "value"),
    [
        (str, "abc", "abc"),
        (str, 5, "5"),
        (int, "42", 42),
        (int, 7.0, 7),
        (float, "2.5", 2.5),
        (float, 3, 3.0),
        (bool, "true", True),
        (bool, "Yes", True),
        (bool, "0", False),
        (bool, "off", False),
        (bool, False, False),
        (JSONType, '{"layers": [8, 4]}', {"layers": [8, 4]}),
        (JSONType, [1, 2], [1, 2]),
    ],
)
def test_conversion(kind: Any, raw: Any, value: Any) -> None:
    """Command-line strings (and defaults) become values of the parameter's type."""
    converted = Parameter("p", type=kind).convert(raw)
    assert converted == value
    assert type(converted) is type(value)


@pytest.mark.parametrize(
    ("kind", "raw", "fragment"),
    [
        (int, "4.5", "'4.5' is not a int"),
        (int, 4.5, "4.5 is not an int"),
        (int, True, "True is not a int"),
        (float, "fast", "'fast' is not a float"),
        (float, False, "False is not a float"),
        (bool, "maybe", "'maybe' is not a boolean"),
        (JSONType, "{not json", "not valid JSON"),
    ],
)
def test_conversion_errors_name_the_parameter(kind: Any, raw: Any, fragment: str) -> None:
    """A bad value is a ParameterError (and a ValueError) that names the parameter."""
    with pytest.raises(ParameterError) as raised:
        Parameter("learning-rate", type=kind).convert(raw)
    assert "Parameter 'learning-rate'" in str(raised.value)
    assert fragment in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_none_converts_to_none() -> None:
    """No value stays no value."""
    assert Parameter("p", type=int).convert(None) is None


def test_separator_splits_into_a_list() -> None:
    """With separator=, a string becomes a list of converted values."""
    param = Parameter("ids", type=int, separator=",")
    assert param.convert("1,2,3") == [1, 2, 3]
    with pytest.raises(ParameterError, match="'ids'"):
        param.convert("1,x")


def test_callable_default_gets_a_context() -> None:
    """A computed default is called with a ParameterContext and converted."""
    seen: list[ParameterContext] = []

    def default(ctx: ParameterContext) -> str:
        seen.append(ctx)
        return "7"

    param = Parameter("count", default=default, type=int)
    assert param.resolve(None, _context("count")) == 7
    assert len(seen) == 1 and isinstance(seen[0], ParameterContext)
    assert seen[0].user_name == "ada" and seen[0].parameter_name == "count"
    assert param.resolve("9", _context("count")) == 9
    assert len(seen) == 1  # a given value skips the default
    assert param.describe()["default"] == "<computed>"


def test_type_as_default_is_not_called() -> None:
    """A class is callable but is not a computed default."""
    param = Parameter("kind", default=int, type=str)
    assert param.resolve(None, _context()) == "<class 'int'>"


def test_resolve_uses_and_converts_the_default() -> None:
    """Without a value the default applies, converted like a command-line value."""
    assert Parameter("alpha", default=0.5).resolve(None, _context()) == 0.5
    assert Parameter("n", default="3", type=int).resolve(None, _context()) == 3
    assert Parameter("flag", default=False, required=True).resolve(None, _context()) is False
    assert Parameter("opt").resolve(None, _context()) is None


def test_required_without_value_raises() -> None:
    """A required parameter with neither a value nor a default says how to pass it."""
    param = Parameter("data-dir", required=True)
    with pytest.raises(ParameterError, match=r"'data-dir' is required: pass --data-dir VALUE"):
        param.resolve(None, _context())
    with pytest.raises(ParameterError, match="is required"):
        Parameter("x", default=lambda ctx: None, required=True).resolve(None, _context())
    assert param.resolve("/tmp", _context()) == "/tmp"


@pytest.mark.parametrize("name", ["", "1abc", "_hidden", "has space", "dot.ted", "-dash", 3])
def test_invalid_names(name: Any) -> None:
    """Names start with a letter and use letters, digits, '_' and '-'."""
    with pytest.raises(ParameterError, match="is invalid"):
        Parameter(name)


@pytest.mark.parametrize("name", ["tags", "with", "Namespace", "run-id", "max_workers", "help"])
def test_reserved_names(name: str) -> None:
    """Names the run command takes for itself are refused, in any case."""
    assert name.lower() in RESERVED_PARAMETER_NAMES
    with pytest.raises(ParameterError, match="reserved"):
        Parameter(name)


def test_valid_names_and_attribute_name() -> None:
    """A dashed name is fine; the attribute it is bound to is recorded."""

    class Holder:
        learning_rate = Parameter("learning-rate", default=0.1)

    param = Holder.__dict__["learning_rate"]
    assert param.name == "learning-rate" and param.attr_name == "learning_rate"
    assert Parameter("a-b_c1").attr_name == "a_b_c1"


def test_unsupported_type_is_refused() -> None:
    """Only str, int, float, bool and JSONType are types."""
    with pytest.raises(ParameterError, match="type must be"):
        Parameter("p", type=list)
    with pytest.raises(ParameterError, match="type must be"):
        Parameter("p", default=(1, 2), type=tuple)


def test_describe_is_plain_data() -> None:
    """The JSON form names the type; defaults that are not JSON are shown by repr."""
    assert Parameter("cfg", default={"a": 1}, help="h").describe() == {
        "name": "cfg",
        "type": "JSON",
        "default": {"a": 1},
        "required": False,
        "help": "h",
    }
    assert Parameter("p", default=object, type=str).describe()["default"] == "<class 'object'>"


def test_include_file_reads_the_file(tmp_path: Path) -> None:
    """IncludeFile's value is the file's content, text or bytes."""
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,é\n", encoding="utf-8")
    text = IncludeFile("data", default=str(path))
    assert text.type is str
    assert text.resolve(None, _context()) == "a,b\n1,é\n"
    assert IncludeFile("data", is_text=False).resolve(str(path), _context()) == path.read_bytes()
    latin = IncludeFile("data", encoding="latin-1")
    assert latin.convert(str(path)) == path.read_bytes().decode("latin-1")


def test_include_file_missing_names_the_parameter(tmp_path: Path) -> None:
    """A missing file is a ParameterError naming the parameter and the path."""
    missing = tmp_path / "nope.txt"
    with pytest.raises(ParameterError) as raised:
        IncludeFile("data").resolve(str(missing), _context())
    assert "Parameter 'data'" in str(raised.value) and str(missing) in str(raised.value)
    with pytest.raises(ParameterError, match="is required"):
        IncludeFile("data", required=True).resolve(None, _context())


class ParamFlow(FlowSpec):
    """Parameters as a step sees them."""

    alpha = Parameter("alpha", default=0.5)
    rate = Parameter("learning-rate", default=0.1)

    @step
    def start(self):
        """First."""
        self.next(self.end)

    @step
    def end(self):
        """Last."""


class ChildFlow(ParamFlow):
    """Inherits alpha and rate, overrides alpha."""

    alpha = Parameter("alpha", default=0.9)
    beta = Parameter("beta", default=1)


def test_parameters_are_read_only_at_run_time() -> None:
    """A task reads the run's values; assigning a parameter raises AttributeError."""
    flow = ParamFlow(use_cli=False)
    # Parameter.__get__'s AttributeError falls through to FlowSpec.__getattr__.
    with pytest.raises(AttributeError, match="'alpha'"):
        _ = flow.alpha
    flow._ms_params = {"alpha": 0.25, "learning-rate": 0.01}
    assert flow.alpha == 0.25
    assert flow.rate == 0.01
    with pytest.raises(AttributeError, match="read-only"):
        flow.alpha = 1.0
    with pytest.raises(AttributeError, match="read-only"):
        flow.rate = 1.0
    assert flow.alpha == 0.25
    assert isinstance(ParamFlow.alpha, Parameter)


def test_flow_parameters_in_definition_order() -> None:
    """Base-class parameters come first; a subclass overrides by attribute name."""
    assert [p.name for p in flow_parameters(ParamFlow)] == ["alpha", "learning-rate"]
    params = flow_parameters(ChildFlow)
    assert [p.name for p in params] == ["alpha", "learning-rate", "beta"]
    assert params[0].default == 0.9
