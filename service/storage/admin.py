"""Database administration, apart from the invoice store: the DSN of another database or
role, the embedded Postgres's login role, migrations with the service role's grants, and
fresh databases for the benchmark, chaos runs and tests. The service's calls never come
here; only start-up (migrate) and the tools that own their databases do."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from service.storage import migrations


def with_database(dsn: str, name: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def with_user(dsn: str, user: str) -> str:
    """The same server and database, another role (no password: local trust auth only)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def user_of(dsn: str) -> str | None:
    user = urlsplit(dsn).username
    return unquote(user) if user else None


async def ensure_login_role(admin_dsn: str, role: str) -> None:
    """Creates `role` (login, no other attribute) if it does not exist: for the embedded
    Postgres, where this process is the DBA. Elsewhere the DBA creates the role."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            name = await admin.fetchval("SELECT quote_ident($1)", role)
            await admin.execute(f"CREATE ROLE {name} LOGIN")
    except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        pass  # another process created it meanwhile
    finally:
        await admin.close()


async def migrate_database(dsn: str, *, grant_to: str | None = None, to: int | None = None) -> list[int]:
    """Brings the schema up to date (or to version `to`) as the role of `dsn` (its owner)
    and, when the service runs as another role, grants that role row privileges."""
    conn = await asyncpg.connect(dsn)
    try:
        role = grant_to if grant_to != user_of(dsn) else None
        applied = await migrations.migrate(conn, to=to, grant_to=role)
    finally:
        await conn.close()
    return applied


async def fresh_database(admin_dsn: str, name: str, *, migrate: bool = True, grant_to: str | None = None) -> str:
    """Drops and recreates database `name` (a plain identifier), migrates it unless told
    not to, and returns its DSN: for the benchmark, the chaos runs and the tests, which
    own their databases."""
    if not name.isidentifier():
        raise ValueError(f"not a database name: {name!r}")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, name)
    if migrate:
        await migrate_database(dsn, grant_to=grant_to)
    return dsn
