"""Versioned schema migrations: numbered SQL files beside this module, applied in order,
each recorded in schema_migrations. All of them run in one transaction under an
advisory lock, so running twice is a no-op and two replicas starting together apply
each migration once. The role that migrates owns the tables; the service's own role
gets only row privileges (`grant`), so it cannot drop, alter or truncate them."""

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


Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def latest() -> int:
    return len(available())


async def current_version(conn: Connection) -> int:
    """The newest version applied; 0 on a database never migrated. Needs only SELECT."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def migrate(conn: Connection, *, to: int | None = None, grant_to: str | None = None) -> list[int]:
    """Applies the migrations the database lacks, up to version `to` (default: all), and
    grants `grant_to` in the same transaction: a server that sees the new version can use
    the new tables. Returns the versions applied. A schema already up to date is left
    alone without any DDL, so a role that may not create tables can run this at start."""
    target = latest() if to is None else to
    if grant_to is None and await current_version(conn) >= target:
        return []
    async with conn.transaction():
        # Also around a grant alone: two roles' GRANTs on one table at once can fail with
        # "tuple concurrently updated".
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for m in available()[:target]:
            if m.version in done:
                continue
            await conn.execute(m.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name)
            applied.append(m.version)
        if grant_to is not None:
            await grant(conn, grant_to)
    log.info("migrations applied", extra={"applied": applied, "already": sorted(done)})
    return applied


async def grant(conn: Connection, role: str) -> None:
    """Row privileges on every table to `role`, the service's runtime role; read-only on
    the migration history. Ownership, and with it DROP, ALTER and TRUNCATE, stays with
    the migrating role, which is never its own grantee (it would revoke its own right to
    record migrations)."""
    if role == await conn.fetchval("SELECT current_user"):
        return
    name = await conn.fetchval("SELECT quote_ident($1)", role)
    async with conn.transaction():
        # Before PostgreSQL 15 every role may create objects in `public`; not this one.
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {name}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {name}")
        await conn.execute(f"REVOKE INSERT, UPDATE, DELETE ON schema_migrations FROM {name}")
        await conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {name}")
        # The audit trail is append-only to the service (migration 0007).
        if await conn.fetchval("SELECT to_regclass('invoice_audit') IS NOT NULL"):
            await conn.execute(f"REVOKE UPDATE, DELETE ON invoice_audit FROM {name}")
    log.info("granted row privileges", extra={"role": role})
