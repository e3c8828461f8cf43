"""``millstream schedule create|list|pause|resume|delete``: runs the daemon starts by itself.

``create FLOW.py`` saves the flow's code and parameters with the daemon. When it fires
comes from ``--cron`` (five fields, in ``--timezone``), else from the flow's
``@schedule``; flows named by ``@trigger_on_finish`` start it when one of their runs
succeeds. ``--catchup`` says what happens to instants missed while the daemon was down:
``latest`` (the default) runs the most recent one, ``all`` runs each, ``none`` skips them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from millstream.client.console import cli_errors, table
from millstream.client.daemonctl import ensure_daemon
from millstream.client.flowcli import CliState
from millstream.client.http import api_path
from millstream.client.loader import load_flow
from millstream.client.submit import build_submission, current_username, upload_package


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if ts else "-"


def _print(s: dict[str, Any]) -> None:
    what = f"cron {s['cron']!r} ({s['timezone'] or 'UTC'})" if s.get("cron") else "no cron"
    if s.get("triggers"):
        what += f", after {', '.join(s['triggers'])} succeeds"
    state = "paused" if s["paused"] else f"next run {_when(s.get('next_fire'))}"
    click.echo(f"Schedule {s['name']} ({s['flow']}): {what}; catch-up {s['catchup']}; {state}")


@click.group("schedule")
def schedule_group() -> None:
    """Runs the daemon starts on a schedule or when another flow succeeds."""


@schedule_group.command("create", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("flow_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--flow", "flow_name", default=None, help="The flow class, when the file defines several.")
@click.option("--name", default=None, help="The schedule's name [default: the flow's name].")
@click.option("--cron", default=None, help="Five-field cron expression [default: the flow's @schedule].")
@click.option("--timezone", default=None, help="IANA time zone of the cron expression [default: UTC].")
@click.option(
    "--catchup",
    type=click.Choice(["latest", "all", "none"]),
    default="latest",
    help="What to do with instants missed while the daemon was down.",
)
@click.option("--tag", multiple=True, help="Tag every run (repeatable).")
@click.pass_context
def create(
    ctx: click.Context,
    flow_path: str,
    flow_name: str | None,
    name: str | None,
    cron: str | None,
    timezone: str | None,
    catchup: str,
    tag: tuple[str, ...],
) -> None:
    """Save FLOW.py with the daemon and run it on a schedule: ... create FLOW.py [--PARAM VALUE]..."""
    state: CliState = ctx.obj
    settings = state.settings()
    with cli_errors():
        flow_cls = load_flow(flow_path, flow_name)
        raw = _params(list(ctx.args))
        body, package = build_submission(
            flow_cls,
            raw,
            tags=tag,
            max_workers=settings.run.max_workers,
            max_num_splits=settings.run.max_num_splits,
            username=current_username(state.env),
            env=state.env,
        )
        decorators = body["graph"].get("flow_decorators", {})
        sched = decorators.get("schedule", {}).get("attributes", {})
        if cron is None and sched:
            cron = sched.get("cron") or (
                "0 * * * *" if sched.get("hourly") else "0 0 * * 0" if sched.get("weekly") else "0 0 * * *"
            )
            timezone = timezone or sched.get("timezone")
        trig = decorators.get("trigger_on_finish", {}).get("attributes", {})
        triggers = [trig["flow"]] if trig.get("flow") else list(trig.get("flows") or [])
        client = ensure_daemon(settings, state.env)
        upload_package(client, body["package"], package)
        _, saved = client.request(
            "POST",
            api_path("schedules"),
            json_body={
                "name": name,
                "submission": body,
                "cron": cron,
                "timezone": timezone,
                "catchup": catchup,
                "triggers": triggers,
            },
        )
    _print(saved)


def _params(args: list[str]) -> dict[str, str | None]:
    raw: dict[str, str | None] = {}
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise click.UsageError(f"unexpected argument {arg!r}: parameters are --name value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args:
                raise click.UsageError(f"--{key} needs a value")
            value = args.pop(0)
        raw[key] = value
    return raw


@schedule_group.command("list")
@click.pass_obj
def list_(state: CliState) -> None:
    """Every schedule and when it runs next."""
    with cli_errors():
        client = ensure_daemon(state.settings(), state.env)
        _, body = client.request("GET", api_path("schedules"))
    rows = [
        [
            s["name"],
            s["flow"],
            s.get("cron") or "-",
            s.get("timezone") or "UTC",
            ",".join(s.get("triggers") or []) or "-",
            "paused" if s["paused"] else _when(s.get("next_fire")),
            str(s["fired"]),
            s["owner"],
        ]
        for s in body["schedules"]
    ]
    click.echo(
        table(["NAME", "FLOW", "CRON", "TZ", "TRIGGERS", "NEXT", "FIRED", "OWNER"], rows) if rows else "No schedules."
    )


def _action(state: CliState, name: str, method: str, path: list[str]) -> dict[str, Any]:
    with cli_errors():
        client = ensure_daemon(state.settings(), state.env)
        return client.request(method, api_path("schedules", name, *path))[1]


@schedule_group.command("pause")
@click.argument("name")
@click.pass_obj
def pause(state: CliState, name: str) -> None:
    """Stop firing NAME until it is resumed."""
    _print(_action(state, name, "POST", ["pause"]))


@schedule_group.command("resume")
@click.argument("name")
@click.pass_obj
def resume(state: CliState, name: str) -> None:
    """Fire NAME again (instants missed while paused are skipped)."""
    _print(_action(state, name, "POST", ["resume"]))


@schedule_group.command("delete")
@click.argument("name")
@click.pass_obj
def delete(state: CliState, name: str) -> None:
    """Forget NAME."""
    _action(state, name, "DELETE", [])
    click.echo(f"Schedule {name} deleted.")
