"""``millstream``: the console script for flows, runs, logs, the daemon and the settings.

``millstream run FLOW.py ...`` behaves exactly like ``python FLOW.py run ...``: it
imports the file (not as ``__main__``), picks its flow class and hands everything
after ``FLOW.py`` to that flow's own ``run`` command. Options of ``millstream run``
itself (``--flow``, ``--quiet``) therefore go before ``FLOW.py``, so that no flow
Parameter can be mistaken for one of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

import millstream
from millstream.client.console import cli_errors, table
from millstream.client.dumpcmd import dump_command, tag_group
from millstream.client.flowcli import (
    CliState,
    check_flow,
    logs_options,
    make_resume_command,
    make_run_command,
    print_logs,
    print_status,
    settings_overrides,
    show_flow,
    step_functions_group,
)
from millstream.client.graphview import SHOW_FORMATS
from millstream.client.loader import load_flow
from millstream.client.pathspec import PathspecError, parse_pathspec
from millstream.client.schedulecmd import schedule_group

RUN_STATUSES = ("running", "ok", "failed", "cancelled")
MAX_PAGE = 50
STEP_FUNCTIONS_ACTIONS = ("create", "trigger", "list-runs", "delete")


@click.group()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              help="The daemon's socket (daemon.socket).")
@click.option("--datastore-root", type=click.Path(file_okay=False), default=None,
              help="The datastore's root (datastore.root).")
@click.version_option(millstream.__version__, prog_name="millstream")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, datastore_root: str | None) -> None:
    """Run Metaflow-style flows through the millstream daemon."""
    ctx.obj = CliState(env=os.environ,
                       overrides=settings_overrides(daemon__socket=socket_path,
                                                    datastore__root=datastore_root))


# --------------------------------------------------------------------- flows
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False}


def _flow_subcommand(ctx: click.Context, name: str, flow_name: str | None, quiet: bool,
                     flow_path: str | None, make: Callable[[type], click.Command]) -> None:
    if flow_path in ("--help", "-h"):
        click.echo(ctx.get_help())
        ctx.exit(0)
    if flow_path is None:
        raise click.UsageError("missing FLOW.py")
    if flow_path.startswith("-"):
        raise click.UsageError(f"{flow_path} must come after FLOW.py: millstream {name} FLOW.py {flow_path} ...")
    state: CliState = ctx.obj
    with cli_errors():
        flow_cls = load_flow(flow_path, flow_name)
    state.flow_cls, state.quiet = flow_cls, quiet
    command = make(flow_cls)
    with command.make_context(f"{name} {flow_path}", list(ctx.args), parent=ctx) as sub:
        command.invoke(sub)


@cli.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.option("--flow", "flow_name", default=None, help="The flow class, when the file defines several.")
@click.option("--quiet", is_flag=True, help="Print only errors and the final line.")
@click.argument("flow_path", required=False)
@click.pass_context
def run(ctx: click.Context, flow_name: str | None, quiet: bool, flow_path: str | None) -> None:
    """Run FLOW.py: millstream run [--flow NAME] FLOW.py [RUN OPTIONS] [--PARAM VALUE]..."""
    _flow_subcommand(ctx, "run", flow_name, quiet, flow_path, make_run_command)


@cli.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.option("--flow", "flow_name", default=None, help="The flow class, when the file defines several.")
@click.option("--quiet", is_flag=True, help="Print only errors and the final line.")
@click.argument("flow_path", required=False)
@click.pass_context
def resume(ctx: click.Context, flow_name: str | None, quiet: bool, flow_path: str | None) -> None:
    """Resume a run of FLOW.py: millstream resume FLOW.py [STEP] [--origin-run-id ID] ..."""
    _flow_subcommand(ctx, "resume", flow_name, quiet, flow_path, make_resume_command)


@cli.command("step-functions", context_settings=_PASS_THROUGH, add_help_option=False)
@click.option("--flow", "flow_name", default=None, help="The flow class, when the file defines several.")
@click.argument("action", required=False)
@click.argument("flow_path", required=False)
@click.pass_context
def step_functions(ctx: click.Context, flow_name: str | None, action: str | None, flow_path: str | None) -> None:
    """Deploy FLOW.py to AWS Step Functions: millstream step-functions create|trigger|list-runs|delete FLOW.py ..."""
    if action in (None, "--help", "-h"):
        click.echo(ctx.get_help())
        ctx.exit(0)
    if action not in STEP_FUNCTIONS_ACTIONS:
        raise click.UsageError(f"unknown action {action!r}; use one of {', '.join(STEP_FUNCTIONS_ACTIONS)}")
    _flow_subcommand(ctx, f"step-functions {action}", flow_name, False, flow_path,
                     lambda flow_cls: step_functions_group(flow_cls).commands[action])


@cli.command()
@click.argument("flow_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--flow", "flow_name", default=None, help="The flow class, when the file defines several.")
@click.pass_context
def check(ctx: click.Context, flow_path: str, flow_name: str | None) -> None:
    """Validate the graph of FLOW.py."""
    with cli_errors():
        flow_cls = load_flow(flow_path, flow_name)
    ctx.exit(check_flow(flow_cls))


@cli.command()
@click.argument("flow_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--flow", "flow_name", default=None, help="The flow class, when the file defines several.")
@click.option("--format", "fmt", type=click.Choice(SHOW_FORMATS), default="text", show_default=True)
@click.pass_context
def show(ctx: click.Context, flow_path: str, flow_name: str | None, fmt: str) -> None:
    """Show the steps of FLOW.py and how they connect."""
    with cli_errors():
        flow_cls = load_flow(flow_path, flow_name)
    ctx.exit(show_flow(flow_cls, fmt))


# --------------------------------------------------------------------- runs
@cli.command()
@click.option("--flow", "flow_name", default=None, help="Only runs of this flow.")
@click.option("--status", type=click.Choice(RUN_STATUSES), default=None, help="Only runs in this state.")
@click.option("--owner", default=None, help="Only runs of this user.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_obj
def runs(state: CliState, flow_name: str | None, status: str | None, owner: str | None,
         limit: int) -> None:
    """List runs, newest first."""
    from millstream.client.daemonctl import ensure_daemon
    from millstream.client.http import api_path
    from millstream.client.runview import runs_table

    with cli_errors():
        client = ensure_daemon(state.settings(), state.env)
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(found) < limit:
            page = client.request("GET", api_path("runs", flow=flow_name, status=status, owner=owner,
                                                  limit=min(limit - len(found), MAX_PAGE),
                                                  cursor=cursor))[1]
            found += page.get("runs") or []
            cursor = page.get("next_cursor")
            if not cursor:
                break
    if not found:
        click.echo("no runs")
        return
    click.echo(runs_table(found[:limit]), nl=False)


@cli.command()
@click.argument("pathspec")
@click.pass_obj
def status(state: CliState, pathspec: str) -> None:
    """Status of FLOW (its latest run), FLOW/RUN, FLOW/RUN/STEP or FLOW/RUN/STEP/TASK."""
    with cli_errors():
        print_status(state, parse_pathspec(pathspec))


@cli.command()
@click.argument("pathspec")
@logs_options
@click.pass_obj
def logs(state: CliState, pathspec: str, stderr: bool, follow: bool, attempt: int | None) -> None:
    """Print the logs of FLOW/RUN/STEP[/TASK]."""
    with cli_errors():
        print_logs(state, parse_pathspec(pathspec), stderr=stderr, attempt=attempt, follow=follow)


@cli.command()
@click.argument("pathspec")
@click.pass_obj
def cancel(state: CliState, pathspec: str) -> None:
    """Cancel the run FLOW/RUN."""
    from millstream.client.daemonctl import ensure_daemon
    from millstream.client.http import api_path

    with cli_errors():
        spec = parse_pathspec(pathspec)
        if spec.run_id is None or spec.step is not None:
            raise PathspecError(f"cancel takes FLOW/RUN, got {pathspec!r}")
        client = ensure_daemon(state.settings(), state.env)
        answer = client.request("POST", api_path("runs", spec.flow, spec.run_id, "cancel"))[1]
    click.echo(f"{spec.flow}/{spec.run_id}: {answer.get('status', 'cancelling')}")


# --------------------------------------------------------------------- the daemon
@cli.group(invoke_without_command=True)
@click.pass_context
def daemon(ctx: click.Context) -> None:
    """Run the daemon in the foreground, or start, stop or query a background one."""
    if ctx.invoked_subcommand is not None:
        return
    state: CliState = ctx.obj
    with cli_errors():
        settings = state.settings()
    from millstream.daemon.main import run_daemon

    sys.exit(run_daemon(settings))


@daemon.command("start")
@click.pass_obj
def daemon_start(state: CliState) -> None:
    """Start a background daemon unless one answers already."""
    from millstream.client.daemonctl import ensure_daemon

    with cli_errors():
        health = ensure_daemon(state.settings(), state.env).health() or {}
    click.echo(f"millstream daemon running (pid {health.get('pid')}) on {state.settings().daemon.socket}")


@daemon.command("stop")
@click.pass_obj
def daemon_stop(state: CliState) -> None:
    """Stop the daemon and wait until it has shut down."""
    from millstream.client.daemonctl import stop_daemon

    with cli_errors():
        pid = stop_daemon(state.settings())
    if pid is None:
        click.echo(f"no millstream daemon answers on {state.settings().daemon.socket}")
    else:
        click.echo(f"millstream daemon (pid {pid}) stopped")


@daemon.command("status")
@click.pass_context
def daemon_status_command(ctx: click.Context) -> None:
    """Whether a daemon answers, and what it is doing; exit 1 when none does."""
    from millstream.client.daemonctl import daemon_status

    state: CliState = ctx.obj
    with cli_errors():
        info = daemon_status(state.settings())
    if info is None:
        click.echo(f"no millstream daemon answers on {state.settings().daemon.socket}")
        ctx.exit(1)
    rows = [(key, info.get(key)) for key in ("status", "version", "pid", "active_runs", "socket", "log")]
    click.echo(table(("KEY", "VALUE"), rows), nl=False)


# --------------------------------------------------------------------- settings
@cli.group()
def config() -> None:
    """Inspect the effective settings."""


@config.command("show")
@click.pass_obj
def config_show(state: CliState) -> None:
    """Every setting, its value and where the value came from."""
    from millstream.config.settings import describe

    with cli_errors():
        rows = describe(state.settings())
    click.echo(table(("KEY", "VALUE", "SOURCE"), rows), nl=False)


cli.add_command(schedule_group)
cli.add_command(dump_command())
cli.add_command(tag_group())


@cli.command("metadata-service", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
             add_help_option=False)
@click.pass_context
def metadata_service(ctx: click.Context) -> None:
    """Run the metadata service (aiohttp on PostgreSQL): millstream metadata-service --dsn ... [--help]."""
    from millstream.metadata.service.__main__ import main as service_main

    sys.exit(service_main(list(ctx.args)))


@cli.command("sandbox")
@click.option("--port", type=int, default=5000, show_default=True, help="Port on 127.0.0.1 (0: any free one).")
@click.option("--slots", type=int, default=4, show_default=True, help="Batch jobs run at once.")
def sandbox_command(port: int, slots: int) -> None:
    """S3, AWS Batch and CloudWatch Logs on this machine; prints the configuration to use."""
    import importlib.util

    missing = [m for m in ("moto", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(
            f"the sandbox needs {', '.join(missing)}: pip install 'millstream[sandbox]'")
    from millstream.sandbox import serve

    if slots < 1:
        raise click.BadParameter("must be at least 1", param_hint="--slots")
    sys.exit(serve(port, slots))


def main() -> None:
    """The ``millstream`` console script."""
    cli(prog_name="millstream")

