"""Settings, layered and loaded once into frozen dataclasses.

Layers, later wins: built-in defaults < ``/etc/millstream/config.toml`` <
``$XDG_CONFIG_HOME/millstream/config.toml`` (or ``$MILLSTREAM_CONFIG``) <
``MILLSTREAM_<SECTION>_<KEY>`` environment variables < command-line overrides.
The loader takes the environment as a mapping, so nothing deeper reads ``os.environ``.

With no configuration at all everything is local and per user: the datastore under
``$XDG_DATA_HOME/millstream`` and the daemon's socket under ``$XDG_RUNTIME_DIR``
(or ``/tmp/millstream-<uid>`` where that is unset).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from millstream.errors import ConfigError


@dataclass(frozen=True)
class DatastoreSettings:
    """Where artifacts, records, logs and checkpoints live."""

    type: str = "local"  # or "s3"
    root: str = ""
    durable: bool = True
    # type = "s3" (credentials come from the standard AWS chain, never from here):
    bucket: str = ""
    prefix: str = ""  # keys live under s3://bucket/prefix/
    region: str = ""  # "": the AWS chain's region
    endpoint_url: str = ""  # "": AWS; set for MinIO, moto or a VPC endpoint
    sse: str = ""  # "" (the bucket's default), "AES256" or "aws:kms"
    sse_kms_key_id: str = ""  # with sse = "aws:kms"; "": the AWS-managed key
    max_concurrency: int = 32  # S3 requests in flight per process, and the pool size
    multipart_threshold_mb: int = 64
    part_size_mb: int = 16
    retries: int = 8  # retries after the first attempt, with full-jitter backoff


@dataclass(frozen=True)
class DaemonSettings:
    """The scheduler daemon."""

    socket: str = ""
    state_dir: str = ""
    id: str = "default"
    max_body_mb: int = 64
    checkpoint_interval_s: float = 0.05
    shutdown_timeout_s: float = 5.0
    # The shared host (docs/shared-host.md):
    socket_group: str = ""  # "": the socket is 0600, for the daemon's user alone; else 0660 and this group
    admin_group: str = ""  # members may cancel, resume and tag anyone's runs (root always may)
    run_tasks_as: str = "owner"  # "owner" (when the daemon may switch uids) or "daemon"
    tcp_listen: str = ""  # "127.0.0.1:8465": also serve HTTP on TCP, with bearer tokens
    tokens_file: str = ""  # lines "TOKEN = USER"; must be mode 0600 (or stricter)
    log_format: str = "auto"  # "json", "console", or "auto": JSON under systemd or when not a TTY


@dataclass(frozen=True)
class MetadataSettings:
    """Where runs, tasks and artifacts are recorded."""

    type: str = "sqlite"  # or "service"
    path: str = ""  # sqlite: <datastore.root>/metadata.db (local), <daemon.state_dir>/metadata.db (s3)
    url: str = ""  # service: http://host:port
    api_key_file: str = ""  # service: a file holding the API key
    api_key: str = ""  # service: the key itself (MILLSTREAM_METADATA_API_KEY); never printed
    dead_after_s: float = 120.0
    heartbeat_interval_s: float = 30.0


@dataclass(frozen=True)
class LocalSettings:
    """Local task processes."""

    max_slots: int = 0  # 0: four per core
    max_cpus: float = 0  # 0: the host's cores
    max_memory_mb: int = 0  # 0: the host's memory
    default_cpu: float = 0.5  # what a step without @resources is assumed to use
    fork: bool = True
    zygote_idle_s: float = 300.0
    kill_grace_s: float = 5.0


@dataclass(frozen=True)
class BatchSettings:
    """AWS Batch, for steps with ``@batch`` (see ``docs/batch.md``)."""

    queue: str = ""  # the job queue; ``@batch(queue=)`` overrides it per step
    image: str = ""  # the task image; ``@batch(image=)`` overrides it per step
    job_role: str = ""  # the IAM role the task assumes (jobRoleArn); ``@batch(iam_role=)``
    execution_role: str = ""  # executionRoleArn (Fargate); ``@batch(execution_role=)``
    region: str = ""  # "": the AWS chain's region
    endpoint_url: str = ""  # "": AWS; set for the sandbox or a VPC endpoint
    logs_endpoint_url: str = ""  # "": the same as endpoint_url
    log_group: str = "/aws/batch/job"
    poll_interval_s: float = 2.0  # DescribeJobs interval while jobs change
    max_poll_interval_s: float = 30.0  # the interval it grows to while nothing changes
    submit_rate: float = 20.0  # SubmitJob calls per second (AWS allows 50 per account)
    log_rate: float = 10.0  # GetLogEvents calls per second (AWS allows 25 per account)
    array_window_s: float = 0.5  # how long the splits of a foreach gather into one array job


@dataclass(frozen=True)
class RunSettings:
    """Defaults of ``run``."""

    max_workers: int = 16
    max_num_splits: int = 100


@dataclass(frozen=True)
class StepFunctionsSettings:
    """Exporting flows to AWS Step Functions and EventBridge (``step-functions create``)."""

    role_arn: str = ""  # the state machine's execution role (Batch, S3 reads, child executions)
    events_role_arn: str = ""  # the role EventBridge assumes to start executions; "": role_arn
    job_queue: str = ""  # the Batch job queue of every step without @batch(queue=...)
    image: str = ""  # the container image of every step without @batch(image=...)
    job_role_arn: str = ""  # the tasks' IAM role (reads and writes the datastore)
    batch_execution_role_arn: str = ""  # for Fargate queues
    python: str = "python3"  # the interpreter in the image that has millstream installed
    foreach_mode: str = "distributed"  # or "inline" (see millstream.deploy.stepfunctions)
    max_concurrency: int = 0  # Map iterations at once; 0: no limit of ours
    name_prefix: str = ""  # state machine and rule names are <prefix><flow>
    region: str = ""  # "": the AWS chain's region
    endpoint_url: str = ""  # "": AWS; set for moto or VPC endpoints


@dataclass(frozen=True)
class Settings:
    """All settings, and where each value came from."""

    datastore: DatastoreSettings = field(default_factory=DatastoreSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    metadata: MetadataSettings = field(default_factory=MetadataSettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    run: RunSettings = field(default_factory=RunSettings)
    stepfunctions: StepFunctionsSettings = field(default_factory=StepFunctionsSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    sources: Mapping[str, str] = field(default_factory=dict)


_SECTIONS = {f.name: f.type for f in fields(Settings) if f.name != "sources"}


def _section_class(name: str) -> type:
    return {"datastore": DatastoreSettings, "daemon": DaemonSettings, "metadata": MetadataSettings,
            "local": LocalSettings, "run": RunSettings, "stepfunctions": StepFunctionsSettings,
            "batch": BatchSettings}[name]


def _coerce(value: Any, default: Any, where: str, key: str) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif kind is int and not isinstance(value, bool | float):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: {key} must be {kind.__name__}, got {value!r}")


def _apply(layers: dict[str, dict[str, Any]], sources: dict[str, str], data: Mapping[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in _SECTIONS or not isinstance(values, Mapping):
            raise ConfigError(f"{where}: unknown section [{section}]; known: {', '.join(_SECTIONS)}")
        defaults = {f.name: f.default for f in fields(_section_class(section))}
        for key, value in values.items():
            if key not in defaults:
                raise ConfigError(f"{where}: unknown key {section}.{key}; known: {', '.join(defaults)}")
            layers[section][key] = _coerce(value, defaults[key], where, f"{section}.{key}")
            sources[f"{section}.{key}"] = where


def load_settings(env: Mapping[str, str], overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Load the layered settings for the given environment and CLI overrides."""
    layers: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    sources: dict[str, str] = {}
    files = [Path("/etc/millstream/config.toml")]
    xdg_config = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")).expanduser() / ".config")
    user_file = env.get("MILLSTREAM_CONFIG")
    files.append(Path(user_file) if user_file else xdg_config / "millstream/config.toml")
    for path in files:
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            _apply(layers, sources, data, str(path))
    from_env: dict[str, dict[str, Any]] = {}
    variables: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith("MILLSTREAM_") or name == "MILLSTREAM_CONFIG":
            continue
        rest = name[len("MILLSTREAM_"):].lower()
        section, _, key = rest.partition("_")
        if section in _SECTIONS and key:
            from_env.setdefault(section, {})[key] = value
            variables[f"{section}.{key}"] = name
    for section, values in from_env.items():
        _apply(layers, sources, {section: values}, "environment")
    # config show names the variable, so an operator knows what to unset.
    sources.update({key: f"environment ${name}" for key, name in variables.items()})
    if overrides:
        _apply(layers, sources, {k: dict(v) for k, v in overrides.items() if v}, "command line")
    settings = Settings(**{s: _section_class(s)(**layers[s]) for s in _SECTIONS}, sources=sources)
    return _with_local_defaults(settings, env)


def _with_local_defaults(settings: Settings, env: Mapping[str, str]) -> Settings:
    home = Path(env.get("HOME") or Path.home())
    data_home = Path(env.get("XDG_DATA_HOME") or home / ".local/share") / "millstream"
    uid = os.getuid()
    runtime = env.get("XDG_RUNTIME_DIR")
    socket_dir = Path(runtime) / "millstream" if runtime else Path(f"/tmp/millstream-{uid}")
    ds, daemon, meta = settings.datastore, settings.daemon, settings.metadata
    if meta.type not in ("sqlite", "service"):
        raise ConfigError(f"metadata.type must be sqlite or service, got {meta.type!r}")
    if meta.type == "service" and not meta.url:
        raise ConfigError("metadata.type = service needs metadata.url")
    for key, value, allowed in (
        ("daemon.run_tasks_as", daemon.run_tasks_as, ("owner", "daemon")),
        ("daemon.log_format", daemon.log_format, ("auto", "json", "console")),
    ):
        if value not in allowed:
            raise ConfigError(f"{settings.sources.get(key, 'default')}: {key} must be one of "
                              f"{', '.join(allowed)}, got {value!r}")
    if daemon.tcp_listen and not daemon.tokens_file:
        raise ConfigError(f"{settings.sources.get('daemon.tcp_listen')}: daemon.tcp_listen needs "
                          "daemon.tokens_file: the TCP listener only serves callers with a bearer token")
    if not ds.root:
        ds = replace(ds, root=str(data_home / "datastore"))
    if not daemon.socket:
        daemon = replace(daemon, socket=str(socket_dir / "daemon.sock"))
    if not daemon.state_dir:
        daemon = replace(daemon, state_dir=str(data_home / "daemon"))
    if not meta.path:
        # Beside a local datastore, so one root is one whole world (as Metaflow's .metaflow).
        # A remote datastore has no local root: the file is the daemon's host-local state,
        # beside its spool and unpacked packages (docs/s3.md: share the metadata service
        # between hosts instead).
        base = Path(ds.root) if ds.type == "local" else Path(daemon.state_dir)
        meta = replace(meta, path=str(base / "metadata.db"))
    return replace(settings, datastore=ds, daemon=daemon, metadata=meta)


def describe(settings: Settings) -> list[tuple[str, Any, str]]:
    """``(key, value, source)`` for every setting, for ``config show``."""
    rows = []
    for section in _SECTIONS:
        obj = getattr(settings, section)
        for f in fields(obj):
            key = f"{section}.{f.name}"
            value = getattr(obj, f.name)
            if f.name == "api_key" and value:
                value = "********"
            rows.append((key, value, settings.sources.get(key, "default")))
    return rows
