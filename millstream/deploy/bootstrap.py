"""The task bootstrap of an exported flow: one Batch container runs one task attempt.

The contract between a state machine, its job definitions and the container:

Command (the job definition's, each ``Ref::`` filled in by Batch from SubmitJob
``Parameters``)::

    python3 -m millstream.deploy.bootstrap --package SHA --module flow.py \\
        --flow-class MyFlow --step STEP --run-id RUN --task-id TASK --attempt N

- ``--package``: sha256 of the code package, stored at ``packages/<sha>.tar.gz`` in the
  datastore by ``step-functions create``;
- ``--run-id``: ``sfn-<execution name>``; ``--task-id``: ``0`` outside any foreach,
  the split indexes joined by ``-`` inside (as the daemon names tasks);
- ``--attempt``: the Task state's retry count (``$$.State.RetryCount``).

Environment (the job definition's): the datastore settings as ``MILLSTREAM_DATASTORE_*``
variables, read with the ordinary settings loader, so the container opens the same
datastore a daemon would; ``@environment`` variables; for the start step only,
``MILLSTREAM_SFN_INPUT``, the execution input, whose ``Parameters`` object holds
parameter values (strings as on a command line, or JSON values).

What the container does, and the state machine relies on:

1. fetches and unpacks the code package, imports the flow, builds its graph;
2. start step: resolves every parameter (command-line conversion, defaults, computed
   defaults) and writes them to ``<flow>/<run>/_run/params.json``; other steps read it;
3. derives the task's inputs from the graph and the task id alone (the parent with
   the same task id; a foreach body's parent is the foreach task one index up; a
   foreach join's inputs are all ``num_splits`` tasks its foreach recorded; after a
   switch, the one candidate that succeeded), each at its successful attempt;
4. runs the attempt with the ordinary task runner (artifacts, done marker, ``@catch``
   with ``@retry``'s count, ``@timeout``);
5. after a successful foreach step, writes the item list the Map reads,
   ``<flow>/<run>/_run/sfn/<step>/<task>/items.json`` = ``[{"index": 0}, ...]``; after a
   switch, ``.../switch.json`` = ``{"step": "<chosen step>"}``;
6. stores the attempt's stdout and stderr at their usual datastore keys (they also go
   to the container's output, so to CloudWatch Logs, as it runs);
7. exits with the runner's code: 0 success, anything else fails the Batch job and so
   the Task state, which Step Functions retries per ``@retry``.

Infrastructure failures before the runner starts (package, datastore) exit 2, which
Step Functions also sees as a failed task.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from millstream.datastore import layout

ITEMS = "items"
SWITCH = "switch"
SFN_DIR = "sfn"
INPUT_ENV = "MILLSTREAM_SFN_INPUT"


def output_key(flow: str, run_id: str, step: str, task_id: str, kind: str) -> str:
    """The datastore key of a task's output for the state machine (``items`` or ``switch``)."""
    return f"{layout.run_prefix(flow, run_id)}{layout.RUN_DIR}/{SFN_DIR}/{layout.check_step(step)}/" \
           f"{layout.check_task_id(task_id)}/{kind}.json"


def output_key_template(prefix: str, flow: str, step: str, kind: str) -> str:
    """The S3 key of :func:`output_key` as a ``States.Format`` template: ``{}`` run id, ``{}`` task id."""
    layout.check_flow(flow)
    layout.check_step(step)
    return f"{prefix}{flow}/{{}}/{layout.RUN_DIR}/{SFN_DIR}/{step}/{{}}/{kind}.json"


def _body_task(join_task: str, depth: int, index: int) -> str:
    return str(index) if depth == 0 else f"{join_task}-{index}"


async def task_inputs(steps: Mapping[str, Mapping[str, Any]], step: str, task_id: str, *,
                      num_splits: Callable[[str, str], Awaitable[int]],
                      succeeded: Callable[[str, str], Awaitable[bool]]) -> tuple[list[tuple[str, str]], int | None]:
    """The (step, task id) inputs of a task and its split index, from the graph and the task id."""
    node = steps[step]
    if step == "start":
        return [], None
    ins: list[str] = list(node["in"])
    if node["is_join"]:
        split = steps[node["closes"]]
        if split["type"] == "foreach":
            n = await num_splits(split["name"], task_id)
            depth = len(node["foreach_stack"])
            candidates = [[(p, _body_task(task_id, depth, i)) for p in ins] for i in range(n)]
        else:
            candidates = [[(p, task_id)] for p in ins]
        return [await _one_of(group, succeeded) for group in candidates], None
    if len(ins) == 1 and steps[ins[0]]["type"] == "foreach":
        outer, _, index = task_id.rpartition("-")
        return [(ins[0], outer or "0")], int(index)
    return [await _one_of([(p, task_id) for p in ins], succeeded)], None


async def _one_of(candidates: list[tuple[str, str]], succeeded: Callable[[str, str], Awaitable[bool]]
                  ) -> tuple[str, str]:
    if len(candidates) == 1:
        return candidates[0]
    for step, task in candidates:
        if await succeeded(step, task):
            return step, task
    names = ", ".join(f"{s}/{t}" for s, t in candidates)
    raise RuntimeError(f"none of the possible inputs {names} succeeded")


async def ok_attempt(store: Any, flow: str, run_id: str, step: str, task_id: str) -> int | None:
    """The number of a task's successful attempt, or None."""
    from millstream.datastore.records import AttemptKey, list_attempts, read_done

    for number in reversed(await list_attempts(store, flow, run_id, step, task_id)):
        done = await read_done(store, AttemptKey(flow, run_id, step, task_id, number))
        if done is not None and done.get("status") == "ok":
            return number
    return None


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m millstream.deploy.bootstrap",
                                     description="Run one task of a flow exported to Step Functions.")
    for name in ("package", "module", "flow-class", "step", "run-id", "task-id"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    return parser.parse_args(list(argv))


def _raw_parameters(env: Mapping[str, str]) -> dict[str, str]:
    text = env.get(INPUT_ENV) or "{}"
    execution_input = json.loads(text)
    values = execution_input.get("Parameters", {}) if isinstance(execution_input, dict) else {}
    if not isinstance(values, dict):
        raise ValueError(f"the execution input's Parameters must be an object, got {values!r}")
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


async def _prepare(args: argparse.Namespace, env: Mapping[str, str], datastore: dict[str, Any],
                   work: Path) -> tuple[Any, type, dict[str, Any]]:
    """The TaskSpec of this attempt, the flow class and the graph."""
    from millstream.client.submit import resolve_parameters
    from millstream.datastore.backends import open_store
    from millstream.datastore.package import extract_package, fetch_package
    from millstream.flow.graph import FlowGraph
    from millstream.task.runner import load_flow_class
    from millstream.task.spec import ParentRef, TaskSpec

    flow_cls_name, run_id, step, task_id = args.flow_class, args.run_id, args.step, args.task_id
    store = open_store(datastore)
    try:
        package_dir = work / args.package
        if not package_dir.is_dir():
            extract_package(await fetch_package(store, args.package), package_dir)
        flow_cls = load_flow_class(str(package_dir), args.module, flow_cls_name)
        graph = FlowGraph(flow_cls)
        graph.validate()
        graph_dict = graph.to_dict()
        flow = graph.name
        params_key = layout.params_key(flow, run_id)
        user = env.get("MILLSTREAM_USER") or "stepfunctions"
        if step == "start":
            params = resolve_parameters(graph, _raw_parameters(env), username=user, ds_type=datastore["type"])
            await store.put(params_key, json.dumps(params, sort_keys=True).encode())
        else:
            params = json.loads(await store.get(params_key))

        async def num_splits(split_step: str, split_task: str) -> int:
            from millstream.datastore.records import AttemptKey, read_done

            number = await ok_attempt(store, flow, run_id, split_step, split_task)
            done = None if number is None else await read_done(
                store, AttemptKey(flow, run_id, split_step, split_task, number))
            if not done or not done.get("foreach"):
                raise RuntimeError(f"foreach task {split_step}/{split_task} recorded no cardinality")
            return int(done["foreach"]["num_splits"])

        async def succeeded(s: str, t: str) -> bool:
            return await ok_attempt(store, flow, run_id, s, t) is not None

        inputs, split_index = await task_inputs(graph_dict["steps"], step, task_id,
                                                num_splits=num_splits, succeeded=succeeded)
        parents = []
        for s, t in inputs:
            number = await ok_attempt(store, flow, run_id, s, t)
            if number is None:
                raise RuntimeError(f"input task {s}/{t} has no successful attempt")
            parents.append(ParentRef(step=s, task=t, attempt=number))
        retry = next((d["attributes"] for d in graph_dict["steps"][step]["decorators"] if d["name"] == "retry"), None)
        spec = TaskSpec(
            flow=flow, run_id=run_id, step=step, task_id=task_id, attempt=args.attempt,
            package_dir=str(package_dir), module_file=args.module, class_name=flow_cls_name,
            datastore=datastore, params=params, node=graph_dict["steps"][step], parents=parents,
            split_index=split_index, max_user_retries=int(retry["times"]) if retry else 0,
            username=user, is_production=True,
        )
        return spec, flow_cls, graph_dict
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            await close()


class _CapturedOutput:
    """Copies what the attempt writes on fds 1 and 2 to files, while it still reaches the
    container's own output (CloudWatch Logs); fd-level, so child processes are captured too."""

    JOIN_TIMEOUT_S = 10.0

    def __init__(self, folder: Path) -> None:
        self.files = {name: folder / name for name in (layout.STDOUT, layout.STDERR)}
        self._saved: list[tuple[int, int]] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> _CapturedOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, name in ((1, layout.STDOUT), (2, layout.STDERR)):
            saved = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._saved.append((fd, saved))
            thread = threading.Thread(target=self._pump, args=(read_end, saved, self.files[name]),
                                      name=f"capture-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @staticmethod
    def _pump(read_end: int, saved: int, path: Path) -> None:
        with open(path, "wb") as out:
            while chunk := os.read(read_end, 65536):
                os.write(saved, chunk)
                out.write(chunk)
        os.close(read_end)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved:
            os.dup2(saved, fd)  # closes the pipe's write end: the pump reads EOF
        for thread in self._threads:
            thread.join(self.JOIN_TIMEOUT_S)
        for _, saved in self._saved:
            os.close(saved)


async def _finish(spec: Any, datastore: dict[str, Any], logs: Mapping[str, Path], succeeded: bool) -> None:
    """Store the attempt's logs; after a foreach or a switch, what the state machine reads next."""
    from millstream.datastore.backends import open_store
    from millstream.datastore.records import AttemptKey, read_done

    store = open_store(datastore)
    key = AttemptKey(spec.flow, spec.run_id, spec.step, spec.task_id, spec.attempt)
    try:
        for name, path in logs.items():
            with contextlib.suppress(FileNotFoundError):
                await store.put(key.stdout_key if name == layout.STDOUT else key.stderr_key, path.read_bytes())
        if not succeeded:
            return
        done = await read_done(store, key) or {}
        if done.get("foreach"):
            items = [{"index": i} for i in range(int(done["foreach"]["num_splits"]))]
            await store.put(output_key(spec.flow, spec.run_id, spec.step, spec.task_id, ITEMS),
                            json.dumps(items, separators=(",", ":")).encode())
        if done.get("switch"):
            await store.put(output_key(spec.flow, spec.run_id, spec.step, spec.task_id, SWITCH),
                            json.dumps({"step": done["switch"]["step"]}).encode())
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            await close()


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run one task as the contract above says; the process exit code."""
    import traceback

    from millstream.config.settings import load_settings
    from millstream.task.runner import run_spec
    from millstream.task.spec import EXIT_INFRA_FAILURE, EXIT_OK

    args = _parse(argv)
    try:
        settings = load_settings(env)
        datastore = dataclasses.asdict(settings.datastore)
        work = Path(env.get("MILLSTREAM_PACKAGE_DIR") or tempfile.gettempdir()) / "millstream-packages"
        work.mkdir(parents=True, exist_ok=True)
        spec, flow_cls, _ = asyncio.run(_prepare(args, env, datastore, work))
    except Exception:
        traceback.print_exc()
        return EXIT_INFRA_FAILURE
    with tempfile.TemporaryDirectory(prefix="millstream-logs-") as folder:
        with _CapturedOutput(Path(folder)) as captured:
            code = run_spec(spec, flow_cls)
        try:
            asyncio.run(_finish(spec, datastore, captured.files, code == EXIT_OK))
        except Exception:
            traceback.print_exc()
            return EXIT_INFRA_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
