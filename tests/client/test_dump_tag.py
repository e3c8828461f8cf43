"""``dump`` and ``tag``, as ``millstream ...`` and ``python flow.py ...`` subprocesses against a real daemon."""

from __future__ import annotations

import asyncio
import os
import pickle
import pwd
import subprocess
from pathlib import Path

import pytest

from millstream.client.dumpcmd import short_repr
from millstream.metadata.sqlite import SqliteMetadataStore
from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import run_flow

ME = pwd.getpwuid(os.getuid()).pw_name


def finished(daemon: Daemon, flow: str, run_id: str) -> bool:
    """Whether the metadata store holds the run's final status (it is written after the fact)."""

    async def status() -> str:
        async with SqliteMetadataStore(daemon.datastore / "metadata.db") as store:
            return (await store.get_run(flow, run_id)).status

    return asyncio.run(status()) in ("ok", "failed", "cancelled")


def made(daemon: Daemon, stem: str, flow: str, *args: str) -> str:
    """Run an example flow to its end, recorded; its run id."""
    run_id, proc = run_flow(daemon, EXAMPLES / f"{stem}.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_until(lambda: finished(daemon, flow, run_id), 30)
    return run_id


def flow_cmd(daemon: Daemon, stem: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python examples/STEM.py ARGS`` with the daemon's settings."""
    return daemon.run_flow(EXAMPLES / f"{stem}.py", *args)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# ------------------------------------------------------------------ dump


def test_dump_a_task_prints_names_types_and_values(daemon: Daemon) -> None:
    run_id = made(daemon, "hello", "HelloFlow")
    out = ok(daemon.cli("dump", f"HelloFlow/{run_id}/greet/0"))
    lines = out.splitlines()
    assert lines[0] == f"HelloFlow/{run_id}/greet/0"
    assert lines[1].split() == ["NAME", "TYPE", "VALUE"]
    assert lines[2].split(maxsplit=2) == ["message", "str", "'hello, world'"]


def test_dump_a_run_prints_every_task_in_order(daemon: Daemon) -> None:
    run_id = made(daemon, "hello", "HelloFlow")
    out = ok(daemon.cli("dump", f"HelloFlow/{run_id}", "--include", "message"))
    headers = [line for line in out.splitlines() if line.startswith("HelloFlow/")]
    assert headers == [f"HelloFlow/{run_id}/{step}/0" for step in ("start", "greet", "end")]
    assert "'hello'" in out and "'hello, world'" in out


def test_dump_to_a_file_pickles_every_task(daemon: Daemon, tmp_path: Path) -> None:
    run_id = made(daemon, "foreach", "ForeachFlow", "--count", "3")
    target = tmp_path / "out.pkl"
    out = ok(flow_cmd(daemon, "foreach", "dump", f"{run_id}/square", "--include", "value", "--file", str(target)))
    assert "artifacts of 3 tasks written to" in out
    values = pickle.loads(target.read_bytes())
    assert values == {f"ForeachFlow/{run_id}/square/{i}": {"value": i * i} for i in range(3)}

    whole = tmp_path / "run.pkl"
    ok(daemon.cli("dump", f"ForeachFlow/{run_id}", "--file", str(whole)))
    values = pickle.loads(whole.read_bytes())
    assert len(values) == 1 + 3 + 1 + 1  # start, the splits, join, end
    assert values[f"ForeachFlow/{run_id}/join/0"]["total"] == 5
    assert values[f"ForeachFlow/{run_id}/start/0"]["count"] == 3  # parameters are artifacts


def test_dump_of_the_flow_file_takes_run_step_task(daemon: Daemon) -> None:
    run_id = made(daemon, "foreach", "ForeachFlow", "--count", "3")
    out = ok(flow_cmd(daemon, "foreach", "dump", f"{run_id}/square/2", "--include", "value,count"))
    assert out.splitlines()[0] == f"ForeachFlow/{run_id}/square/2"
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert rows == {"count": ["int", "3"], "value": ["int", "4"]}


@pytest.mark.parametrize(("args", "message"), [
    (("dump", "HelloFlow"), "dump takes a run, a step or a task"),
    (("dump", "HelloFlow/999"), "does not exist"),
    (("dump", "HelloFlow/1/nosuch"), "does not exist"),
])
def test_dump_errors_are_one_line_and_exit_1(daemon: Daemon, args: tuple[str, ...], message: str) -> None:
    made(daemon, "hello", "HelloFlow")
    proc = daemon.cli(*args)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_short_repr_is_one_bounded_line() -> None:
    assert short_repr("x" * 500).startswith("'xxx") and len(short_repr("x" * 500)) <= 60
    assert short_repr({"a": list(range(100))}).count("\n") == 0
    assert short_repr(3) == "3"


# ------------------------------------------------------------------ tag


def test_flow_file_tag_add_remove_replace_list(daemon: Daemon) -> None:
    run_id = made(daemon, "hello", "HelloFlow", "--tag", "given")
    out = ok(flow_cmd(daemon, "hello", "tag", "add", "--run-id", run_id, "one", "two"))
    assert out.startswith("Operation successful. New tags:")
    assert "given, one, two" in out and f"runtime:millstream, user:{ME}" in out
    ok(flow_cmd(daemon, "hello", "tag", "remove", "--run-id", run_id, "one"))
    ok(flow_cmd(daemon, "hello", "tag", "replace", "--run-id", run_id, "two", "three"))
    listed = ok(flow_cmd(daemon, "hello", "tag", "list", "--run-id", run_id))
    row = next(line for line in listed.splitlines() if line.startswith(f"HelloFlow/{run_id} "))
    assert "given, three" in row and f"user:{ME}" in row
    hidden = ok(flow_cmd(daemon, "hello", "tag", "list", "--run-id", run_id, "--hide-system-tags"))
    assert "SYSTEM TAGS" not in hidden and "user:" not in hidden


def test_flow_file_tag_without_run_id_tags_your_latest_run(daemon: Daemon) -> None:
    made(daemon, "hello", "HelloFlow")
    latest = made(daemon, "hello", "HelloFlow")
    ok(flow_cmd(daemon, "hello", "tag", "add", "latest-one"))
    listed = ok(daemon.cli("tag", "list", "HelloFlow"))
    rows = {line.split()[0]: line for line in listed.splitlines()[1:]}
    assert "latest-one" in rows[f"HelloFlow/{latest}"]
    assert sum("latest-one" in row for row in rows.values()) == 1


def test_millstream_tag_commands(daemon: Daemon) -> None:
    run_id = made(daemon, "hello", "HelloFlow")
    pathspec = f"HelloFlow/{run_id}"
    ok(daemon.cli("tag", "add", pathspec, "a", "b"))
    ok(daemon.cli("tag", "replace", pathspec, "a", "c"))
    ok(daemon.cli("tag", "remove", pathspec, "b"))
    listed = ok(daemon.cli("tag", "list", pathspec))
    assert listed.splitlines()[0].split()[:3] == ["RUN", "USER", "TAGS"]
    assert listed.splitlines()[1].split()[:2] == [pathspec, "c"]


@pytest.mark.parametrize(("args", "message"), [
    (("remove", "{run}", "user:{me}"), "cannot remove system tags"),
    (("replace", "{run}", "runtime:millstream", "x"), "cannot remove system tags"),
    (("add", "HelloFlow/999", "x"), "does not exist"),
    (("add", "HelloFlow", "x"), "tags belong to runs"),
    (("add", "{run}", ""), "bad tag"),
])
def test_tag_errors_are_one_line_and_exit_1(daemon: Daemon, args: tuple[str, ...], message: str) -> None:
    run_id = made(daemon, "hello", "HelloFlow")
    argv = [a.format(run=f"HelloFlow/{run_id}", me=ME) for a in args]
    proc = daemon.cli("tag", *argv)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    listed = ok(daemon.cli("tag", "list", f"HelloFlow/{run_id}"))
    assert f"user:{ME}" in listed and "runtime:millstream" in listed  # system tags untouched
