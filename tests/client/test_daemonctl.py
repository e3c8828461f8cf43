"""Finding the daemon: stale sockets, the environment a started daemon gets, an answering one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from millstream.client.daemonctl import (
    DaemonControlError,
    daemon_env,
    daemon_status,
    ensure_daemon,
    remove_stale_socket,
)
from millstream.config.settings import Settings, load_settings
from tests.client.conftest import CannedServer

HEALTH = b'{"status": "ok", "version": "0.1.0", "pid": 4242, "active_runs": 1}'


def settings_for(socket_path: str | Path, tmp: Path) -> Settings:
    env = {"HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp / "cfg"), "XDG_DATA_HOME": str(tmp / "data")}
    return load_settings(env, {"daemon": {"socket": str(socket_path)}})


def test_command_line_settings_reach_the_daemon_as_environment(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "KEEP": "1",
           "PYTHONPATH": "/elsewhere"}
    settings = load_settings(env, {"daemon": {"socket": "/tmp/x.sock"}, "datastore": {"durable": False}})
    child = daemon_env(settings, env)
    assert child["KEEP"] == "1"
    assert child["MILLSTREAM_DAEMON_SOCKET"] == "/tmp/x.sock"
    assert child["MILLSTREAM_DATASTORE_DURABLE"] == "false"
    assert "MILLSTREAM_DAEMON_STATE_DIR" not in child  # a default: the daemon derives it itself
    first, rest = child["PYTHONPATH"].split(":", 1)
    assert (Path(first) / "millstream" / "__init__.py").is_file() and rest == "/elsewhere"
    assert load_settings(child).daemon.socket == "/tmp/x.sock"


def test_a_refusing_socket_file_is_removed(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nothing listens
    assert remove_stale_socket(path) is True
    assert not path.exists()
    assert remove_stale_socket(path) is False


def test_a_listening_socket_is_kept(short_dir: Path) -> None:
    path = short_dir / "live.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    try:
        assert remove_stale_socket(path) is False
        assert path.exists()
    finally:
        sock.close()


def test_a_regular_file_in_the_way_is_an_error(short_dir: Path) -> None:
    path = short_dir / "file.sock"
    path.write_text("not a socket")
    with pytest.raises(DaemonControlError, match="is not a socket"):
        remove_stale_socket(path)


def test_an_answering_daemon_is_used_as_it_is(server: CannedServer, tmp_path: Path) -> None:
    server.add_json("GET", "/v1/health", 200, HEALTH)
    settings = settings_for(server.socket_path, tmp_path)
    client = ensure_daemon(settings, {})
    assert client.socket_path == server.socket_path
    assert [r["path"] for r in server.requests] == ["/v1/health"]
    status = daemon_status(settings)
    assert status is not None
    assert (status["pid"], status["socket"]) == (4242, server.socket_path)
    assert status["log"].endswith("daemon/daemon.log")


def test_no_daemon_no_status(short_dir: Path, tmp_path: Path) -> None:
    assert daemon_status(settings_for(short_dir / "none.sock", tmp_path)) is None
