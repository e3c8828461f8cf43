"""The one exception tree of millstream.

MillstreamError
├── ConfigError               a bad setting: names the file, key and expected type
├── FlowError                 a flow that cannot run as written
│   ├── FlowValidationError   the graph is malformed: names the file, line and fix
│   └── ParameterError        a bad or missing parameter value (also ValueError)
├── DatastoreError            the object store failed
│   └── NotFound              no object under that key (also KeyError)
├── ComputeError              a backend could not launch or watch an attempt
│                             (``retryable`` says whether a retry may help)
├── MetadataError             the metadata store failed (``retryable`` for connections)
│   ├── MetadataNotFound      no such run or task (also KeyError)
│   └── MetadataConflict      the request contradicts what is stored
├── SchedulerError            the daemon refused a run (too many splits, ...)
├── DeployError               a flow cannot be exported to Step Functions, or AWS
│                             refused the deployment
└── ApiError                  a request to the daemon failed (status and code)
"""

from __future__ import annotations


class MillstreamError(Exception):
    """Root of every error millstream raises on purpose."""


class ConfigError(MillstreamError):
    """A configuration file or value is invalid."""


class FlowError(MillstreamError):
    """A flow cannot run as written."""


class FlowValidationError(FlowError):
    """The flow's graph is malformed; carries the file and line of the offending step."""

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, fix: str | None = None
    ) -> None:
        self.file = file
        self.line = line
        self.fix = fix
        self.bare_message = message
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        text = f"{where}{message}"
        if fix:
            text += f"\n    Fix: {fix}"
        super().__init__(text)


class ParameterError(FlowError, ValueError):
    """A parameter value is missing, malformed or of the wrong type."""


class DatastoreError(MillstreamError):
    """The object store failed to read or write."""


class NotFound(DatastoreError, KeyError):
    """No object exists under the key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class ComputeError(MillstreamError):
    """A compute backend failed; ``retryable`` tells whether retrying may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class MetadataError(MillstreamError):
    """The metadata store could not answer."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class MetadataNotFound(MetadataError, KeyError):
    """No such run or task."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class MetadataConflict(MetadataError):
    """The request contradicts what is stored."""


class SchedulerError(MillstreamError):
    """The scheduler refused to start or continue a run."""


class DeployError(MillstreamError):
    """A flow cannot be compiled for AWS Step Functions, or deploying it failed."""


class ApiError(MillstreamError):
    """The daemon answered a request with an error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
