"""``millstream config show`` and the errors of a bad configuration file.

Every error names the file (or the environment), the key and what was expected, so an
operator of the shared host can fix ``/etc/millstream/config.toml`` from the message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from millstream.config.settings import describe, load_settings
from millstream.errors import ConfigError


def _env(tmp_path: Path, config: str | None = None, **extra: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    if config is not None:
        path.write_text(config)
    return {"HOME": str(tmp_path), "MILLSTREAM_CONFIG": str(path), "PATH": os.environ.get("PATH", ""), **extra}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("[daemon]\nmax_body_mb = 'lots'\n", "daemon.max_body_mb must be int, got 'lots'"),
        ("[daemon]\ncheckpoint_interval_s = true\n", "daemon.checkpoint_interval_s must be float, got True"),
        ("[local]\nfork = 'sometimes'\n", "local.fork must be bool, got 'sometimes'"),
        ("[local]\nmax_slots = true\n", "local.max_slots must be int, got True"),
        ("[daemon]\nid = { name = 'x' }\n", "daemon.id must be str, got {'name': 'x'}"),
        ("[datastore]\nroot = ['a', 'b']\n", "datastore.root must be str, got ['a', 'b']"),
        ("[daemon]\nsockett = '/run/x.sock'\n", "unknown key daemon.sockett; known: socket, state_dir"),
        ("[deamon]\nsocket = '/run/x.sock'\n", "unknown section [deamon]; known: datastore, daemon"),
        ("daemon = 'x'\n", "unknown section [daemon]"),
        ("[daemon\nsocket = 1\n", "(at line 1, column 8)"),
    ],
)
def test_a_bad_file_names_file_key_and_expected_type(tmp_path: Path, config: str, expected: str) -> None:
    env = _env(tmp_path, config)
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.toml'}: "), message
    assert expected in message


def test_a_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^environment: local\.max_slots must be int, got 'many'$"):
        load_settings(_env(tmp_path, MILLSTREAM_LOCAL_MAX_SLOTS="many"))
    with pytest.raises(ConfigError, match=r"^environment: unknown key daemon\.bogus"):
        load_settings(_env(tmp_path, MILLSTREAM_DAEMON_BOGUS="1"))


def test_describe_says_where_each_value_came_from(tmp_path: Path) -> None:
    env = _env(tmp_path, "[daemon]\nmax_body_mb = 8\n[metadata]\napi_key = 's3cret'\n", MILLSTREAM_LOCAL_MAX_SLOTS="3")
    settings = load_settings(env, {"daemon": {"socket": "/run/x.sock"}})
    rows = {key: (value, source) for key, value, source in describe(settings)}
    config = str(tmp_path / "config.toml")
    assert rows["daemon.max_body_mb"] == (8, config)
    assert rows["local.max_slots"] == (3, "environment $MILLSTREAM_LOCAL_MAX_SLOTS")
    assert rows["daemon.socket"] == ("/run/x.sock", "command line")
    assert rows["metadata.api_key"] == ("********", config), "the key is never printed"
    assert rows["run.max_workers"] == (16, "default")
    assert rows["datastore.root"] == (str(tmp_path / ".local/share/millstream/datastore"), "default")


def _config_show(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "millstream", *args, "config", "show"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_show_prints_key_value_and_source(tmp_path: Path) -> None:
    env = _env(tmp_path, "[daemon]\nmax_body_mb = 8\n[metadata]\napi_key = 's3cret'\n", MILLSTREAM_LOCAL_MAX_SLOTS="3")
    proc = _config_show(env, "--socket", "/run/x.sock")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["KEY", "VALUE", "SOURCE"]
    table = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    config = str(tmp_path / "config.toml")
    assert table["daemon.max_body_mb"] == ["8", config]
    assert table["local.max_slots"] == ["3", "environment", "$MILLSTREAM_LOCAL_MAX_SLOTS"]
    assert table["daemon.socket"] == ["/run/x.sock", "command", "line"]
    assert table["metadata.api_key"] == ["********", config]
    assert table["run.max_workers"] == ["16", "default"]
    assert "s3cret" not in proc.stdout
    # One row per setting, aligned in columns.
    assert len(table) == len(describe(load_settings(env)))
    assert len({line.index(line.split()[1]) for line in lines[1:] if len(line.split()) == 3}) == 1


def test_config_show_reports_a_bad_file_and_fails(tmp_path: Path) -> None:
    proc = _config_show(_env(tmp_path, "[daemon]\nmax_body_mb = 'lots'\n"))
    assert proc.returncode != 0
    assert f"{tmp_path / 'config.toml'}: daemon.max_body_mb must be int, got 'lots'" in proc.stderr
    assert proc.stdout == ""


def test_a_fractional_value_for_an_integer_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"daemon\.max_body_mb must be int, got 1\.5"):
        load_settings(_env(tmp_path, "[daemon]\nmax_body_mb = 1.5\n"))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("[daemon]\nlog_format = 'xml'\n", "daemon.log_format must be one of auto, json, console, got 'xml'"),
        ("[daemon]\nrun_tasks_as = 'root'\n", "daemon.run_tasks_as must be one of owner, daemon, got 'root'"),
        ("[daemon]\ntcp_listen = '127.0.0.1:8465'\n", "daemon.tcp_listen needs daemon.tokens_file"),
        ("[daemon]\nsocket_group = 7\n", None),
    ],
)
def test_shared_host_settings_are_checked_where_they_are_set(tmp_path: Path, config: str, expected: str | None) -> None:
    env = _env(tmp_path, config)
    if expected is None:
        # TOML integers are accepted for strings (a numeric group name is a name).
        assert load_settings(env).daemon.socket_group == "7"
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.toml'}: "), message
    assert expected in message


def test_config_show_lists_the_shared_host_settings_and_their_sources(tmp_path: Path) -> None:
    env = _env(tmp_path, "[daemon]\nsocket_group = 'team'\n", MILLSTREAM_DAEMON_ADMIN_GROUP="admins")
    proc = _config_show(env)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "team" in lines["daemon.socket_group"] and str(tmp_path / "config.toml") in lines["daemon.socket_group"]
    assert "admins" in lines["daemon.admin_group"]
    assert "environment $MILLSTREAM_DAEMON_ADMIN_GROUP" in lines["daemon.admin_group"]
    assert "owner" in lines["daemon.run_tasks_as"] and "default" in lines["daemon.run_tasks_as"]
