"""``dump`` and ``tag``: the artifacts and the tags of past runs, read through the Client API.

Both exist twice, in the shapes users type them: ``millstream dump FLOW/RUN[/STEP[/TASK]]``
and ``millstream tag add|remove|replace|list FLOW/RUN TAG...``, and, in a flow file's
command line, Metaflow's ``python flow.py dump RUN[/STEP[/TASK]]`` and
``python flow.py tag add|remove|replace|list [--run-id ID] TAG...`` (without
``--run-id``: your latest run of the flow).

``dump`` looks past namespaces, as Metaflow's does: a pathspec names one run. Changing
tags is for the run's owner (or root, or on a shared host a member of its admin group)
only, and never touches system tags; the Client API enforces both
(:meth:`millstream.client.api.Run.add_tags`), through the daemon when one answers (it
knows the caller's uid from the kernel), so the notebook and the command line agree.
Nothing here is imported until a command runs it, so ``python flow.py run`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from millstream.client.console import cli_errors, table
from millstream.client.pathspec import Pathspec, PathspecError, parse_pathspec

if TYPE_CHECKING:
    from millstream.client.api import Run, Task
    from millstream.client.flowcli import CliState

VALUE_WIDTH = 60
TAG_LIST_LIMIT = 20



def short_repr(value: Any) -> str:
    """A one-line repr of at most about VALUE_WIDTH characters."""
    import reprlib

    brief = reprlib.Repr()
    brief.maxstring = brief.maxother = VALUE_WIDTH
    brief.maxlist = brief.maxtuple = brief.maxset = brief.maxdict = 8
    text = " ".join(brief.repr(value).split())
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 3] + "..."


def _with_reader(state: CliState, work: Callable[[], Any]) -> Any:
    """Run ``work`` with the Client API reading what the command's settings name."""
    from millstream.client import api
    from millstream.client.datastore_view import reader_for

    settings = state.settings()
    api.use_reader(reader_for(settings), settings=settings)
    try:
        return work()
    finally:
        api.use_reader(None)


# --------------------------------------------------------------------- dump
def _tasks(spec: Pathspec) -> Iterator[Task]:
    """The tasks a run, step or task pathspec names, in the order they ran."""
    from millstream.client.api import Run, Task

    if spec.task_id is not None:
        yield Task(str(spec), _namespace_check=False)
        return
    run = Run(f"{spec.flow}/{spec.run_id}", _namespace_check=False)
    steps = [run[spec.step]] if spec.step is not None else list(reversed(list(run)))
    for step in steps:
        yield from reversed(list(step))


def _artifacts(task: Task, include: set[str] | None, private: bool) -> list[Any]:
    arts = [a for a in task._artifacts().values() if private or not a.id.startswith("_")]
    return [a for a in arts if include is None or a.id in include]


def _value(art: Any) -> Any:
    try:
        return art.data
    except Exception as exc:  # an artifact whose class this process cannot import, say
        raise click.ClickException(f"cannot load {art.pathspec}: {type(exc).__name__}: {exc}") from exc


def dump(state: CliState, spec: Pathspec, *, include: str | None, private: bool, out_file: str | None) -> None:
    """Print the artifacts of every task ``spec`` names, or pickle them to ``out_file``."""
    if spec.run_id is None:
        raise PathspecError(f"dump takes a run, a step or a task: {spec.flow}/RUN[/STEP[/TASK]]")
    wanted = {name.strip() for name in include.split(",") if name.strip()} if include else None

    def work() -> None:
        values: dict[str, dict[str, Any]] = {}
        for task in _tasks(spec):
            arts = _artifacts(task, wanted, private)
            if out_file is not None:
                values[task.pathspec] = {art.id: _value(art) for art in arts}
                continue
            rows = [(art.id, art.type_name, short_repr(_value(art))) for art in arts]
            body = table(("NAME", "TYPE", "VALUE"), rows) if rows else "no artifacts\n"
            click.echo(f"{task.pathspec}\n" + "".join(f"  {line}\n" for line in body.splitlines()))
        if out_file is not None:
            import pickle

            with Path(out_file).open("wb") as out:
                pickle.dump(values, out, protocol=pickle.HIGHEST_PROTOCOL)
            click.echo(f"artifacts of {len(values)} task{'s' if len(values) != 1 else ''} written to {out_file}")

    _with_reader(state, work)


def dump_command(flow_name: str | None = None) -> click.Command:
    """``dump``: of ``millstream`` (FLOW/RUN[/STEP[/TASK]]) or of one flow's file (RUN[/STEP[/TASK]])."""
    what = "RUN/STEP[/TASK]" if flow_name else "FLOW/RUN[/STEP[/TASK]]"

    @click.command("dump", help=f"Print the artifacts of {what}: each task's names, types and values.")
    @click.argument("pathspec")
    @click.option("--include", default=None, metavar="A,B", help="Only these artifacts (comma-separated).")
    @click.option("--private", is_flag=True, help="Also artifacts whose names start with '_'.")
    @click.option("--file", "out_file", type=click.Path(dir_okay=False), default=None,
                  help="Pickle {pathspec: {name: value}} to this file instead of printing.")
    @click.pass_obj
    def command(state: CliState, pathspec: str, include: str | None, private: bool, out_file: str | None) -> None:
        with cli_errors():
            dump(state, parse_pathspec(pathspec, flow=flow_name), include=include, private=private,
                 out_file=out_file)

    return command


# --------------------------------------------------------------------- tag
def _tag_rows(runs: list[Run], hide_system: bool) -> str:
    headers = ("RUN", "USER TAGS") if hide_system else ("RUN", "USER TAGS", "SYSTEM TAGS")
    rows = []
    for run in runs:
        row = [run.pathspec, ", ".join(sorted(run.user_tags)) or "-"]
        if not hide_system:
            row.append(", ".join(sorted(run.system_tags)))
        rows.append(row)
    return table(headers, rows)


def _run(flow: str, run_id: str | None) -> Run:
    """The run to tag: the one named, else your latest run of the flow."""
    from millstream.client.api import Flow, Run

    if run_id is not None:
        return Run(f"{flow}/{run_id}", _namespace_check=False)
    latest = Flow(flow).latest_run
    if latest is None:
        raise click.ClickException(f"you have no run of {flow}; name one with --run-id")
    return latest


def change_tags(state: CliState, flow: str, run_id: str | None, *, add: tuple[str, ...] = (),
                remove: tuple[str, ...] = ()) -> None:
    """Remove, then add, user tags of a run, and print its tags."""

    def work() -> None:
        run = _run(flow, run_id)
        run.replace_tags(remove, add)
        click.echo("Operation successful. New tags:")
        click.echo(_tag_rows([run], hide_system=False), nl=False)

    _with_reader(state, work)


def list_tags(state: CliState, flow: str, run_id: str | None, *, every_user: bool, hide_system: bool,
              limit: int) -> None:
    """Print the tags of one run, or of your (everyone's) latest runs of the flow."""
    from millstream.client.api import Flow, Run

    def work() -> None:
        if run_id is not None:
            runs = [Run(f"{flow}/{run_id}", _namespace_check=False)]
        else:
            runs = []
            for run in Flow(flow, _namespace_check=not every_user):
                runs.append(run)
                if len(runs) >= limit:
                    break
        click.echo(_tag_rows(runs, hide_system), nl=False)

    _with_reader(state, work)


def _run_of(pathspec: str) -> tuple[str, str]:
    spec = parse_pathspec(pathspec)
    if spec.run_id is None or spec.step is not None:
        raise PathspecError(f"tags belong to runs: FLOW/RUN, not {pathspec!r}")
    return spec.flow, spec.run_id


_list_options: list[Callable[[Any], Any]] = [
    click.option("--all", "every_user", is_flag=True, help="Runs of every user, not only yours."),
    click.option("--hide-system-tags", "hide_system", is_flag=True, help="Show user tags only."),
    click.option("--limit", type=click.IntRange(min=1), default=TAG_LIST_LIMIT, show_default=True,
                 help="Most runs listed when no run is named."),
]


def _with_list_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_list_options):
        func = option(func)
    return func


def tag_group(flow_name: str | None = None) -> click.Group:
    """``tag``: of ``millstream`` (FLOW/RUN TAG...) or of one flow's file (``--run-id ID TAG...``)."""
    if flow_name is None:
        return _millstream_tag_group()
    return _flow_tag_group(flow_name)


def _millstream_tag_group() -> click.Group:
    @click.group("tag", help="Add, remove, replace or list the user tags of a run (system tags never change).")
    def group() -> None:
        pass

    @group.command("add", help="Add tags to FLOW/RUN.")
    @click.argument("run")
    @click.argument("tags", nargs=-1, required=True)
    @click.pass_obj
    def add(state: CliState, run: str, tags: tuple[str, ...]) -> None:
        with cli_errors():
            change_tags(state, *_run_of(run), add=tags)

    @group.command("remove", help="Remove tags from FLOW/RUN.")
    @click.argument("run")
    @click.argument("tags", nargs=-1, required=True)
    @click.pass_obj
    def remove(state: CliState, run: str, tags: tuple[str, ...]) -> None:
        with cli_errors():
            change_tags(state, *_run_of(run), remove=tags)

    @group.command("replace", help="Replace the tag OLD of FLOW/RUN with NEW.")
    @click.argument("run")
    @click.argument("old")
    @click.argument("new")
    @click.pass_obj
    def replace(state: CliState, run: str, old: str, new: str) -> None:
        with cli_errors():
            change_tags(state, *_run_of(run), remove=(old,), add=(new,))

    @group.command("list", help="List the tags of FLOW/RUN, or of the latest runs of FLOW.")
    @click.argument("pathspec")
    @_with_list_options
    @click.pass_obj
    def list_command(state: CliState, pathspec: str, every_user: bool, hide_system: bool, limit: int) -> None:
        with cli_errors():
            spec = parse_pathspec(pathspec)
            if spec.step is not None:
                raise PathspecError(f"tags belong to runs: FLOW or FLOW/RUN, not {pathspec!r}")
            list_tags(state, spec.flow, spec.run_id, every_user=every_user, hide_system=hide_system, limit=limit)

    return group


def _flow_tag_group(flow_name: str) -> click.Group:
    run_id_option = click.option("--run-id", default=None, help="The run [default: your latest run of the flow].")

    @click.group("tag", help="Add, remove, replace or list the user tags of a run (system tags never change).")
    def group() -> None:
        pass

    @group.command("add", help="Add tags to a run.")
    @run_id_option
    @click.argument("tags", nargs=-1, required=True)
    @click.pass_obj
    def add(state: CliState, run_id: str | None, tags: tuple[str, ...]) -> None:
        with cli_errors():
            change_tags(state, flow_name, run_id, add=tags)

    @group.command("remove", help="Remove tags from a run.")
    @run_id_option
    @click.argument("tags", nargs=-1, required=True)
    @click.pass_obj
    def remove(state: CliState, run_id: str | None, tags: tuple[str, ...]) -> None:
        with cli_errors():
            change_tags(state, flow_name, run_id, remove=tags)

    @group.command("replace", help="Replace the tag OLD of a run with NEW.")
    @run_id_option
    @click.argument("old")
    @click.argument("new")
    @click.pass_obj
    def replace(state: CliState, run_id: str | None, old: str, new: str) -> None:
        with cli_errors():
            change_tags(state, flow_name, run_id, remove=(old,), add=(new,))

    @group.command("list", help="List the tags of a run, or of your latest runs.")
    @click.option("--run-id", default=None, help="The run [default: your latest runs].")
    @_with_list_options
    @click.pass_obj
    def list_command(state: CliState, run_id: str | None, every_user: bool, hide_system: bool, limit: int) -> None:
        with cli_errors():
            list_tags(state, flow_name, run_id, every_user=every_user, hide_system=hide_system, limit=limit)

    return group
