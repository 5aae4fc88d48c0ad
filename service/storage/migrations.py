"""Versioned schema migrations: numbered SQL files beside this module, applied in order,
each recorded in schema_migrations. All of them run in one transaction under an
advisory lock, so running twice is a no-op and two replicas starting together apply
each migration once."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent / "migrations"
FILE_NAME = re.compile(r"(\d{4})_(\w+)\.sql")
# Any constant shared by all replicas; pg_advisory_xact_lock releases it at commit.
LOCK_KEY = 0x1A7015E


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    found = []
    for path in sorted(FOLDER.glob("*.sql")):
        match = FILE_NAME.fullmatch(path.name)
        if not match:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..n without gaps, found {versions}")
    return found


async def migrate(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> list[int]:
    """Applies the migrations the database lacks; returns the versions applied."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for m in available():
            if m.version in done:
                continue
            await conn.execute(m.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name)
            applied.append(m.version)
    log.info("migrations applied", extra={"applied": applied, "already": sorted(done)})
    return applied
