"""Code packages: reproducible builds, filtering, safe extraction, upload once."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from millstream.datastore import layout
from millstream.datastore.package import (
    build_package,
    extract_package,
    fetch_package,
    package_files,
    store_package,
)
from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def flow_dir(tmp_path: Path) -> Path:
    """A flow directory with code, config, data and the usual clutter."""
    root = tmp_path / "flow"
    _write(root, {
        "flow.py": "print('flow')\n",
        "lib/__init__.py": "",
        "lib/helpers.py": "X = 1\n",
        "conf/settings.yaml": "a: 1\n",
        "requirements.txt": "numpy\n",
        "queries/q.sql": "select 1;\n",
        "data/big.csv": "1,2,3\n",
        "README.md": "# docs\n",
        "lib/__pycache__/helpers.cpython-311.pyc": "junk",
        ".git/config": "[core]\n",
        ".git/hooks/x.py": "",
        ".hidden.py": "",
        "node_modules/pkg/index.py": "",
        "venv/lib/site.py": "",
        "myenv/pyvenv.cfg": "home = /usr\n",
        "myenv/lib/mod.py": "",
        "proj.egg-info/top_level.txt": "proj\n",
    })
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o775)
    return root


def test_only_code_files_are_included(flow_dir: Path) -> None:
    names = [name for name, _ in package_files(flow_dir)]
    assert names == ["conf/settings.yaml", "flow.py", "lib/__init__.py", "lib/helpers.py",
                     "queries/q.sql", "requirements.txt", "run.sh"]


def test_extra_suffixes_can_be_asked_for(flow_dir: Path) -> None:
    names = [name for name, _ in package_files(flow_dir, suffixes=(".py", ".csv"))]
    assert names == ["data/big.csv", "flow.py", "lib/__init__.py", "lib/helpers.py"]


def test_build_is_reproducible(flow_dir: Path) -> None:
    sha, data = build_package(flow_dir)
    assert sha == hashlib.sha256(data).hexdigest()
    for path in flow_dir.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    assert build_package(flow_dir) == (sha, data)


def test_a_copy_elsewhere_builds_the_same_bytes(flow_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "other-name"
    for name, path in package_files(flow_dir):
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        target.chmod(path.stat().st_mode)
    assert build_package(copy) == build_package(flow_dir)


def test_content_changes_change_the_package(flow_dir: Path) -> None:
    sha, _ = build_package(flow_dir)
    (flow_dir / "lib" / "helpers.py").write_text("X = 2\n")
    changed, _ = build_package(flow_dir)
    assert changed != sha
    (flow_dir / "lib" / "helpers.py").write_text("X = 1\n")
    (flow_dir / "flow.py").chmod(0o755)
    assert build_package(flow_dir)[0] not in (sha, changed)


def test_ignored_files_do_not_change_the_package(flow_dir: Path) -> None:
    sha, _ = build_package(flow_dir)
    _write(flow_dir, {"lib/__pycache__/new.pyc": "x", ".git/HEAD": "ref", "data/more.csv": ""})
    assert build_package(flow_dir)[0] == sha


def test_archive_metadata_is_normalised(flow_dir: Path) -> None:
    _, data = build_package(flow_dir)
    assert data[:2] == b"\x1f\x8b"
    assert data[3] & 0x08 == 0  # FNAME flag: no file name in the gzip header
    assert data[4:8] == b"\0\0\0\0"  # gzip mtime
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0, 0, 0, "", "")
        assert member.isreg()
        assert member.mode == (0o755 if member.name == "run.sh" else 0o644)


def test_oversize_tree_is_refused_with_the_largest_files(flow_dir: Path) -> None:
    (flow_dir / "huge.json").write_text("0" * 5000)
    with pytest.raises(DatastoreError, match=r"over the .* limit; largest files: huge\.json"):
        build_package(flow_dir, max_bytes=4096)


def test_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatastoreError, match="not a directory"):
        build_package(tmp_path / "missing")


def test_extract_round_trips(flow_dir: Path, tmp_path: Path) -> None:
    _, data = build_package(flow_dir)
    dest = tmp_path / "out"
    written = extract_package(data, dest)
    assert written == [name for name, _ in package_files(flow_dir)]
    for name, path in package_files(flow_dir):
        assert (dest / name).read_bytes() == path.read_bytes()
    assert os.access(dest / "run.sh", os.X_OK)
    assert (dest / "flow.py").stat().st_mode & 0o777 == 0o644


def _crafted(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            info.size = len(content) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(("member", "message"), [
    (_member("../evil.py"), "escapes"),
    (_member("lib/../../evil.py"), "escapes"),
    (_member("/etc/evil.py"), "absolute"),
    (_member("link.py", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (_member("hard.py", tarfile.LNKTYPE, "ok.py"), "link"),
    (_member("dev", tarfile.CHRTYPE), "device"),
    (_member("pipe", tarfile.FIFOTYPE), "device"),
])
def test_extract_refuses_unsafe_members(tmp_path: Path, member: tarfile.TarInfo,
                                        message: str) -> None:
    data = _crafted((_member("ok.py"), b"fine"), (member, b"evil"))
    dest = tmp_path / "dest"
    with pytest.raises(DatastoreError, match=message) as caught:
        extract_package(data, dest)
    assert repr(member.name) in str(caught.value)
    # Every header is checked before anything is written.
    assert not dest.exists() or list(dest.iterdir()) == []
    assert not (tmp_path / "evil.py").exists()


def test_extract_refuses_duplicates_and_oversize(tmp_path: Path) -> None:
    twice = _crafted((_member("a.py"), b"1"), (_member("a.py"), b"2"))
    with pytest.raises(DatastoreError, match="twice"):
        extract_package(twice, tmp_path / "d1")
    big = _crafted((_member("a.py"), b"1" * 600), (_member("b.py"), b"2" * 600))
    with pytest.raises(DatastoreError, match=r"'b\.py'"):
        extract_package(big, tmp_path / "d2", max_bytes=1000)


def test_extract_reports_a_file_used_as_a_folder(tmp_path: Path) -> None:
    clash = _crafted((_member("a"), b"file"), (_member("a/b.py"), b"x"))
    with pytest.raises(DatastoreError, match="cannot extract"):
        extract_package(clash, tmp_path / "dest")


def test_extract_refuses_a_symlink_already_in_dest(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "lib").symlink_to(outside)
    with pytest.raises(DatastoreError, match="escapes"):
        extract_package(_crafted((_member("lib/x.py"), b"x")), dest)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("data", [b"", b"not a tarball", gzip.compress(b"not a tar" * 100)])
def test_extract_refuses_garbage(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(DatastoreError, match="not a valid code package"):
        extract_package(data, tmp_path / "dest")


async def test_store_once_and_fetch(store: ObjectStore, flow_dir: Path) -> None:
    sha, data = build_package(flow_dir)
    assert await store_package(store, sha, data)
    assert not await store_package(store, sha, data)
    assert await store.list("packages/") == [layout.package_key(sha)]
    assert await fetch_package(store, sha) == data


async def test_store_and_fetch_verify_the_hash(store: ObjectStore, flow_dir: Path) -> None:
    sha, data = build_package(flow_dir)
    with pytest.raises(DatastoreError, match="hashes to"):
        await store_package(store, "0" * 64, data)
    await store.put(layout.package_key(sha), data + b"tampered")
    with pytest.raises(DatastoreError, match="hashes to"):
        await fetch_package(store, sha)
