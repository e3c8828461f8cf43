"""Code packages: a reproducible tar.gz of a flow's source, named by its sha256.

:func:`build_package` walks the flow's directory and keeps files whose suffix is in
:data:`DEFAULT_SUFFIXES`: Python source plus the small text formats code usually reads
at import time (configs, SQL, requirement lists, shell helpers). Data formats such as
``.csv`` or ``.parquet`` are left out on purpose: they grow without bound and belong in
artifacts or the object store; pass ``suffixes=`` to include more. Hidden files and
folders, ``__pycache__``, ``node_modules``, ``venv`` and any virtualenv (a folder with a
``pyvenv.cfg``), and ``*.egg-info`` are skipped. Symlinked files are stored as regular
files with their target's content; symlinked folders are not followed.

The archive is byte-for-byte reproducible for a given tree and zlib: entries are
sorted, with mtime 0, uid/gid 0, empty owner names and modes normalised to 0o644 or
0o755, and the gzip header has mtime 0 and no file name. So the same code always gets
the same name and is uploaded once.

:func:`extract_package` trusts nothing in the archive: absolute paths, ``..``, links,
devices, duplicates and oversize content are refused, naming the offending member,
before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from millstream.datastore import layout
from millstream.datastore.storage import ObjectStore
from millstream.errors import DatastoreError

DEFAULT_SUFFIXES: tuple[str, ...] = (
    ".py", ".pyi", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".txt", ".sql",
    ".sh",
)
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", "site-packages"})
DEFAULT_MAX_BYTES = 50 << 20
MAX_MEMBERS = 100_000
GZIP_LEVEL = 9

_MIB = 1 << 20
_COPY_CHUNK_BYTES = 1 << 20


def package_files(flow_dir: Path, *, suffixes: Iterable[str] = DEFAULT_SUFFIXES
                  ) -> list[tuple[str, Path]]:
    """Return ``(archive name, path)`` for every file a package of ``flow_dir`` holds, sorted."""
    root = Path(flow_dir)
    if not root.is_dir():
        raise DatastoreError(f"cannot package {root}: not a directory")
    wanted = tuple(s.lower() for s in suffixes)
    found: list[tuple[str, Path]] = []
    for directory, dirnames, filenames in os.walk(root):
        # Pruning dirnames in place is how os.walk is told not to descend.
        dirnames[:] = [d for d in dirnames if not _skip_dir(os.path.join(directory, d), d)]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(wanted):
                continue
            path = Path(directory, name)
            if not path.is_file():
                continue  # a dangling symlink, a socket, a fifo
            found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def build_package(flow_dir: Path, *, suffixes: Iterable[str] = DEFAULT_SUFFIXES,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[str, bytes]:
    """Build the code package of ``flow_dir`` and return ``(sha256 hex, tar.gz bytes)``."""
    files = package_files(flow_dir, suffixes=suffixes)
    sizes = [(name, _size_or_zero(path)) for name, path in files]
    _check_total(flow_dir, sizes, max_bytes)

    buffer = io.BytesIO()
    total = 0
    # filename="" and mtime=0 keep the gzip header free of anything that varies.
    with (gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0,
                        compresslevel=GZIP_LEVEL) as gz,
          tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar):
        for name, path in files:
            try:
                with open(path, "rb") as source:
                    st = os.fstat(source.fileno())
                    total += st.st_size
                    if total > max_bytes:
                        _check_total(flow_dir, sizes, max_bytes, grown=total)
                    tar.addfile(_tar_info(name, st), source)
            except FileNotFoundError:
                continue  # deleted since the walk, so no longer part of the tree
            except OSError as exc:
                # Typically a file shrinking while it is archived.
                raise DatastoreError(f"cannot package {path}: {exc}") from exc
    data = buffer.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def extract_package(data: bytes, dest: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
                    ) -> list[str]:
    """Safely unpack a code package into ``dest`` and return the names written."""
    # tarfile reads a pax header whole into memory: bound the inflated stream first.
    if not gunzipped_size_within(data, max_bytes + TAR_OVERHEAD_BYTES):
        raise DatastoreError(f"not a valid code package: it inflates to more than "
                             f"{(max_bytes + TAR_OVERHEAD_BYTES) >> 20} MiB (a decompression bomb?)")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = _checked_members(tar, max_bytes)
            return _write_members(tar, members, Path(dest))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatastoreError(f"not a valid code package: {exc}") from exc
    except OSError as exc:
        raise DatastoreError(f"cannot extract code package into {dest}: {exc}") from exc


# A code package's tar stream is its files plus headers and padding (at most this much
# more); anything that inflates further is a decompression bomb.
TAR_OVERHEAD_BYTES = 64 << 20
MAX_UNPACKED_PACKAGE_BYTES = DEFAULT_MAX_BYTES + TAR_OVERHEAD_BYTES


def gunzipped_size_within(data: bytes, limit: int) -> bool:
    """Whether ``data`` (gzip, possibly several members) inflates to at most ``limit`` bytes.

    Streams in bounded chunks and stops at the limit, so a bomb costs ``limit`` bytes of
    inflation and no memory. Data that is not gzip counts as within: unpacking reports it.
    """
    total = 0
    rest = data
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pending = rest
        try:
            while pending:
                total += len(inflater.decompress(pending, 1 << 20))
                if total > limit:
                    return False
                pending = inflater.unconsumed_tail
            total += len(inflater.flush())
        except zlib.error:
            return True
        if total > limit:
            return False
        if not inflater.eof:
            return True
        rest = inflater.unused_data
    return True


async def store_package(store: ObjectStore, sha: str, data: bytes) -> bool:
    """Upload a package unless one with this hash is stored; True if this call stored it."""
    _verify(sha, data)
    key = layout.package_key(sha)
    # Checking first saves re-uploading tens of MiB that put_if_absent would then refuse.
    if await store.exists(key):
        return False
    return await store.put_if_absent(key, data)


async def fetch_package(store: ObjectStore, sha: str) -> bytes:
    """Download the package named ``sha`` and check that its bytes match the name."""
    data = await store.get(layout.package_key(sha))
    _verify(sha, data)
    return data


def _skip_dir(path: str, name: str) -> bool:
    return (name.startswith(".") or name in SKIP_DIRS or name.endswith(".egg-info")
            or os.path.exists(os.path.join(path, "pyvenv.cfg")))


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _check_total(flow_dir: Path, sizes: list[tuple[str, int]], max_bytes: int,
                 grown: int | None = None) -> None:
    total = grown if grown is not None else sum(size for _, size in sizes)
    if total <= max_bytes:
        return
    largest = sorted(sizes, key=lambda item: (-item[1], item[0]))[:5]
    listing = ", ".join(f"{name} ({size / _MIB:.1f} MiB)" for name, size in largest)
    raise DatastoreError(
        f"code package of {flow_dir} would hold {total / _MIB:.1f} MiB, over the "
        f"{max_bytes / _MIB:.1f} MiB limit; largest files: {listing}. Move data files "
        "out of the flow directory or pass a narrower suffixes=")


def _tar_info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = st.st_size
    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _checked_members(tar: tarfile.TarFile, max_bytes: int) -> list[tarfile.TarInfo]:
    """Read every header and refuse the archive if any member is unsafe."""
    members: list[tarfile.TarInfo] = []
    seen: set[tuple[str, ...]] = set()
    total = 0
    for member in tar:
        if len(members) >= MAX_MEMBERS:
            raise DatastoreError(f"code package has more than {MAX_MEMBERS} members")
        parts = _safe_parts(member.name)
        if member.issym() or member.islnk():
            raise DatastoreError(f"code package member {member.name!r} is a link")
        if not (member.isreg() or member.isdir()):
            raise DatastoreError(
                f"code package member {member.name!r} is a device, fifo or special file")
        if parts in seen:
            raise DatastoreError(f"code package member {member.name!r} appears twice")
        seen.add(parts)
        total += member.size
        if total > max_bytes:
            raise DatastoreError(
                f"code package exceeds {max_bytes / _MIB:.1f} MiB at member {member.name!r}")
        members.append(member)
    return members


def _safe_parts(name: str) -> tuple[str, ...]:
    if not name or "\x00" in name:
        raise DatastoreError(f"code package member {name!r} has an empty or NUL name")
    if name.startswith("/"):
        raise DatastoreError(f"code package member {name!r} has an absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise DatastoreError(f"code package member {name!r} escapes with '..'")
    if not parts:
        raise DatastoreError(f"code package member {name!r} has an empty path")
    return parts


def _write_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path
                   ) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    written: list[str] = []
    for member in members:
        target = os.path.join(root, *PurePosixPath(member.name).parts)
        if member.isdir():
            os.makedirs(target, exist_ok=True)
            continue
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        # A symlink already inside dest could still redirect the write elsewhere.
        if os.path.commonpath([root, os.path.realpath(parent)]) != root:
            raise DatastoreError(f"code package member {member.name!r} escapes {dest}")
        source = tar.extractfile(member)
        if source is None:
            raise DatastoreError(f"code package member {member.name!r} has no content")
        mode = 0o755 if member.mode & 0o111 else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with source, open(os.open(target, flags, mode), "wb") as out:
            shutil.copyfileobj(source, out, _COPY_CHUNK_BYTES)
            # The umask trims the mode given to open; an existing file keeps its old one.
            os.fchmod(out.fileno(), mode)
        written.append(member.name)
    return written


def _verify(sha: str, data: bytes) -> None:
    layout.check_sha(sha)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha:
        raise DatastoreError(f"code package hashes to {actual}, not {sha}")

