"""The unit files: systemd's own tools accept them, and they say what the host needs.

``systemd-analyze verify`` (Debian package ``systemd``) must be present in CI; a
developer machine without it skips these tests.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

UNITS = REPO / "systemd"
SHIPPED_EXEC = "/opt/millstream/venv/bin/python"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI: apt-get install -y systemd")
        pytest.skip(f"{name} is not installed (apt-get install systemd)")
    return path


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    verify = _tool("systemd-analyze")
    # verify checks that ExecStart exists: point the copy at this interpreter.
    service = (UNITS / "millstream.service").read_text()
    assert SHIPPED_EXEC in service
    (tmp_path / "millstream.service").write_text(service.replace(SHIPPED_EXEC, sys.executable))
    shutil.copy(UNITS / "millstream.socket", tmp_path / "millstream.socket")
    proc = subprocess.run(
        [verify, "verify", "--man=no", str(tmp_path / "millstream.service"), str(tmp_path / "millstream.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Warnings (unknown keys, bad values) are printed without failing: refuse them too.
    assert proc.stderr.strip() == "", proc.stderr


def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    tmpfiles = _tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    proc = subprocess.run(
        [sysusers, f"--root={root}", str(UNITS / "millstream.sysusers")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["millstream"][5] == "/var/lib/millstream"
    assert passwd["millstream"][6].endswith("nologin")
    uid = int(passwd["millstream"][2])
    proc = subprocess.run(
        [tmpfiles, f"--root={root}", "--create", str(UNITS / "millstream.tmpfiles")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = (root / "run/millstream").stat()
    state_dir = (root / "var/lib/millstream").stat()
    assert (run_dir.st_uid, run_dir.st_mode & 0o777) == (uid, 0o755)
    assert (state_dir.st_uid, state_dir.st_mode & 0o777) == (uid, 0o750)
    # Tasks of every member write these: set-group-id, group-writable, made before the
    # unit starts (its RestrictSUIDSGID=yes forbids the daemon to set the bit).
    for shared in ("datastore", "daemon/logs", "daemon/spool", "daemon/packages"):
        st = (root / "var/lib/millstream" / shared).stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (uid, 0o2770), shared


def test_the_service_keeps_tasks_alive_and_waits_for_readiness() -> None:
    service = _unit("millstream.service")["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["KillMode"] == "process"  # `systemctl restart` must not kill running tasks
    assert service["PrivateTmp"] == "no"  # a private /tmp is deleted under surviving tasks
    assert (service["User"], service["Group"]) == ("millstream", "millstream")
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/millstream" in service["ReadWritePaths"].split()
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["RuntimeDirectoryPreserve"] == "yes"  # else a stop deletes the socket
    # Tasks run as their owners: the daemon keeps the switch and the kill, nothing else.
    caps = {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
    assert set(service["AmbientCapabilities"].split()) == caps
    assert set(service["CapabilityBoundingSet"].split()) == caps
    assert service["NoNewPrivileges"] == "yes"  # sudo-style switching stays impossible
    assert service["ProtectProc"] == "default"  # the daemon must see its tasks of other uids
    assert service["UMask"] == "0007"
    assert service["RestrictSUIDSGID"] == "yes"


def test_the_socket_is_the_one_the_shared_config_names() -> None:
    import tomllib

    socket_unit = _unit("millstream.socket")["Socket"]
    assert socket_unit["ListenStream"] == "/run/millstream/daemon.sock"
    assert (socket_unit["SocketMode"], socket_unit["SocketGroup"]) == ("0660", "millstream")
    config = tomllib.loads((UNITS / "config.toml").read_text())
    assert config["daemon"]["socket"] == socket_unit["ListenStream"]


def test_the_shipped_config_loads(tmp_path: Path) -> None:
    from millstream.config.settings import load_settings

    settings = load_settings({"HOME": str(tmp_path), "MILLSTREAM_CONFIG": str(UNITS / "config.toml")})
    assert settings.daemon.socket == "/run/millstream/daemon.sock"
    assert settings.datastore.root.startswith("/var/lib/millstream/")
    assert (settings.daemon.socket_group, settings.daemon.run_tasks_as) == ("millstream", "owner")


def test_the_unit_environment_puts_defaults_in_the_unit_directories(tmp_path: Path) -> None:
    """Without any config file the daemon's defaults land in StateDirectory and RuntimeDirectory."""
    from millstream.config.settings import load_settings

    line = _unit("millstream.service")["Service"]["Environment"]
    env = dict(item.split("=", 1) for item in line.split())
    env["MILLSTREAM_CONFIG"] = str(tmp_path / "none.toml")
    settings = load_settings(env)
    assert settings.daemon.socket == "/run/millstream/daemon.sock"
    assert settings.daemon.state_dir.startswith("/var/lib/millstream/")
    assert settings.datastore.root.startswith("/var/lib/millstream/")
