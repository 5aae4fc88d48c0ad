"""Shared fixtures: one real Postgres per test session (the embedded one, or the server
in TEST_DATABASE_URL), a fresh migrated database per test cloned from a template, and
the real gRPC server on a free port with a real channel to it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

from service import embedded, storage
from service.app import GrpcServer, start_grpc
from service.domain import Invoice, User, new_record_id
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc

API_KEY = "test-admin-key-current"
ROTATED_KEY = "test-admin-key-next"
TEMPLATE = "invoices_template"


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's admin DSN, with a migrated template database ready to clone."""
    import asyncio
    import os

    dsn = os.environ.get("TEST_DATABASE_URL") or embedded.start(tmp_path_factory.mktemp("pg") / "data", temporary=True)

    async def prepare() -> None:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await admin.close()
        pool = await storage.connect(with_database(dsn, TEMPLATE), min_size=1, max_size=1, command_timeout=10)
        await pool.close()

    asyncio.run(prepare())
    yield dsn


@pytest.fixture
async def database(postgres: str) -> AsyncIterator[str]:
    """A DSN of a fresh, migrated database of this test's own."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        yield with_database(postgres, name)
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await storage.connect(database, min_size=1, max_size=4, command_timeout=5)
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> storage.Storage:
    return storage.Storage(pool)


@pytest.fixture
async def server(store: storage.Storage) -> AsyncIterator[GrpcServer]:
    running = await start_grpc(store, [API_KEY, ROTATED_KEY], "127.0.0.1:0")
    yield running
    await running.server.stop(None)


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.InvoiceServiceAsyncStub:
    return pb_grpc.InvoiceServiceStub(channel)


AUTH = (("api-key", API_KEY),)


def make_invoice(n: int, *, base: datetime | None = None, status: str = "paid") -> Invoice:
    """The n-th of a series of invoices, each a second newer than the one before."""
    created = (base or datetime(2026, 11, 1, tzinfo=UTC)) + timedelta(seconds=n, milliseconds=250)
    return Invoice(
        id=new_record_id(),
        stripe_invoice_id=f"in_test{n:06d}",
        user=User(id=f"{n:024x}", name=f"User {n}"),
        status=status,
        amount=100 * (n + 1),
        invoice_pdf=f"https://pay.stripe.com/invoice/acct_test/in_test{n:06d}/pdf",
        created_at=created,
        updated_at=created + timedelta(seconds=5),
    )
