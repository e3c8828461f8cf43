"""Compile a flow's graph to an Amazon States Language definition: a pure function.

The input is the plain-JSON graph the client sends the daemon for a run
(:meth:`millstream.flow.graph.FlowGraph.to_dict`), so the export and a local run read
one and the same description of the flow. What maps to what:

=====================  ==============================================================
flow                   state machine
=====================  ==============================================================
step                   Task ``arn:aws:states:::batch:submitJob.sync`` on the job
                       definition of its container properties (:mod:`.batchjob`)
branch ``next(a, b)``  ``Parallel``, one branch per target, up to (not including) the
                       join, which follows the Parallel
foreach                the foreach step's Task, then a ``Map`` over the item list that
                       task wrote to S3, then the join
switch                 the switch step's Task, a read of the branch it chose
                       (``aws-sdk:s3:getObject``), then a ``Choice`` on it
``@retry``             ``Retry`` on ``States.TaskFailed``: ``MaxAttempts`` = times,
                       ``IntervalSeconds`` = the minutes between retries, jittered with
                       ``JitterStrategy: FULL``
``@timeout``           ``TimeoutSeconds`` of the step's Task
``@resources``,        the job definition (cpu, memory, gpu, image, roles, env)
``@batch``,
``@environment``
parameters             the execution input, ``{"Parameters": {"name": value}}``, handed
                       to the start step, which resolves defaults and stores them
``@schedule``          an EventBridge rule (:mod:`.awscron`), outside the definition
=====================  ==============================================================

The state is kept small: it holds the run id and, inside a foreach, the task id
(``{"run_id": "sfn-<execution name>", "task_id": "3-1"}``); every Task discards its
result (``ResultPath: null``). Artifacts never travel through Step Functions; tasks
read them from the datastore as local runs do. Two limits shape the foreach:

- 256 KiB payload: the items a foreach fans out over are never in the state. The
  foreach task writes ``[{"index": 0}, {"index": 1}, ...]`` to S3; the Map reads it.
- 25,000 history events: one Batch ``.sync`` Task costs about 5 events, so an inline
  Map would end an execution after some 4,000 tasks. By default (``foreach_mode =
  "distributed"``) a foreach is a *Distributed* Map whose ``ItemReader`` reads the item
  list from S3 and whose iterations run as child executions with histories of their
  own; that is what lets a foreach be wide. ``foreach_mode = "inline"`` makes an inline
  Map fed by an ``s3:getObject`` Task instead: fewer moving parts (no child
  executions, no ``states:StartExecution`` permission) for foreaches known to be
  small, and the form moto's interpreter runs.

A switch whose case leads back to an earlier step (a loop) is refused: each step runs
at most once per task id in a state machine, and a loop would need the visit counter
the daemon keeps. Tasks in a switch branch that is not taken never run, as locally.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from millstream.deploy.batchjob import ContainerDefaults, container_properties, job_definition_name
from millstream.deploy.bootstrap import ITEMS, SWITCH, output_key_template
from millstream.errors import DeployError

BATCH_SYNC = "arn:aws:states:::batch:submitJob.sync"
S3_GET_OBJECT_SDK = "arn:aws:states:::aws-sdk:s3:getObject"
S3_GET_OBJECT = "arn:aws:states:::s3:getObject"
FOREACH_MODES = ("distributed", "inline")
# SubmitJob throttling and transient Batch errors are retried for every step, @retry or not.
INFRA_RETRY = {"ErrorEquals": ["Batch.AWSBatchException"], "IntervalSeconds": 2, "MaxAttempts": 5,
               "BackoffRate": 2.0, "JitterStrategy": "FULL"}
MAX_STATE_NAME = 80


@dataclass(frozen=True)
class ExportOptions:
    """Where the exported flow runs: the deployment's choices, not the flow's."""

    bucket: str
    prefix: str = ""  # the datastore's key prefix in the bucket
    job_queue: str = ""
    package: str = ""  # sha256 of the code package in the datastore
    module_file: str = ""
    class_name: str = ""
    foreach_mode: str = "distributed"
    max_concurrency: int = 0  # 0: as many Map iterations at once as Step Functions allows
    container: ContainerDefaults = field(default_factory=ContainerDefaults)


@dataclass
class Compiled:
    """A compiled flow: the definition and the job definitions it names."""

    definition: dict[str, Any]
    job_definitions: dict[str, dict[str, Any]]  # name -> containerProperties


def _state_name(step: str, suffix: str = "") -> str:
    name = f"{step}.{suffix}" if suffix else step
    if len(name) > MAX_STATE_NAME:
        raise DeployError(f"step name {step!r} is too long for a Step Functions state name (at most "
                          f"{MAX_STATE_NAME - 12} characters)")
    return name


def _retry(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    decos = {d["name"]: d["attributes"] for d in node.get("decorators", [])}
    retries: list[dict[str, Any]] = []
    if "retry" in decos and decos["retry"]["times"] > 0:
        interval = max(1, math.ceil(60 * float(decos["retry"]["minutes_between_retries"])))
        retries.append({"ErrorEquals": ["States.TaskFailed"], "IntervalSeconds": interval,
                        "MaxAttempts": int(decos["retry"]["times"]), "BackoffRate": 1.0,
                        "JitterStrategy": "FULL"})
    return [*retries, dict(INFRA_RETRY)]


def _queue(node: Mapping[str, Any]) -> str | None:
    for d in node.get("decorators", []):
        if d["name"] == "batch" and d["attributes"].get("queue"):
            return str(d["attributes"]["queue"])
    return None


def _timeout_s(node: Mapping[str, Any]) -> int | None:
    for d in node.get("decorators", []):
        if d["name"] == "timeout":
            a = d["attributes"]
            return math.ceil(float(a["seconds"] + 60 * a["minutes"] + 3600 * a["hours"]))
    return None


class _Compiler:
    """Walks the graph once; each scope (top level, a branch, a Map body) is a state set."""

    def __init__(self, graph: Mapping[str, Any], options: ExportOptions) -> None:
        if options.foreach_mode not in FOREACH_MODES:
            raise DeployError(f"foreach_mode must be one of {', '.join(FOREACH_MODES)}, got {options.foreach_mode!r}")
        if not options.bucket:
            raise DeployError("Step Functions needs an S3 datastore: set datastore.type = 's3' and datastore.bucket")
        self.graph = graph
        self.steps: Mapping[str, Mapping[str, Any]] = graph["steps"]
        self.flow = str(graph["flow"])
        self.options = options
        self.prefix = options.prefix.strip("/") + "/" if options.prefix.strip("/") else ""
        self.job_definitions: dict[str, dict[str, Any]] = {}
        self._check_loops()

    # ----------------------------------------------------------------- checks
    def _check_loops(self) -> None:
        for name, node in self.steps.items():
            if node["type"] != "split-switch":
                continue
            for target in node["out"]:
                if target == name or name in self._descendants(target):
                    raise DeployError(
                        f"{node.get('file')}:{node.get('line')}: the switch in step {name!r} loops back through "
                        f"{target!r}; Step Functions export does not support switch loops (run the flow with the "
                        "daemon, or unroll the loop)")

    def _descendants(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.steps[name]["out"])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.steps[n]["out"])
        return seen

    def _join_of(self, split: str) -> str:
        for name, node in self.steps.items():
            if node.get("closes") == split:
                return name
        raise DeployError(f"the split in step {split!r} has no join step")

    # ----------------------------------------------------------------- states
    def _task_id(self, depth: int) -> dict[str, str]:
        # Outside any foreach a task is "0"; inside, the Map put the id in the state.
        return {"task_id": "0"} if depth == 0 else {"task_id.$": "$.task_id"}

    def _task_id_ref(self, depth: int) -> str:
        return "'0'" if depth == 0 else "$.task_id"

    def _batch_task(self, name: str, depth: int) -> dict[str, Any]:
        node = self.steps[name]
        props = container_properties(node, self.options.container)
        jobdef = job_definition_name(props)
        self.job_definitions[jobdef] = props
        o = self.options
        params: dict[str, Any] = {
            # Batch job names are at most 128 characters; the run and task go in Parameters.
            "JobName": f"{self.flow}-{name}"[:128],
            "JobQueue": _queue(node) or o.job_queue,
            "JobDefinition": jobdef,
            "Parameters": {
                "package": o.package,
                "module": o.module_file,
                "flow_class": o.class_name,
                "step": name,
                "run_id.$": "$.run_id",
                **self._task_id(depth),
                "attempt.$": "States.Format('{}', $$.State.RetryCount)",
            },
        }
        if name == "start":
            # The execution input (parameter values) goes to the start task only; it stores
            # the resolved values in the datastore for every later task.
            params["ContainerOverrides"] = {"Environment": [
                {"Name": "MILLSTREAM_SFN_INPUT", "Value.$": "States.JsonToString($$.Execution.Input)"}]}
        state: dict[str, Any] = {
            "Type": "Task",
            "Comment": (node.get("doc") or f"step {name}").splitlines()[0][:200],
            "Resource": BATCH_SYNC,
            "Parameters": params,
            "ResultPath": None,
            "Retry": _retry(node),
        }
        timeout = _timeout_s(node)
        if timeout:
            state["TimeoutSeconds"] = timeout
        return state

    def _s3_read(self, step: str, kind: str, depth: int, result_path: str) -> dict[str, Any]:
        """A Task reading one of a task's Step Functions outputs (its JSON parsed into the state)."""
        return {
            "Type": "Task",
            "Resource": S3_GET_OBJECT_SDK,
            "Parameters": {"Bucket": self.options.bucket, "Key.$": self._key_format(step, kind, depth)},
            "ResultSelector": {"value.$": "States.StringToJson($.Body)"},
            "ResultPath": result_path,
            "Retry": [{"ErrorEquals": ["States.TaskFailed"], "IntervalSeconds": 1, "MaxAttempts": 3,
                       "BackoffRate": 2.0, "JitterStrategy": "FULL"}],
        }

    def _key_format(self, step: str, kind: str, depth: int) -> str:
        template = output_key_template(self.prefix, self.flow, step, kind)
        return f"States.Format('{template}', $.run_id, {self._task_id_ref(depth)})"

    def _map(self, foreach: str, join: str, depth: int, body: dict[str, Any]) -> dict[str, Any]:
        index_ref = "$$.Map.Item.Index"
        task_id = (f"States.Format('{{}}', {index_ref})" if depth == 0
                   else f"States.Format('{{}}-{{}}', $.task_id, {index_ref})")
        state: dict[str, Any] = {
            "Type": "Map",
            "Comment": f"foreach of step {foreach}",
            "ItemSelector": {"run_id.$": "$.run_id", "task_id.$": task_id},
            "ItemProcessor": body,
            "ResultPath": None,
            "Next": join,
        }
        if self.options.max_concurrency:
            state["MaxConcurrency"] = self.options.max_concurrency
        if self.options.foreach_mode == "distributed":
            body["ProcessorConfig"] = {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
            state["ItemReader"] = {
                "Resource": S3_GET_OBJECT,
                "ReaderConfig": {"InputType": "JSON"},
                "Parameters": {"Bucket": self.options.bucket, "Key.$": self._key_format(foreach, ITEMS, depth)},
            }
        else:
            body["ProcessorConfig"] = {"Mode": "INLINE"}
            state["ItemsPath"] = "$.foreach_items.value"
            # Replace the item list in the state by a marker, so it does not ride along.
            state["ResultSelector"] = {"done": True}
            state["ResultPath"] = "$.foreach_items"
        return state

    def scope(self, start: str, stop: str | None, depth: int) -> dict[str, Any]:
        """The states from ``start`` up to (not including) ``stop``: ``{"StartAt", "States"}``."""
        states: dict[str, Any] = {}
        todo = [start]
        while todo:
            name = todo.pop(0)
            if name in states or name == stop:
                continue
            node = self.steps[name]
            task = self._batch_task(name, depth)
            states[name] = task
            kind = node["type"]
            follow: list[str]
            if kind == "end":
                task["End"] = True
                follow = []
            elif kind == "split":
                join = self._join_of(name)
                par = _state_name(name, "branches")
                task["Next"] = par
                states[par] = {"Type": "Parallel", "Comment": f"branches of step {name}",
                               "Branches": [self.scope(b, join, depth) for b in node["out"]],
                               "ResultPath": None, **self._next_or_end(join, stop)}
                follow = [join]
            elif kind == "foreach":
                join = self._join_of(name)
                body = self.scope(node["out"][0], join, depth + 1)
                map_name = _state_name(name, "foreach")
                if self.options.foreach_mode == "inline":
                    read = _state_name(name, "items")
                    task["Next"] = read
                    states[read] = {**self._s3_read(name, ITEMS, depth, "$.foreach_items"), "Next": map_name}
                else:
                    task["Next"] = map_name
                states[map_name] = self._map(name, join, depth, body)
                states[map_name].pop("Next")
                states[map_name].update(self._next_or_end(join, stop))
                follow = [join]
            elif kind == "split-switch":
                read, choice = _state_name(name, "switch"), _state_name(name, "choice")
                task["Next"] = read
                states[read] = {**self._s3_read(name, SWITCH, depth, "$.switch"), "Next": choice}
                cases = dict(node["cases"])
                if stop in cases.values():
                    raise DeployError(f"the switch in step {name!r} goes straight to the join {stop!r}; "
                                      "put a step between them")
                states[choice] = {
                    "Type": "Choice",
                    "Choices": [{"Variable": "$.switch.value.step", "StringEquals": target, "Next": target}
                                for target in dict.fromkeys(cases.values())],
                    "Default": _state_name(name, "no_case"),
                }
                states[_state_name(name, "no_case")] = {
                    "Type": "Fail", "Error": "Millstream.SwitchNoCase",
                    "Cause": f"the switch in step {name} chose no known branch"}
                follow = list(dict.fromkeys(cases.values()))
            else:
                task.update(self._next_or_end(node["out"][0], stop))
                follow = [node["out"][0]]
            todo.extend(f for f in follow if f != stop)
        # A switch inside a scope jumps to its targets, which must be states of the scope.
        return {"StartAt": start, "States": states}

    @staticmethod
    def _next_or_end(target: str, stop: str | None) -> dict[str, Any]:
        return {"End": True} if target == stop else {"Next": target}

    def definition(self) -> dict[str, Any]:
        """The whole state machine: an Init state naming the run, then the steps."""
        body = self.scope("start", None, 0)
        init = {"Type": "Pass", "Comment": "name the run after the execution",
                "Parameters": {"run_id.$": "States.Format('sfn-{}', $$.Execution.Name)"}, "Next": "start"}
        return {
            "Comment": f"millstream flow {self.flow}",
            "StartAt": "millstream.init",
            "States": {"millstream.init": init, **body["States"]},
        }


def compile_flow(graph: Mapping[str, Any], options: ExportOptions) -> Compiled:
    """The ASL definition of ``graph`` and the job definitions it uses."""
    compiler = _Compiler(graph, options)
    definition = compiler.definition()
    return Compiled(definition=definition, job_definitions=compiler.job_definitions)


def state_machine_name(flow: str, prefix: str = "") -> str:
    """The state machine's name: the flow's, after an optional configured prefix."""
    name = f"{prefix}{flow}"
    if len(name) > 80:
        raise DeployError(f"state machine name {name!r} is over 80 characters")
    return name
