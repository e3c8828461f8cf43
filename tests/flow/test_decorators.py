"""Step and flow decorators: forms, validation, ``--with`` specs and where they are stored."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from millstream import (
    FlowSpec,
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
from millstream.errors import FlowValidationError
from millstream.flow.decorators import (
    FLOW_DECORATORS,
    STEP_DECORATORS,
    RetryDecorator,
    parse_with_spec,
    step_decorators,
)
from millstream.flow.graph import FlowGraph


def _names(func: Any) -> dict[str, dict[str, Any]]:
    return {d.name: d.attributes for d in step_decorators(func)}


def test_step_marks_the_function() -> None:
    """@step sets is_step and an empty decorator list."""

    @step
    def start(self: Any) -> None:
        """A step."""

    assert start.is_step is True
    assert step_decorators(start) == []
    with pytest.raises(FlowValidationError, match="@step must decorate a method"):
        step(3)  # type: ignore[arg-type]


def test_bare_and_called_above_or_below_step() -> None:
    """@retry, @retry() and @retry(times=1) work on either side of @step."""

    @retry
    @step
    def bare_above(self: Any) -> None:
        """."""

    @step
    @retry
    def bare_below(self: Any) -> None:
        """."""

    @retry()
    @step
    def called_above(self: Any) -> None:
        """."""

    @step
    @retry(times=1)
    def called_below(self: Any) -> None:
        """."""

    defaults = {"times": 3, "minutes_between_retries": 2}
    for func in (bare_above, bare_below, called_above):
        assert func.is_step
        assert _names(func) == {"retry": defaults}
    assert called_below.is_step
    assert _names(called_below) == {"retry": {"times": 1, "minutes_between_retries": 2}}
    assert isinstance(step_decorators(called_below)[0], RetryDecorator)


def test_several_decorators_keep_their_order() -> None:
    """Decorators are stored innermost first, each with its own attributes."""

    @catch(var="failure")
    @timeout(hours=1, minutes=30)
    @resources(cpu=2, memory=1024, gpu=1)
    @step
    def work(self: Any) -> None:
        """."""

    assert [d.name for d in step_decorators(work)] == ["resources", "timeout", "catch"]
    assert _names(work)["catch"] == {"var": "failure", "print_exception": True}
    assert step_decorators(work)[1].timeout_s == 5400.0
    assert step_decorators(work)[1].to_dict() == {
        "name": "timeout",
        "attributes": {"seconds": 0, "minutes": 30, "hours": 1},
    }
    assert repr(step_decorators(work)[0]) == ("@resources(cpu=2, memory=1024, gpu=1, disk=None, shared_memory=None)")


def test_card_is_accepted_and_batch_and_environment_store_attributes() -> None:
    """@card is a no-op marker; @batch and @environment keep what they were given."""

    @card
    @batch(cpu=4, image="python:3.11", queue="q")
    @environment(vars={"A": "1"})
    @step
    def work(self: Any) -> None:
        """."""

    found = _names(work)
    assert set(found) == {"card", "batch", "environment"}
    assert found["batch"]["image"] == "python:3.11" and found["batch"]["cpu"] == 4
    assert found["environment"] == {"vars": {"A": "1"}}


def _apply(decorator: Callable[..., Any]) -> FlowValidationError:
    def target(self: Any) -> None:
        """Decorated by the test."""

    with pytest.raises(FlowValidationError) as raised:
        decorator(step(target))
    error = raised.value
    assert error.file == inspect.getsourcefile(target)
    assert error.line == target.__code__.co_firstlineno
    assert error.fix
    return error


@pytest.mark.parametrize(
    ("decorator", "fragment"),
    [
        (retry(times=-1), "@retry(times=...) must be a non-negative integer"),
        (retry(times=1.5), "@retry(times=...) must be a non-negative integer"),
        (retry(times=True), "@retry(times=...) must be a non-negative integer"),
        (retry(times=21), "at most 20"),
        (retry(times=None), "@retry(times=...) must be a non-negative integer, got None"),
        (retry(minutes_between_retries=None), "must be a non-negative number, got None"),
        (timeout(seconds=None), "@timeout(seconds=...) must be a non-negative number, got None"),
        (retry(minutes_between_retries=-0.5), "minutes_between_retries=...) must be a non-negative number"),
        (retry(tims=2), "@retry got unknown attribute(s) tims; it accepts minutes_between_retries, times"),
        (timeout(), "@timeout needs seconds=, minutes= or hours="),
        (timeout, "@timeout needs seconds=, minutes= or hours="),
        (timeout(seconds=-1, minutes=2), "@timeout(seconds=...) must be a non-negative number"),
        (catch(var="not valid"), "@catch(var=...) must be an identifier"),
        (resources(gpu=0.5), "@resources(gpu=...) must be a non-negative integer"),
        (resources(memory="4G"), "@resources(memory=...) must be a non-negative number"),
        (resources(cpu=-1), "@resources(cpu=...) must be a non-negative number"),
        (batch(image=3), "@batch(image=...) must be a string"),
        (environment(vars={"A": 1}), "@environment(vars=...) must be a dict of str to str"),
        (environment(vars=["A"]), "@environment(vars=...) must be a dict of str to str"),
    ],
)
def test_attributes_are_validated(decorator: Callable[..., Any], fragment: str) -> None:
    """A bad attribute is a FlowValidationError naming the function's file and line."""
    assert fragment in _apply(decorator).bare_message


def test_same_decorator_twice() -> None:
    """Two of the same decorator on one step are refused."""
    error = _apply(lambda f: retry(times=1)(retry(f)))
    assert error.bare_message == "step 'target' has @retry twice"
    assert error.fix == "keep one @retry"


def test_positional_arguments_are_refused() -> None:
    """Decorator attributes are keywords."""
    with pytest.raises(TypeError, match="keyword arguments only"):
        retry(3)
    with pytest.raises(TypeError, match="keyword arguments only"):
        schedule("0 * * * *")


def test_registries() -> None:
    """--with can name every step decorator; flow decorators are separate."""
    assert set(STEP_DECORATORS) == {"retry", "catch", "timeout", "resources", "batch", "environment", "card"}
    assert set(FLOW_DECORATORS) == {"schedule", "trigger_on_finish", "project"}


def test_parse_with_spec() -> None:
    """``--with name:key=value,...`` builds a validated step decorator with literal values."""
    deco = parse_with_spec("retry:times=2,minutes_between_retries=0")
    assert isinstance(deco, RetryDecorator)
    assert deco.attributes == {"times": 2, "minutes_between_retries": 0}
    assert parse_with_spec("retry").attributes == {"times": 3, "minutes_between_retries": 2}
    assert parse_with_spec(" catch : var=oops ").attributes["var"] == "oops"
    assert parse_with_spec("batch:image=python:3.11,cpu=0.5").attributes["image"] == "python:3.11"
    assert parse_with_spec("batch:image=python:3.11,cpu=0.5").attributes["cpu"] == 0.5
    assert parse_with_spec("timeout:minutes=5").timeout_s == 300.0
    assert parse_with_spec("resources:gpu=None,memory=512").attributes["gpu"] is None


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nope:times=1", "unknown decorator 'nope'"),
        ("schedule:cron=x", "unknown decorator 'schedule'"),
        ("retry:times", "expected key=value, got 'times'"),
        ("retry:tims=2", "unknown attribute(s) tims"),
        ("retry:times=-1", "must be a non-negative integer"),
        ("timeout", "@timeout needs"),
    ],
)
def test_parse_with_spec_errors(spec: str, fragment: str) -> None:
    """A bad spec is a ValueError saying what is wrong."""
    with pytest.raises(ValueError) as raised:
        parse_with_spec(spec)
    assert fragment in str(raised.value)


# ------------------------------------------------------------------ flow decorators


@schedule(cron="0 6 * * 1-5", timezone="Europe/Paris")
@trigger_on_finish(flow="Upstream")
@project(name="p")
class DecoratedFlow(FlowSpec):
    """All three flow decorators."""

    @step
    def start(self):
        """First."""
        self.next(self.end)

    @step
    def end(self):
        """Last."""


@schedule
class DailyFlow(FlowSpec):
    """Bare @schedule is daily."""

    @step
    def start(self):
        """First."""
        self.next(self.end)

    @step
    def end(self):
        """Last."""


def test_flow_decorators_are_stored_on_the_class() -> None:
    """Each flow decorator lands in cls._flow_decorators, and so in the graph."""
    decos = DecoratedFlow._flow_decorators
    assert set(decos) == {"schedule", "trigger_on_finish", "project"}
    assert decos["schedule"].cron == "0 6 * * 1-5"
    assert decos["schedule"].attributes["daily"] is False
    assert decos["schedule"].attributes["timezone"] == "Europe/Paris"
    assert decos["trigger_on_finish"].upstream_flows == ["Upstream"]
    assert decos["project"].attributes == {"name": "p", "branch": None, "production": False}
    assert set(FlowGraph(DecoratedFlow).flow_decorators) == set(decos)
    assert FlowSpec._flow_decorators == {}
    assert DailyFlow._flow_decorators["schedule"].cron == "0 0 * * *"


@pytest.mark.parametrize(
    ("attributes", "cron"),
    [
        ({"hourly": True}, "0 * * * *"),
        ({"weekly": True}, "0 0 * * 0"),
        ({}, "0 0 * * *"),
        ({"cron": "*/10 * * * *"}, "*/10 * * * *"),
    ],
)
def test_schedule_cron(attributes: dict[str, Any], cron: str) -> None:
    """hourly, daily, weekly and cron become a five-field cron expression."""

    class Scheduled(FlowSpec):
        """."""

    assert schedule(**attributes)(Scheduled)._flow_decorators["schedule"].cron == cron


def test_trigger_on_finish_flows() -> None:
    """flows= takes several upstream flows, project-qualified names included."""

    class Triggered(FlowSpec):
        """."""

    deco = trigger_on_finish(flows=["A", "proj/B"])(Triggered)._flow_decorators["trigger_on_finish"]
    assert deco.upstream_flows == ["A", "proj/B"]


@pytest.mark.parametrize(
    ("decorator", "fragment"),
    [
        (schedule(hourly=True, cron="0 * * * *"), "takes one of hourly, daily, weekly, cron"),
        (schedule(cron=""), "must be a cron expression"),
        (schedule(cron=5), "must be a cron expression"),
        (schedule(timezone="Mars/Olympus"), "unknown time zone"),
        (schedule(every="day"), "unknown attribute(s) every"),
        (trigger_on_finish(), "needs flow='Name'"),
        (trigger_on_finish(flow="not a name"), "is not a flow name"),
        (trigger_on_finish(flow="A", flows=["B"]), "flow= or flows=, not both"),
        (project(name="Has-Caps"), "lowercase letters, digits and _"),
        (project(), "lowercase letters, digits and _"),
    ],
)
def test_flow_decorator_errors(decorator: Callable[..., Any], fragment: str) -> None:
    """A bad flow decorator is a FlowValidationError naming the class's file and line."""

    class Bad(FlowSpec):
        """."""

    with pytest.raises(FlowValidationError) as raised:
        decorator(Bad)
    error = raised.value
    assert fragment in error.bare_message
    assert error.file == __file__
    assert error.line == inspect.getsourcelines(Bad)[1]
    assert error.fix


def test_flow_decorator_twice() -> None:
    """One flow cannot have the same flow decorator twice."""

    class Twice(FlowSpec):
        """."""

    project(name="a")(Twice)
    with pytest.raises(FlowValidationError, match="flow has @project twice") as raised:
        project(name="b")(Twice)
    assert raised.value.fix == "keep one @project"
