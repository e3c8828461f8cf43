"""``run``: validate, submit to the daemon (starting it if need be), follow, exit.

Exit codes follow Metaflow's: 0 when the run succeeds, 1 when it fails, is cancelled
or cannot start, and 130 after Ctrl-C. Ctrl-C cancels the run, as it kills a Metaflow
run: the daemon would otherwise drive it on with nobody watching.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import click

import millstream
from millstream.client.daemonctl import ensure_daemon
from millstream.client.graphview import format_problems
from millstream.client.http import DaemonClient, api_path
from millstream.client.progress import follow_run
from millstream.client.submit import build_submission, current_username, submit
from millstream.config.settings import Settings
from millstream.errors import ApiError
from millstream.flow.graph import FlowGraph

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def launch_run(flow_cls: type, raw_params: Mapping[str, str | None], *, settings: Settings,
               env: Mapping[str, str], with_specs: Sequence[str] = (), tags: Sequence[str] = (),
               max_workers: int | None = None, max_num_splits: int | None = None,
               run_id_file: str | None = None, quiet: bool = False,
               out: TextIO = sys.stdout, resume: Mapping[str, Any] | None = None) -> int:
    """Run (or, with ``resume``, resume) the flow through the daemon; the command's exit code."""
    graph = FlowGraph(flow_cls)
    if graph.problems:
        click.echo(format_problems(graph), err=True, nl=False)
        return EXIT_FAILED
    username = current_username(env)
    if not quiet:
        out.write(f"millstream {millstream.__version__} executing {graph.name} for user:{username}\n"
                  "Validating your flow...\n    The graph looks good!\n")
        out.flush()
    run: dict[str, Any] | None = None
    client: DaemonClient | None = None
    try:
        body, package = build_submission(
            flow_cls, raw_params, with_specs=with_specs, tags=tags,
            max_workers=max_workers or settings.run.max_workers,
            max_num_splits=max_num_splits or settings.run.max_num_splits,
            username=username, env=env, ds_type=settings.datastore.type, graph=graph, resume=resume,
        )
        client = ensure_daemon(settings, env)
        run = submit(client, body, package)
        if run_id_file:
            # Metaflow writes the bare id, no newline; scripts read it back as is.
            write_run_id_file(run_id_file, str(run["run_id"]))
        status = follow_run(client, graph.name, run["run_id"], quiet=quiet, out=out)
    except KeyboardInterrupt:
        if client is not None and run is not None:
            _cancel(client, graph.name, str(run["run_id"]))
        return EXIT_INTERRUPTED
    return EXIT_OK if status == "ok" else EXIT_FAILED


def _cancel(client: DaemonClient, flow: str, run_id: str) -> None:
    click.echo(f"Interrupted: cancelling {flow}/{run_id}.", err=True)
    try:
        client.request("POST", api_path("runs", flow, run_id, "cancel"))
    except ApiError as exc:
        click.echo(f"Could not cancel {flow}/{run_id}: {exc.message}", err=True)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C means leave now


def write_run_id_file(path: str, run_id: str) -> None:
    """Write ``--run-id-file`` whole or not at all: a script polling for it never reads it empty."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_text(run_id, encoding="utf-8")
    os.replace(partial, target)
