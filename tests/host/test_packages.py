"""Hostile code packages: refused by the extractor, by the daemon's upload, and by a
run that uses one (the run fails with a clear message; other runs go on).

The per-member rules themselves are unit-tested in ``tests/datastore/test_package.py``;
these are the cases it lacks (encodings of the same attacks, bombs) and the daemon's side.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from millstream.datastore.package import build_package, extract_package
from millstream.errors import DatastoreError
from tests.conftest import EXAMPLES, Daemon, wait_until
from tests.e2e.helpers import run_flow
from tests.e2e.test_api_input import _submission

MIB = 1 << 20


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    return info


def tar_gz(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar.gz of the members as given (tarfile writes what it is told)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=fmt) as tar:
        for info, content in members:
            if info.isreg():
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buffer.getvalue()


@functools.cache
def zeros_member_bomb(size: int) -> bytes:
    """One regular member of ``size`` zero bytes, streamed through zlib: ~1000:1."""
    header = _member("data.py", size=size).tobuf(format=tarfile.USTAR_FORMAT)
    gz = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [gz.compress(header)]
    chunk = bytes(MIB)
    for _ in range(size // MIB):
        parts.append(gz.compress(chunk))
    parts.append(gz.compress(bytes(1024)))  # end-of-archive blocks
    parts.append(gz.flush())
    return b"".join(parts)


@functools.cache
def pax_header_bomb(size: int) -> bytes:
    """A pax extended header whose payload is ``size`` zero bytes: read whole by tarfile."""
    header = _member("././@PaxHeader", kind=tarfile.XHDTYPE, size=size).tobuf(format=tarfile.USTAR_FORMAT)
    gz = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [gz.compress(header)]
    chunk = bytes(MIB)
    for _ in range(size // MIB):
        parts.append(gz.compress(chunk))
    parts.append(gz.flush())
    return b"".join(parts)


def _pax_path(real: str) -> tarfile.TarInfo:
    """A member whose ustar name is harmless and whose pax ``path`` record is not."""
    info = _member("harmless.py")
    info.pax_headers = {"path": real}
    return info


ATTACKS: dict[str, tuple[tuple[tarfile.TarInfo, bytes], str, int]] = {
    "dot-slash-dotdot": ((_member("./../evil.py"), b"x"), "escapes", tarfile.PAX_FORMAT),
    "dotdot directory": ((_member("..", tarfile.DIRTYPE), b""), "escapes", tarfile.PAX_FORMAT),
    "deep dotdot": ((_member("a/b/../../../evil.py"), b"x"), "escapes", tarfile.PAX_FORMAT),
    "double-slash absolute": ((_member("//etc/evil.py"), b"x"), "absolute", tarfile.PAX_FORMAT),
    "pax path record": ((_pax_path("../../evil.py"), b"x"), "escapes", tarfile.PAX_FORMAT),
    "gnu long name": ((_member("a/" * 60 + "../" * 70 + "evil.py"), b"x"), "escapes", tarfile.GNU_FORMAT),
    "symlinked directory": ((_member("lib", tarfile.SYMTYPE, "/"), b""), "link", tarfile.PAX_FORMAT),
    "relative symlink out": ((_member("up.py", tarfile.SYMTYPE, "../../etc/passwd"), b""), "link", tarfile.PAX_FORMAT),
    "hardlink out": ((_member("h.py", tarfile.LNKTYPE, "../../../etc/passwd"), b""), "link", tarfile.PAX_FORMAT),
    "block device": ((_member("sda", tarfile.BLKTYPE), b""), "device", tarfile.PAX_FORMAT),
}


@pytest.mark.parametrize("case", list(ATTACKS))
def test_extract_refuses(tmp_path: Path, case: str) -> None:
    member, message, fmt = ATTACKS[case]
    data = tar_gz((_member("ok.py"), b"fine"), member, fmt=fmt)
    dest = tmp_path / "a" / "b" / "dest"
    dest.parent.mkdir(parents=True)  # where ../ would land
    with pytest.raises(DatastoreError, match=message):
        extract_package(data, dest)
    assert not dest.exists() or list(dest.iterdir()) == [], "nothing is written before every header is checked"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"], "nothing lands outside"


def test_an_oversize_member_is_refused_at_its_header(tmp_path: Path) -> None:
    """100 MiB of zeros (100 KiB of gzip) is refused by its header's size, naming it."""
    data = zeros_member_bomb(100 * MIB)
    assert len(data) < 200 * 1024
    with pytest.raises(DatastoreError, match=r"exceeds 50\.0 MiB at member 'data\.py'"):
        extract_package(data, tmp_path / "dest")
    assert not (tmp_path / "dest" / "data.py").exists()


def test_a_sparse_member_of_a_terabyte_is_refused(tmp_path: Path) -> None:
    """A GNU sparse header can claim a huge file of holes in 512 bytes; its real size counts."""
    header = bytearray(_member("sparse.py", kind=tarfile.GNUTYPE_SPARSE).tobuf(format=tarfile.GNU_FORMAT))
    header[483:495] = b"%011o\0" % (1 << 40)  # the GNU header's realsize field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    with pytest.raises(DatastoreError, match=r"exceeds 50\.0 MiB at member 'sparse\.py'"):
        extract_package(zlib_gzip(bytes(header) + bytes(1024)), tmp_path / "dest")


def test_a_header_declaring_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    info = _member("short.py", size=10 * MIB)
    raw = info.tobuf(format=tarfile.USTAR_FORMAT) + b"only this"
    with pytest.raises(DatastoreError, match="not a valid code package"):
        extract_package(zlib_gzip(raw), tmp_path / "dest")


def zlib_gzip(raw: bytes) -> bytes:
    """gzip without tarfile's help."""
    gz = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return gz.compress(raw) + gz.flush()


def test_a_pax_header_bomb_is_refused_cheaply(tmp_path: Path) -> None:
    # With a 1 MiB limit on files, 80 MiB of inflated headers is well past any package.
    data = pax_header_bomb(80 * MIB)
    assert len(data) < 100 * 1024
    with pytest.raises(DatastoreError, match="inflates to more than"):
        extract_package(data, tmp_path / "dest", max_bytes=MIB)


# --------------------------------------------------------------------- through the daemon
def _put(d: Daemon, data: bytes) -> tuple[int, Any, str]:
    sha = hashlib.sha256(data).hexdigest()
    status, body = d.request("PUT", f"/v1/packages/{sha}", raw=data, headers={"Content-Type": "application/gzip"})
    return status, body, sha


def test_the_daemon_refuses_a_bomb_at_upload(daemon: Daemon) -> None:
    for bomb in (zeros_member_bomb(200 * MIB), pax_header_bomb(300 * MIB)):
        status, body, sha = _put(daemon, bomb)
        assert status == 413, body
        assert body["error"] == "too_large" and "inflates to more than" in body["message"]
        assert daemon.request("HEAD", f"/v1/packages/{sha}")[0] == 404
    # A real package of the same daemon still goes in.
    _, data = build_package(EXAMPLES)
    assert _put(daemon, data)[0] == 201


def test_peak_memory_of_the_upload_check_stays_small(daemon: Daemon) -> None:
    """The daemon inflates a bomb in bounded chunks: its RSS does not follow the bomb's size."""
    pid = daemon.request("GET", "/v1/health")[1]["pid"]
    status, _, _ = _put(daemon, pax_header_bomb(300 * MIB))
    assert status == 413
    hwm_kib = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmHWM")
    )
    assert hwm_kib < 250 * 1024, f"daemon peak RSS {hwm_kib} KiB"


@pytest.mark.parametrize("case", ["dot-slash-dotdot", "pax path record", "hardlink out", "block device"])
def test_a_run_on_a_hostile_package_fails_clearly_and_others_go_on(daemon: Daemon, case: str) -> None:
    member, message, fmt = ATTACKS[case]
    hello = (EXAMPLES / "hello.py").read_bytes()
    status, body, sha = _put(daemon, tar_gz((_member("hello.py"), hello), member, fmt=fmt))
    assert status == 201, body  # uploads are content only; members are checked where unpacked
    status, body = daemon.request("POST", "/v1/runs", _submission(package=sha))
    assert status == 201, body
    run_id = body["run_id"]
    state = wait_until(lambda: (s := daemon.run_state("HelloFlow", run_id))["status"] == "failed" and s, 30)
    assert state["message"].startswith("cannot unpack the code package: ")
    assert message in state["message"]
    assert all(not t["attempts"] for t in state["tasks"]), "no task ran from the hostile package"
    assert not (daemon.root / "evil.py").exists() and not (daemon.root / "state" / "evil.py").exists()

    good_id, proc = run_flow(daemon, EXAMPLES / "hello.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert daemon.run_state("HelloFlow", good_id)["status"] == "ok"
