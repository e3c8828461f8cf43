"""``step-functions create|trigger|list-runs|delete``: a flow as an AWS Step Functions state machine.

``create`` compiles the flow (:mod:`millstream.deploy.stepfunctions`), uploads its code
package to the S3 datastore, registers missing job definitions, creates or updates the
state machine and, for a flow with ``@schedule``, the EventBridge rule that starts it.
``create --only-json`` prints the definition and touches nothing. ``trigger`` starts an
execution with one option per flow Parameter, as ``run`` has; values stay strings and
the start task converts them, so a bad value fails the execution's first task.
The AWS calls live in :mod:`millstream.deploy.aws`, imported only by these commands.
"""

from __future__ import annotations

import asyncio
import json
import os

import click

from millstream.client.console import cli_errors, table
from millstream.client.flowcli import CliState, parameter_option
from millstream.client.launch import write_run_id_file
from millstream.flow.parameters import flow_parameters


def _state(ctx: click.Context) -> CliState:
    return ctx.find_object(CliState) or CliState(env=os.environ)


def _iso(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if hasattr(value, "strftime") else "-"


def make_step_functions_group(flow_cls: type) -> click.Group:
    """The ``step-functions`` group of one flow; the deploy package is imported only when a command runs."""
    name = flow_cls.__name__

    @click.group("step-functions", help=f"Deploy {name} to AWS Step Functions and run it there.")
    def group() -> None:
        pass

    @group.command("create", help=f"Create or update the state machine of {name} (and its schedule).")
    @click.option("--only-json", is_flag=True, help="Print the state machine definition; deploy nothing.")
    @click.pass_context
    def create(ctx: click.Context, only_json: bool) -> None:
        from millstream.deploy.aws import deploy_export
        from millstream.deploy.export import build_export

        state = _state(ctx)
        with cli_errors():
            export = build_export(flow_cls, state.settings())
            if only_json:
                click.echo(json.dumps(export.compiled.definition, indent=2))
                return
            report = asyncio.run(deploy_export(export, state.settings()))
        click.echo(f"State machine {export.name} {report['action']}: {report['state_machine_arn']}")
        for jobdef in report["job_definitions_registered"]:
            click.echo(f"Job definition {jobdef} registered")
        click.echo(f"Schedule: {report['schedule']}" if report["schedule"] else "No schedule (no @schedule)")

    params = flow_parameters(flow_cls)
    dests = {f"ms_param_{i}": p.name for i, p in enumerate(params)}

    @click.pass_context
    def trigger(ctx: click.Context, /, *, run_id_file: str | None, **values: str | None) -> None:
        from millstream.deploy.aws import open_deployer
        from millstream.deploy.stepfunctions import state_machine_name

        state = _state(ctx)
        raw = {dests[k]: v for k, v in values.items() if v is not None}

        async def start() -> dict[str, str]:
            sf = state.settings().stepfunctions
            async with open_deployer(sf) as deployer:
                return await deployer.trigger(state_machine_name(name, sf.name_prefix), raw)

        with cli_errors():
            started = asyncio.run(start())
        if run_id_file:
            write_run_id_file(run_id_file, started["run_id"])
        click.echo(f"Run {name}/{started['run_id']} started: {started['execution_arn']}")

    group.add_command(click.Command(
        "trigger", callback=trigger, help=f"Start an execution of {name}'s state machine.",
        params=[click.Option(["--run-id-file"], type=click.Path(dir_okay=False), default=None,
                             help="Write the run id to this file."),
                *(parameter_option(p, dest) for dest, p in zip(dests, params, strict=True))]))

    @group.command("list-runs", help=f"Executions of {name}'s state machine, newest first.")
    @click.option("--status", default=None, help="Only executions in this state (RUNNING, SUCCEEDED, ...).")
    @click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
    @click.pass_context
    def list_runs(ctx: click.Context, status: str | None, limit: int) -> None:
        from millstream.deploy.aws import open_deployer
        from millstream.deploy.stepfunctions import state_machine_name

        state = _state(ctx)

        async def listing() -> list[dict[str, object]]:
            sf = state.settings().stepfunctions
            async with open_deployer(sf) as deployer:
                return await deployer.list_runs(state_machine_name(name, sf.name_prefix),
                                                status.upper() if status else None, limit)

        with cli_errors():
            runs = asyncio.run(listing())
        if not runs:
            click.echo("no runs")
            return
        rows = [(r["run_id"], r["status"], _iso(r["started"]), _iso(r["stopped"])) for r in runs]
        click.echo(table(("RUN", "STATUS", "STARTED", "STOPPED"), rows), nl=False)

    @group.command("delete", help=f"Delete {name}'s state machine and its schedule.")
    @click.pass_context
    def delete(ctx: click.Context) -> None:
        from millstream.deploy.aws import open_deployer
        from millstream.deploy.stepfunctions import state_machine_name

        state = _state(ctx)

        async def remove() -> dict[str, object]:
            sf = state.settings().stepfunctions
            async with open_deployer(sf) as deployer:
                return await deployer.delete(state_machine_name(name, sf.name_prefix))

        with cli_errors():
            report = asyncio.run(remove())
        rule = "and its schedule " if report["rule_deleted"] else ""
        click.echo(f"State machine {report['state_machine_arn']} {rule}deleted")

    return group
