"""Versioned schema migrations: ``migrations/NNNN_name.sql``, applied in order on start.

Every pending file runs in ONE transaction that first takes a transaction-level
advisory lock, so two services starting at once against the same database apply each
file exactly once: the second waits on the lock, then finds nothing left to do. The
``schema_version`` table records what was applied (version, file name, sha256, time).
A database whose schema is newer than this code is refused rather than guessed at; a
file whose text changed after it was applied is logged, not re-run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
import structlog

from millstream.errors import MetadataError

# pg_advisory_xact_lock key: "mill" + "meta" in ASCII, unlikely to meet another user's key.
MIGRATION_LOCK_KEY = 0x6D696C6C_6D657461
_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

_CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

log = structlog.get_logger("millstream.metadata.service")


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        """Digest of the file's text, recorded when it is applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The packaged migration files, in version order; versions must be 1, 2, 3, ..."""
    folder = resources.files("millstream.metadata.service") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE_RE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..n without gaps: {[m.name for m in found]}")
    return found


async def migrate(con: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Bring the schema up to date; returns the versions this call applied."""
    migrations = load_migrations() if migrations is None else migrations
    applied: list[int] = []
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await con.execute(_CREATE_VERSION_TABLE)
        done = {r["version"]: r["sha256"] for r in await con.fetch("SELECT version, sha256 FROM schema_version")}
        newest_known = migrations[-1].version if migrations else 0
        if done and max(done) > newest_known:
            raise MetadataError(f"the database schema is at version {max(done)}, newer than this service "
                                f"({newest_known}); upgrade the service")
        for m in migrations:
            if m.version in done:
                if done[m.version] != m.sha256:
                    log.warning("migration_changed_after_apply", version=m.version, file=m.name)
                continue
            await con.execute(m.sql)
            await con.execute("INSERT INTO schema_version (version, name, sha256) VALUES ($1, $2, $3)",
                              m.version, m.name, m.sha256)
            applied.append(m.version)
    if applied:
        log.info("schema_migrated", applied=applied)
    return applied


async def schema_version(con: asyncpg.Connection) -> int:
    """The newest applied migration (0 for an empty database)."""
    value = await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
    return int(value)
