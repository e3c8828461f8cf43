"""The key layout: exact keys, and refusal of components that could break it."""

from __future__ import annotations

import pytest

from millstream.datastore import layout
from millstream.errors import DatastoreError

SHA = "ab" + "0" * 62


def test_keys_follow_the_documented_layout() -> None:
    attempt = ("Flow", "r-1", "start", "t.7", 2)
    assert layout.artifact_key("Flow", SHA) == f"Flow/data/ab/{SHA}"
    assert layout.started_key(*attempt) == "Flow/r-1/start/t.7/2/started.json"
    assert layout.done_key(*attempt) == "Flow/r-1/start/t.7/2/done.json"
    assert layout.stdout_key(*attempt) == "Flow/r-1/start/t.7/2/stdout"
    assert layout.stderr_key(*attempt) == "Flow/r-1/start/t.7/2/stderr"
    assert layout.attempt_prefix(*attempt) == "Flow/r-1/start/t.7/2/"
    assert layout.task_prefix("Flow", "r-1", "start", "t.7") == "Flow/r-1/start/t.7/"
    assert layout.run_prefix("Flow", "r-1") == "Flow/r-1/"
    assert layout.checkpoint_key("Flow", "r-1") == "Flow/r-1/_run/checkpoint.json"
    assert layout.params_key("Flow", "r-1") == "Flow/r-1/_run/params.json"
    assert layout.package_key(SHA) == f"packages/{SHA}.tar.gz"
    assert layout.active_runs_key("host-1") == "daemon/host-1/active.json"
    assert layout.artifacts_prefix("Flow") == "Flow/data/"


@pytest.mark.parametrize("name", ["", "1abc", "has-dash", "a.b", "a/b", "flöw", "packages",
                                  "daemon", "x" * 129, 3])
def test_bad_flow_names_are_rejected(name: str) -> None:
    with pytest.raises(DatastoreError):
        layout.check_flow(name)


@pytest.mark.parametrize("name", ["", "a b", "_run", "../x"])
def test_bad_step_names_are_rejected(name: str) -> None:
    with pytest.raises(DatastoreError):
        layout.check_step(name)


@pytest.mark.parametrize("run_id", ["", ".", "..", ".hidden", ".tmp-1", "a/b", "a b",
                                    "a\n", "data", "x" * 129, "ü"])
def test_bad_run_ids_are_rejected(run_id: str) -> None:
    with pytest.raises(DatastoreError):
        layout.check_run_id(run_id)


@pytest.mark.parametrize("run_id", ["1", "argo-123", "r_2.final", "-x", "a..b"])
def test_good_run_ids_pass(run_id: str) -> None:
    assert layout.check_run_id(run_id) == run_id


@pytest.mark.parametrize("task_id", ["", "..", "a/b", "x\x00"])
def test_bad_task_ids_are_rejected(task_id: str) -> None:
    with pytest.raises(DatastoreError):
        layout.check_task_id(task_id)


@pytest.mark.parametrize("attempt", [-1, True, 1.0, "1"])
def test_bad_attempts_are_rejected(attempt: object) -> None:
    with pytest.raises(DatastoreError):
        layout.check_attempt(attempt)  # type: ignore[arg-type]


@pytest.mark.parametrize("sha", ["", "AB" + "0" * 62, "0" * 63, "0" * 65, "g" * 64, "0" * 64 + "\n"])
def test_bad_shas_are_rejected(sha: str) -> None:
    with pytest.raises(DatastoreError):
        layout.package_key(sha)


def test_every_key_builder_validates() -> None:
    with pytest.raises(DatastoreError):
        layout.done_key("Flow", "..", "start", "1", 0)
    with pytest.raises(DatastoreError):
        layout.stdout_key("Flow", "1", "start", "../../etc", 0)
    with pytest.raises(DatastoreError):
        layout.active_runs_key("../x")
    with pytest.raises(DatastoreError):
        layout.artifact_key("Flow", "../" + "0" * 61)
