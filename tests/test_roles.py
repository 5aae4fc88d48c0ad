"""Two database roles: the schema owner migrates, the service's role may only read and
write rows, so a bug or an injected statement in the service cannot drop, alter or
truncate a table. And readiness: a server whose schema is not migrated yet says
NOT_SERVING and refuses calls with UNAVAILABLE, then serves once migrations ran."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import storage
from service.app import SERVICE_ROLE
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.storage import migrations
from tests.helpers import AUTH, Stack, stack_env, wait_until
from tools.stack import ROOT, start_service

DENIED = asyncpg.InsufficientPrivilegeError


@pytest.fixture
async def as_service(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(storage.with_user(database, SERVICE_ROLE))
    yield conn
    await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE invoices",
        "TRUNCATE invoices",
        "ALTER TABLE invoices ADD COLUMN x int",
        "CREATE TABLE intruder (x int)",
        "DELETE FROM schema_migrations",
        "DROP TRIGGER invoices_count_insert ON invoices",
        "DROP TABLE invoice_counts",
        "CREATE INDEX intruder ON invoices (amount)",
        "ALTER TABLE invoices DISABLE TRIGGER ALL",
        # The audit trail is append-only to the service.
        "UPDATE invoice_audit SET caller = 'someone else'",
        "DELETE FROM invoice_audit",
        "TRUNCATE invoice_audit",
    ],
)
async def test_the_service_role_cannot_change_the_schema(as_service: asyncpg.Connection, statement: str) -> None:
    with pytest.raises(DENIED):
        await as_service.execute(statement)


async def test_the_service_role_reads_and_writes_rows(as_service: asyncpg.Connection) -> None:
    async with as_service.transaction():
        await as_service.execute(
            "INSERT INTO invoices (id, stripe_invoice_id, user_id, user_name, status, amount, invoice_pdf,"
            " created_at, updated_at)"
            " VALUES ('0123456789abcdef01234567', 'in_role1', 'u', 'n', 'paid', 1, '', now(), now())"
        )
        # The counters are kept by triggers, which run with the caller's privileges.
        assert await as_service.fetchval("SELECT sum(n) FROM invoice_counts") == 1
        await as_service.execute("DELETE FROM invoices WHERE stripe_invoice_id = 'in_role1'")
    assert await as_service.fetchval("SELECT max(version) FROM schema_migrations") >= 3
    # ...and appends to the audit trail and reads it.
    async with as_service.transaction():
        await as_service.execute(
            "INSERT INTO invoice_audit (action, caller, attempt, outcome) VALUES ('create', 'role-test', 1, 'ok')"
        )
        assert await as_service.fetchval("SELECT count(*) FROM invoice_audit WHERE caller = 'role-test'") == 1


async def test_a_migration_whose_grant_fails_is_not_applied(postgres: str) -> None:
    """Migrating and granting commit together: a version that a server can see as current
    always comes with the service role's rights on its tables."""
    owner = await storage.fresh_database(postgres, "t_grant_fails", migrate=False)
    with pytest.raises(asyncpg.UndefinedObjectError):
        await storage.migrate_database(owner, grant_to="no_such_role")
    conn = await asyncpg.connect(owner)
    try:
        assert await migrations.current_version(conn) == 0
    finally:
        await conn.close()
    assert await storage.migrate_database(owner, grant_to=SERVICE_ROLE) == list(range(1, migrations.latest() + 1))


async def test_replicas_granting_at_once_do_not_collide(postgres: str) -> None:
    """Every start with MIGRATE_ON_START grants, also on a current schema; concurrent GRANTs
    on one table can fail with "tuple concurrently updated" unless they take turns."""
    owner = await storage.fresh_database(postgres, "t_grant_race", grant_to=SERVICE_ROLE)
    for _ in range(3):
        assert (
            await asyncio.gather(*(storage.migrate_database(owner, grant_to=SERVICE_ROLE) for _ in range(8)))
            == [[]] * 8
        )


async def test_the_owner_never_grants_to_itself(postgres: str) -> None:
    """Granting revokes writes on the migration history: done to the owner itself (a role
    that owns its database, not a superuser), its next migration could not be recorded."""
    admin = await asyncpg.connect(postgres)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 't_migrator'"):
            await admin.execute("CREATE ROLE t_migrator LOGIN")
        await admin.execute("DROP DATABASE IF EXISTS t_self_grant WITH (FORCE)")
        await admin.execute("CREATE DATABASE t_self_grant OWNER t_migrator")
    finally:
        await admin.close()
    conn = await asyncpg.connect(storage.with_user(storage.with_database(postgres, "t_self_grant"), "t_migrator"))
    try:
        assert await migrations.migrate(conn, to=2, grant_to="t_migrator") == [1, 2]
        assert await migrations.migrate(conn, grant_to="t_migrator") == list(range(3, migrations.latest() + 1))
    finally:
        await conn.close()


async def test_the_running_stack_connects_as_the_service_role(stack: Stack, http: httpx.AsyncClient) -> None:
    assert (await http.get("/admin/api/invoices")).status_code == 200
    admin = await asyncpg.connect(stack.database)
    try:
        users = await admin.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert {u["usename"] for u in users} == {SERVICE_ROLE}


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="billing.v1.InvoiceService"), timeout=5
        )
        return int(reply.status)


def _migrate(owner: str, service: str) -> dict[str, list[int]]:
    env = {**os.environ, "MIGRATION_DATABASE_URL": owner, "DATABASE_URL": service, "LOG_LEVEL": "WARNING"}
    run = subprocess.run(
        [sys.executable, "-m", "service", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, list[int]] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("at", [0, 2])
def test_not_serving_until_the_migration_job_ran(postgres: str, tmp_path: Path, at: int) -> None:
    """The Kubernetes shape: MIGRATE_ON_START off, a database that is empty or one migration
    behind this code, the Job later. Behind by one, the tables a Get reads exist: only the
    readiness gate keeps a caller who skips health checks off the old schema."""
    owner = asyncio.run(storage.fresh_database(postgres, f"t_unmigrated_{at}", migrate=False))
    service = storage.with_user(owner, SERVICE_ROLE)
    if at:
        asyncio.run(storage.migrate_database(owner, grant_to=SERVICE_ROLE, to=at))
    env = stack_env(owner, tmp_path) | {"DATABASE_URL": service, "MIGRATE_ON_START": "false"}
    server, port = start_service(env)
    try:

        def get_details() -> str:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
                pb_grpc.InvoiceServiceStub(channel).GetInvoice(
                    pb.GetInvoiceRequest(id="in_x"), metadata=AUTH, timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            return info.value.details() or ""

        def failed_attempt() -> str | None:
            details = get_details()
            return None if details == "not ready: starting; retry later" else details

        details = wait_until(failed_attempt, "a readiness attempt failing", timeout_s=10)
        latest = migrations.latest()
        assert details == f"not ready: the schema is not migrated to version {latest} yet (it is at {at}); retry later"
        assert _health(port) == health_pb2.HealthCheckResponse.NOT_SERVING

        assert _migrate(owner, service) == {"applied": list(range(at + 1, latest + 1))}
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: True if _health(port) == serving else None, "SERVING after the migration", timeout_s=10)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            assert stub.ListInvoices(pb.ListInvoicesRequest(), metadata=AUTH, timeout=5).count == 0
        assert _migrate(owner, service) == {"applied": []}
    finally:
        server.stop()
