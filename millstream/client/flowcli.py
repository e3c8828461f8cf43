"""``python flow.py ...``: the command line every flow file gets, shaped like Metaflow's.

The top-level options are the ones Metaflow users type. Some are accepted only so that
existing command lines keep working: ``--pylint/--no-pylint`` (millstream runs no
pylint; the graph check is its own), ``--metadata`` (the daemon's configuration decides
where metadata lives) and ``--environment`` (only ``local``: millstream builds no conda
or pypi environments, and says so rather than run in the wrong one). ``--datastore``
and ``--datastore-root`` override the settings of a daemon this command starts; a
daemon already running keeps its own.

``run`` gets one option per flow Parameter, named as the Parameter (``--learning-rate``).
Values stay strings on the command line; the Parameter converts them, so a bad value
is reported the same way whether it came from here or from a default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from millstream.client.console import cli_errors
from millstream.client.dumpcmd import dump_command, tag_group
from millstream.client.graphview import SHOW_FORMATS, check_report, format_problems, render_graph
from millstream.client.loader import flow_file
from millstream.client.pathspec import Pathspec, parse_pathspec
from millstream.config.settings import RunSettings, Settings, load_settings
from millstream.errors import FlowError
from millstream.flow.graph import FlowGraph
from millstream.flow.parameters import IncludeFile, Parameter, flow_parameters

_METAVARS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "JSON": "JSON"}


@dataclass
class CliState:
    """What the group options decide for the commands below them (``ctx.obj``)."""

    env: Mapping[str, str]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quiet: bool = False
    with_specs: tuple[str, ...] = ()
    flow_cls: type | None = None
    _settings: Settings | None = field(default=None, init=False, repr=False)

    def settings(self) -> Settings:
        """The layered settings, loaded once."""
        if self._settings is None:
            self._settings = load_settings(self.env, self.overrides)
        return self._settings


def settings_overrides(**values: str | None) -> dict[str, dict[str, Any]]:
    """CLI overrides for ``load_settings`` from ``section__key=value`` keywords that are set."""
    overrides: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if value is not None:
            section, _, key = name.partition("__")
            overrides.setdefault(section, {})[key] = value
    return overrides


# --------------------------------------------------------------------- shared commands
def check_flow(flow_cls: type) -> int:
    """Print whether the flow is valid (or every problem); the exit code."""
    valid, text = check_report(FlowGraph(flow_cls))
    click.echo(text, nl=False, err=not valid)
    return 0 if valid else 1


def show_flow(flow_cls: type, fmt: str) -> int:
    """Print the flow's graph in ``fmt``; the exit code."""
    graph = FlowGraph(flow_cls)
    if graph.problems:
        click.echo(format_problems(graph), nl=False, err=True)
        return 1
    click.echo(render_graph(graph, fmt), nl=False)
    return 0


def print_status(state: CliState, spec: Pathspec) -> None:
    """Print a run's status (its latest run when no run id is given), a step's or a task's."""
    from millstream.client.daemonctl import ensure_daemon
    from millstream.client.http import api_path
    from millstream.client.runview import run_report, step_report, task_report

    client = ensure_daemon(state.settings(), state.env)
    run_id = spec.run_id
    if run_id is None:
        runs = client.request("GET", api_path("runs", flow=spec.flow, limit=1))[1].get("runs") or []
        if not runs:
            raise click.ClickException(f"flow {spec.flow} has no runs")
        run_id = str(runs[0]["run_id"])
    detail = client.request("GET", api_path("runs", spec.flow, run_id))[1]
    if spec.step is None:
        click.echo(run_report(detail), nl=False)
    elif spec.task_id is None:
        click.echo(step_report(detail, spec.step), nl=False)
    else:
        click.echo(task_report(detail, spec), nl=False)


def print_logs(state: CliState, spec: Pathspec, *, stderr: bool, attempt: int | None,
               follow: bool) -> None:
    """Copy the logs a pathspec names to stdout."""
    from millstream.client.daemonctl import ensure_daemon
    from millstream.client.logs import write_logs

    client = ensure_daemon(state.settings(), state.env)
    write_logs(client, spec, sys.stdout.buffer,
               stream="stderr" if stderr else "stdout", attempt=attempt, follow=follow)


def logs_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of ``logs``, shared by the flow's and millstream's command."""
    func = click.option("--attempt", type=click.IntRange(min=0), default=None,
                        help="Attempt number (default: the latest).")(func)
    func = click.option("--follow", is_flag=True, help="Keep printing while the attempt runs.")(func)
    func = click.option("--stderr", is_flag=True, help="Show stderr instead of stdout.")(func)
    return func


# --------------------------------------------------------------------- run
def parameter_option(param: Parameter, dest: str) -> click.Option:
    """The ``--<name>`` option of a flow Parameter; its value stays a string."""
    info = param.describe()
    help_text = info["help"] or ""
    if info["required"]:
        help_text += " [required]"
    elif param.show_default and param.default is not None:
        default = info["default"]
        help_text += f" [default: {'computed' if default == '<computed>' else default}]"
    metavar = "PATH" if isinstance(param, IncludeFile) else _METAVARS.get(info["type"], "TEXT")
    return click.Option([f"--{param.name}", dest], default=None, metavar=metavar,
                        help=help_text.strip() or None)


def make_run_command(flow_cls: type) -> click.Command:
    """The ``run`` command of one flow, with an option for each of its Parameters."""
    params = flow_parameters(flow_cls)
    # Click option names must be identifiers and unique; Parameter names need not be.
    dests = {f"ms_param_{i}": p.name for i, p in enumerate(params)}
    run_defaults = RunSettings()

    @click.pass_context
    def run(ctx: click.Context, /, *, max_workers: int | None, max_num_splits: int | None,
            tag: tuple[str, ...], run_id_file: str | None, with_specs: tuple[str, ...],
            **values: str | None) -> None:
        from millstream.client.launch import launch_run

        state = ctx.find_object(CliState) or CliState(env=os.environ)
        raw = {dests[k]: v for k, v in values.items() if v is not None}
        with cli_errors():
            code = launch_run(flow_cls, raw, settings=state.settings(), env=state.env,
                              with_specs=(*state.with_specs, *with_specs), tags=tag,
                              max_workers=max_workers, max_num_splits=max_num_splits,
                              run_id_file=run_id_file, quiet=state.quiet)
        ctx.exit(code)

    options: list[click.Parameter] = [
        click.Option(["--max-workers"], type=click.IntRange(min=1), default=None,
                     help=f"Tasks run at once [default: {run_defaults.max_workers}, or run.max_workers]"),
        click.Option(["--max-num-splits"], type=click.IntRange(min=1), default=None,
                     help=f"Most tasks a foreach may fan out to [default: {run_defaults.max_num_splits}, "
                          "or run.max_num_splits]"),
        click.Option(["--tag"], multiple=True, help="Tag the run (repeatable)."),
        click.Option(["--run-id-file"], type=click.Path(dir_okay=False), default=None,
                     help="Write the run id to this file once the run has started."),
        click.Option(["--with", "with_specs"], multiple=True, metavar="SPEC",
                     help="Add a decorator to every step, e.g. retry:times=2 (repeatable)."),
        *(parameter_option(p, dest) for dest, p in zip(dests, params, strict=True)),
    ]
    return click.Command("run", callback=run, params=options,
                         help=f"Run {flow_cls.__name__} through the millstream daemon.")


def make_resume_command(flow_cls: type) -> click.Command:
    """The ``resume`` command: clone what succeeded in an earlier run, run the rest."""

    @click.command("resume", help=f"Resume a run of {flow_cls.__name__}: reuse its successful tasks and run "
                                  "again what failed and what follows it (or STEP and what follows it).")
    @click.argument("step", required=False)
    @click.option("--origin-run-id", default=None, help="The run to resume [default: the latest run of the flow].")
    @click.option("--max-workers", type=click.IntRange(min=1), default=None, help="Tasks run at once.")
    @click.option("--max-num-splits", type=click.IntRange(min=1), default=None,
                  help="Most tasks a foreach may fan out to.")
    @click.option("--tag", multiple=True, help="Tag the run (repeatable).")
    @click.option("--run-id-file", type=click.Path(dir_okay=False), default=None,
                  help="Write the new run's id to this file once it has started.")
    @click.option("--with", "with_specs", multiple=True, metavar="SPEC", help="Add a decorator to every step.")
    @click.pass_context
    def resume(ctx: click.Context, /, step: str | None, *, origin_run_id: str | None, max_workers: int | None,
               max_num_splits: int | None, tag: tuple[str, ...], run_id_file: str | None,
               with_specs: tuple[str, ...]) -> None:
        from millstream.client.launch import launch_run

        state = ctx.find_object(CliState) or CliState(env=os.environ)
        with cli_errors():
            code = launch_run(flow_cls, {}, settings=state.settings(), env=state.env,
                              with_specs=(*state.with_specs, *with_specs), tags=tag,
                              max_workers=max_workers, max_num_splits=max_num_splits,
                              run_id_file=run_id_file, quiet=state.quiet,
                              resume={"origin_run_id": origin_run_id, "step": step})
        ctx.exit(code)

    return resume


# --------------------------------------------------------------------- the group
def make_flow_cli(flow_cls: type) -> click.Group:
    """The click group behind ``python flow.py``."""

    @click.group(help=f"Commands of the flow {flow_cls.__name__}.")
    @click.option("--pylint/--no-pylint", default=True, help="Accepted for Metaflow compatibility; no effect.")
    @click.option("--quiet", is_flag=True, help="Print only errors and the final line.")
    @click.option("--datastore", type=click.Choice(["local", "s3"]), default=None,
                  help="Datastore of a daemon this command starts.")
    @click.option("--datastore-root", default=None, help="Datastore root of a daemon this command starts.")
    @click.option("--metadata", type=click.Choice(["local", "service"]), default=None,
                  help="Accepted for Metaflow compatibility; the daemon's settings decide.")
    @click.option("--environment", type=click.Choice(["local"]), default="local",
                  help="Only 'local': tasks run in this Python environment.")
    @click.option("--with", "with_specs", multiple=True, metavar="SPEC",
                  help="Add a decorator to every step of a run (repeatable).")
    @click.pass_context
    def cli(ctx: click.Context, /, *, pylint: bool, quiet: bool, datastore: str | None,
            datastore_root: str | None, metadata: str | None, environment: str,
            with_specs: tuple[str, ...]) -> None:
        ctx.obj = CliState(
            env=os.environ,
            overrides=settings_overrides(datastore__type=datastore, datastore__root=datastore_root),
            quiet=quiet, with_specs=with_specs, flow_cls=flow_cls,
        )

    @cli.command(help="Validate the flow's graph.")
    @click.pass_context
    def check(ctx: click.Context) -> None:
        ctx.exit(check_flow(flow_cls))

    @cli.command(help="Show the flow's steps and how they connect.")
    @click.option("--format", "fmt", type=click.Choice(SHOW_FORMATS), default="text", show_default=True)
    @click.pass_context
    def show(ctx: click.Context, fmt: str) -> None:
        ctx.exit(show_flow(flow_cls, fmt))

    @cli.command(help="Print a task's logs: RUN/STEP[/TASK].")
    @click.argument("pathspec")
    @logs_options
    @click.pass_obj
    def logs(state: CliState, pathspec: str, stderr: bool, follow: bool, attempt: int | None) -> None:
        with cli_errors():
            print_logs(state, parse_pathspec(pathspec, flow=flow_cls.__name__),
                       stderr=stderr, attempt=attempt, follow=follow)

    @cli.command(help="Status of a run (default: the latest), RUN[/STEP[/TASK]].")
    @click.argument("run_id", required=False)
    @click.pass_obj
    def status(state: CliState, run_id: str | None) -> None:
        with cli_errors():
            spec = parse_pathspec(run_id, flow=flow_cls.__name__) if run_id else Pathspec(flow_cls.__name__)
            print_status(state, spec)

    cli.add_command(make_run_command(flow_cls))
    cli.add_command(step_functions_group(flow_cls))
    cli.add_command(make_resume_command(flow_cls))
    cli.add_command(dump_command(flow_cls.__name__))
    cli.add_command(tag_group(flow_cls.__name__))
    return cli


def step_functions_group(flow_cls: type) -> click.Group:
    """The ``step-functions`` commands of one flow (defined in :mod:`millstream.client.sfncmd`)."""
    from millstream.client.sfncmd import make_step_functions_group

    return make_step_functions_group(flow_cls)


def main(flow_cls: type, argv: Sequence[str]) -> None:
    """Run the flow's command line on ``argv`` and exit, as ``FlowSpec()`` in a flow file does."""
    try:
        prog = flow_file(flow_cls).name
    except FlowError:
        prog = flow_cls.__name__
    make_flow_cli(flow_cls).main(args=list(argv), prog_name=prog)
