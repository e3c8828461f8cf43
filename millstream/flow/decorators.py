"""Step and flow decorators: ``@step``, ``@retry``, ``@catch``, ``@timeout`` and the rest.

Each decorator validates its attributes when it is applied and stores itself on the
step function (``func.decorators``) or on the flow class (``cls._flow_decorators``).
What acts on them lives elsewhere: the task runner (``@catch``, ``@timeout``,
``@environment``), the scheduler (``@retry``, ``@timeout``, ``@resources``), the Batch
backend (``@batch``) and the schedulers (``@schedule``, ``@trigger_on_finish``).

Decorators may be written bare (``@retry``) or called (``@retry(times=2)``), above or
below ``@step``. ``@card`` is accepted and ignored: millstream renders no cards.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from millstream.errors import FlowValidationError

F = TypeVar("F", bound=Callable[..., Any])

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _where(obj: Any) -> tuple[str | None, int | None]:
    try:
        return inspect.getsourcefile(obj), inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return None, None


def step(func: F) -> F:
    """Mark a method of a FlowSpec as a step."""
    if not callable(func):
        raise FlowValidationError("@step must decorate a method", fix="def start(self): ...")
    func.is_step = True  # type: ignore[attr-defined]
    if not hasattr(func, "decorators"):
        func.decorators = []  # type: ignore[attr-defined]
    return func


class Decorator:
    """Base of step and flow decorators: a name and validated attributes."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **attributes: Any) -> None:
        unknown = sorted(set(attributes) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"@{self.name} got unknown attribute(s) {', '.join(unknown)}; "
                f"it accepts {', '.join(sorted(self.defaults)) or 'none'}"
            )
        self.attributes: dict[str, Any] = {**self.defaults, **attributes}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the attribute when a value is wrong."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form sent to the daemon."""
        return {"name": self.name, "attributes": dict(self.attributes)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.attributes.items())
        return f"@{self.name}({args})"


def _non_negative_number(deco: Decorator, *keys: str, integer: bool = False, optional: bool = True) -> None:
    for key in keys:
        value = deco.attributes[key]
        if value is None and optional:
            continue
        wrong_kind = (
            isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
        )
        if wrong_kind or value < 0:
            kind = "a non-negative integer" if integer else "a non-negative number"
            raise ValueError(f"@{deco.name}({key}=...) must be {kind}, got {value!r}")


class StepDecorator(Decorator):
    """A decorator that applies to one step."""


class RetryDecorator(StepDecorator):
    """``@retry(times=3, minutes_between_retries=2)``: retry a failed attempt."""

    name = "retry"
    defaults = {"times": 3, "minutes_between_retries": 2}

    def validate(self) -> None:
        _non_negative_number(self, "times", integer=True, optional=False)
        _non_negative_number(self, "minutes_between_retries", optional=False)
        if self.attributes["times"] > 20:
            raise ValueError("@retry(times=...) is at most 20")


class CatchDecorator(StepDecorator):
    """``@catch(var='error')``: store the final exception in an artifact and go on."""

    name = "catch"
    defaults = {"var": None, "print_exception": True}

    def validate(self) -> None:
        var = self.attributes["var"]
        if var is not None and (not isinstance(var, str) or not _IDENT.match(var)):
            raise ValueError(f"@catch(var=...) must be an identifier, got {var!r}")


class TimeoutDecorator(StepDecorator):
    """``@timeout(seconds=, minutes=, hours=)``: fail an attempt that runs too long."""

    name = "timeout"
    defaults = {"seconds": 0, "minutes": 0, "hours": 0}

    def validate(self) -> None:
        _non_negative_number(self, "seconds", "minutes", "hours", optional=False)
        if self.timeout_s <= 0:
            raise ValueError("@timeout needs seconds=, minutes= or hours= greater than 0")

    @property
    def timeout_s(self) -> float:
        """The limit in seconds."""
        a = self.attributes
        return float(a["seconds"] + 60 * a["minutes"] + 3600 * a["hours"])


class ResourcesDecorator(StepDecorator):
    """``@resources(cpu=1, memory=4096, gpu=None)``: what one attempt needs."""

    name = "resources"
    defaults = {"cpu": 1, "memory": 4096, "gpu": None, "disk": None, "shared_memory": None}

    def validate(self) -> None:
        _non_negative_number(self, "cpu", "memory", "disk", "shared_memory")
        _non_negative_number(self, "gpu", integer=True)


class BatchDecorator(StepDecorator):
    """``@batch(cpu=, memory=, gpu=, image=, queue=, ...)``: run the step on AWS Batch."""

    name = "batch"
    defaults = {
        "cpu": 1,
        "gpu": 0,
        "memory": 4096,
        "image": None,
        "queue": None,
        "iam_role": None,
        "execution_role": None,
        "shared_memory": None,
        "max_swap": None,
        "swappiness": None,
        "use_tmpfs": False,
        "tmpfs_tempdir": True,
        "tmpfs_size": None,
        "tmpfs_path": None,
        "inferentia": 0,
        "trainium": None,
        "efa": 0,
        "host_volumes": None,
        "efs_volumes": None,
        "ephemeral_storage": None,
        "log_driver": None,
        "log_options": None,
        "privileged": False,
        "aws_batch_tags": None,
    }

    def validate(self) -> None:
        _non_negative_number(self, "cpu", "memory", "shared_memory", "max_swap")
        _non_negative_number(self, "gpu", "inferentia", "efa", integer=True)
        for key in ("image", "queue", "iam_role", "execution_role"):
            value = self.attributes[key]
            if value is not None and not isinstance(value, str):
                raise ValueError(f"@batch({key}=...) must be a string, got {value!r}")


class EnvironmentDecorator(StepDecorator):
    """``@environment(vars={'K': 'v'})``: set environment variables for the step."""

    name = "environment"
    defaults: ClassVar[dict[str, Any]] = {"vars": {}}

    def validate(self) -> None:
        env = self.attributes["vars"]
        if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("@environment(vars=...) must be a dict of str to str")
        self.attributes["vars"] = dict(env)


class CardDecorator(StepDecorator):
    """``@card``: accepted so Metaflow flows run; millstream renders no cards."""

    name = "card"
    defaults = {"type": "default", "id": None, "options": {}, "timeout": 45, "save_errors": True}


class FlowDecorator(Decorator):
    """A decorator that applies to the whole flow class."""


class ScheduleDecorator(FlowDecorator):
    """``@schedule(hourly=|daily=|weekly=|cron=, timezone=)``: run the flow on a schedule."""

    name = "schedule"
    defaults = {"hourly": False, "daily": True, "weekly": False, "cron": None, "timezone": None}

    def validate(self) -> None:
        a = self.attributes
        chosen = [k for k in ("hourly", "weekly") if a[k]] + (["cron"] if a["cron"] else [])
        if len(chosen) > 1:
            raise ValueError(f"@schedule takes one of hourly, daily, weekly, cron; got {chosen}")
        if chosen:
            a["daily"] = False
        if a["cron"] is not None and (not isinstance(a["cron"], str) or not a["cron"].split()):
            raise ValueError(f"@schedule(cron=...) must be a cron expression, got {a['cron']!r}")
        if a["timezone"] is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(a["timezone"])
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"@schedule(timezone=...) unknown time zone {a['timezone']!r}") from exc

    @property
    def cron(self) -> str:
        """The schedule as a five-field cron expression."""
        a = self.attributes
        if a["cron"]:
            return str(a["cron"])
        if a["hourly"]:
            return "0 * * * *"
        if a["weekly"]:
            return "0 0 * * 0"
        return "0 0 * * *"


class TriggerOnFinishDecorator(FlowDecorator):
    """``@trigger_on_finish(flow='Other')``: start a run when a run of Other succeeds."""

    name = "trigger_on_finish"
    defaults = {"flow": None, "flows": None, "options": {}}

    def validate(self) -> None:
        flows = self.upstream_flows
        if not flows:
            raise ValueError("@trigger_on_finish needs flow='Name' or flows=['A', 'B']")
        for name in flows:
            if not isinstance(name, str) or not _IDENT.match(name.split("/")[-1]):
                raise ValueError(f"@trigger_on_finish: {name!r} is not a flow name")

    @property
    def upstream_flows(self) -> list[str]:
        """The flows whose success triggers this one."""
        a = self.attributes
        if a["flow"] and a["flows"]:
            raise ValueError("@trigger_on_finish takes flow= or flows=, not both")
        if a["flow"]:
            return [a["flow"]]
        return list(a["flows"] or [])


class ProjectDecorator(FlowDecorator):
    """``@project(name='x')``: group flows into a project namespace."""

    name = "project"
    defaults = {"name": None, "branch": None, "production": False}

    def validate(self) -> None:
        name = self.attributes["name"]
        if not isinstance(name, str) or not re.match(r"^[a-z0-9_]+$", name):
            raise ValueError("@project(name=...) must be lowercase letters, digits and _")


STEP_DECORATORS: dict[str, type[StepDecorator]] = {
    cls.name: cls
    for cls in (
        RetryDecorator,
        CatchDecorator,
        TimeoutDecorator,
        ResourcesDecorator,
        BatchDecorator,
        EnvironmentDecorator,
        CardDecorator,
    )
}
FLOW_DECORATORS: dict[str, type[FlowDecorator]] = {
    cls.name: cls for cls in (ScheduleDecorator, TriggerOnFinishDecorator, ProjectDecorator)
}


def _accepts(cls: type[Decorator]) -> str:
    """The fix of a bad attribute: what the decorator accepts."""
    return f"@{cls.name} accepts {', '.join(sorted(cls.defaults)) or 'no attributes'}"


def _step_decorator(cls: type[StepDecorator]) -> Callable[..., Any]:
    def apply(func: Any = None, **attributes: Any) -> Any:
        def attach(f: Any) -> Any:
            try:
                deco = cls(**attributes)
            except ValueError as exc:
                file, line = _where(f)
                raise FlowValidationError(str(exc), file=file, line=line, fix=_accepts(cls)) from None
            existing = getattr(f, "decorators", None)
            if existing is None:
                existing = f.decorators = []
            if any(d.name == cls.name for d in existing):
                file, line = _where(f)
                raise FlowValidationError(
                    f"step {f.__name__!r} has @{cls.name} twice",
                    file=file,
                    line=line,
                    fix=f"keep one @{cls.name}",
                )
            existing.append(deco)
            return f

        if func is not None and callable(func) and not attributes:
            return attach(func)
        if func is not None:
            raise TypeError(f"@{cls.name} takes keyword arguments only")
        return attach

    apply.__name__ = cls.name
    apply.__doc__ = cls.__doc__
    return apply


def _flow_decorator(cls: type[FlowDecorator]) -> Callable[..., Any]:
    def apply(flow_cls: Any = None, **attributes: Any) -> Any:
        def attach(c: Any) -> Any:
            try:
                deco = cls(**attributes)
            except ValueError as exc:
                file, line = _where(c)
                raise FlowValidationError(str(exc), file=file, line=line, fix=_accepts(cls)) from None
            decos = dict(c.__dict__.get("_flow_decorators", {}))
            if cls.name in decos:
                file, line = _where(c)
                raise FlowValidationError(
                    f"flow has @{cls.name} twice", file=file, line=line, fix=f"keep one @{cls.name}"
                )
            decos[cls.name] = deco
            c._flow_decorators = decos
            return c

        if flow_cls is not None and isinstance(flow_cls, type) and not attributes:
            return attach(flow_cls)
        if flow_cls is not None:
            raise TypeError(f"@{cls.name} takes keyword arguments only")
        return attach

    apply.__name__ = cls.name
    apply.__doc__ = cls.__doc__
    return apply


retry = _step_decorator(RetryDecorator)
catch = _step_decorator(CatchDecorator)
timeout = _step_decorator(TimeoutDecorator)
resources = _step_decorator(ResourcesDecorator)
batch = _step_decorator(BatchDecorator)
environment = _step_decorator(EnvironmentDecorator)
card = _step_decorator(CardDecorator)
schedule = _flow_decorator(ScheduleDecorator)
trigger_on_finish = _flow_decorator(TriggerOnFinishDecorator)
project = _flow_decorator(ProjectDecorator)


def _literal(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_with_spec(spec: str) -> StepDecorator:
    """Parse a ``--with`` spec such as ``retry:times=2,minutes_between_retries=0``."""
    name, _, rest = spec.partition(":")
    cls = STEP_DECORATORS.get(name.strip())
    if cls is None:
        raise ValueError(f"--with {spec!r}: unknown decorator {name!r}; known: {', '.join(sorted(STEP_DECORATORS))}")
    attributes: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--with {spec!r}: expected key=value, got {part!r}")
        attributes[key.strip()] = _literal(value.strip())
    return cls(**attributes)


def step_decorators(func: Any) -> list[StepDecorator]:
    """The decorators stored on a step function."""
    return list(getattr(func, "decorators", []))
