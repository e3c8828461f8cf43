"""What the daemon tells the task runner: one attempt of one step, as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Exit codes of a task process. A retry may help after USER_FAILURE (per @retry) and
# INFRA_FAILURE (always); NO_RETRY means the flow itself is wrong for this step.
EXIT_OK = 0
EXIT_USER_FAILURE = 1
EXIT_INFRA_FAILURE = 2
EXIT_NO_RETRY = 3


@dataclass(frozen=True)
class ParentRef:
    """A finished attempt whose artifacts this task starts from."""

    step: str
    task: str
    attempt: int
    run_id: str | None = None  # another run's task, cloned into this one by a resume


@dataclass(frozen=True)
class TaskSpec:
    """Everything one attempt needs; the daemon derives it from the run's state."""

    flow: str
    run_id: str
    step: str
    task_id: str
    attempt: int
    package_dir: str
    module_file: str
    class_name: str
    datastore: dict[str, Any]
    params: dict[str, Any]
    node: dict[str, Any]
    parents: list[ParentRef] = field(default_factory=list)
    split_index: int | None = None
    max_user_retries: int = 0
    tags: list[str] = field(default_factory=list)
    username: str = ""
    origin_run_id: str | None = None
    is_production: bool = False
    trigger: dict[str, Any] | None = None  # the run that triggered this one (@trigger_on_finish)

    @property
    def pathspec(self) -> str:
        """``flow/run/step/task``."""
        return f"{self.flow}/{self.run_id}/{self.step}/{self.task_id}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        data = dict(self.__dict__)
        data["parents"] = [dict(p.__dict__) for p in self.parents]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["parents"] = [ParentRef(**p) for p in data.get("parents", [])]
        return cls(**data)
