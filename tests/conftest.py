"""Shared fixtures: one real Postgres per test session (the embedded one, or the server
in TEST_DATABASE_URL), a fresh migrated database per test cloned from a template, and
the real gRPC server on a free port with a real channel to it. Each pytest-xdist worker of
`make test` is a session of its own; the hooks below say what the workers share."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
import stripe

from service import embedded, payments, storage
from service.app import SERVICE_ROLE
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import GrpcServer, start_grpc
from service.storage import changes, with_database
from service.watch import Watches, WatchLimits
from tests.helpers import API_KEY, ROTATED_KEY, WEBHOOK_SECRET, Stack, stack_env, until_delivered
from tests.referee.judge import Referee, records
from tools.localstripe.recorder import RECORD_DIR
from tools.stack import (
    LOCALSTRIPE_KEY,
    backend,
    free_port,
    register_webhook,
    start_localstripe,
    wait_until_routed,
)

TEMPLATE = "invoices_template"
# The scenarios that load the machine and time what they see (faults under a storm, restarts
# under load, the benchmark): `make test` runs on two workers (pytest-xdist, --dist
# loadgroup), and these run one after another on one of them, never two at once.
SCENARIOS = ("test_chaos.py", "test_rolling.py", "test_restart.py", "test_frozen.py", "test_bench.py")


def pytest_configure(config: pytest.Config) -> None:
    """Once, in the process that starts the workers: what they must not race for."""
    if hasattr(config, "workerinput"):
        return
    if os.environ.get("TEST_DATABASE_URL"):
        if config.getoption("numprocesses", None):
            # Each worker's session drops and remakes the template and its fixed databases.
            raise pytest.UsageError("TEST_DATABASE_URL is one server for one session: run with TEST_WORKERS=0")
        return
    embedded.prepare_system_user()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SCENARIOS:
            item.add_marker(pytest.mark.xdist_group("scenarios"))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's admin DSN, with a migrated template database ready to clone."""
    dsn = os.environ.get("TEST_DATABASE_URL") or embedded.start(tmp_path_factory.mktemp("pg") / "data", temporary=True)

    asyncio.run(storage.ensure_login_role(dsn, SERVICE_ROLE))
    asyncio.run(storage.fresh_database(dsn, TEMPLATE, grant_to=SERVICE_ROLE))
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
    pool = await storage.connect(database, max_size=4, command_timeout=5)
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> storage.Storage:
    return storage.Storage(pool)


@pytest.fixture
async def watches(store: storage.Storage, database: str) -> AsyncIterator[Watches]:
    """The change feed's reader as the server runs it (LISTEN and polling), polling often."""
    running = Watches(store, WatchLimits(poll_s=0.1), listen=partial(changes.listen, database))
    running.start()
    yield running
    await running.close()


@pytest.fixture
async def server(store: storage.Storage, watches: Watches) -> AsyncIterator[GrpcServer]:
    running = await start_grpc(store, [API_KEY, ROTATED_KEY], "127.0.0.1:0", watches=watches)
    yield running
    await running.server.stop(None)


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.InvoiceServiceAsyncStub:
    return pb_grpc.InvoiceServiceStub(channel)


@pytest.fixture(scope="session", autouse=True)
def stripe_referee(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every emulator the session starts records what it is asked and answers (its
    environment is this one's); at the end all of it is judged against Stripe's published
    API (tests/referee), and a difference not in the allowlist fails the session."""
    folder = tmp_path_factory.mktemp("stripe-exchanges")
    os.environ[RECORD_DIR] = str(folder)
    yield folder
    del os.environ[RECORD_DIR]
    verdict = Referee().judge(records(folder))
    if verdict.failing:
        pytest.fail(verdict.report(), pytrace=False)


@pytest.fixture(scope="session")
def localstripe() -> Iterator[str]:
    """The Stripe emulator (with this project's extensions), fresh for the session."""
    port = free_port()
    part = start_localstripe(port, fresh=True, log=sys.stderr)
    yield f"http://127.0.0.1:{port}"
    part.stop()


@pytest.fixture
def stripe_client(localstripe: str) -> stripe.StripeClient:
    """Per test: the SDK's async HTTP client belongs to one event loop."""
    return payments.client(LOCALSTRIPE_KEY, api_base=localstripe, timeout_s=10, max_retries=0)


@pytest.fixture(scope="session")
def stack(postgres: str, localstripe: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    name = "gateway_tests"

    async def create() -> None:
        admin = await asyncpg.connect(postgres)
        try:
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        finally:
            await admin.close()

    asyncio.run(create())
    database = with_database(postgres, name)
    metrics_port = free_port()
    env = stack_env(database, tmp, localstripe, metrics_port)
    with (tmp / "stack.log").open("w") as log, backend(env, tmp, log=log) as running:
        ports = (running.grpc_port, running.gateway_port, running.admin_port)
        stack = Stack(database, *ports, localstripe, metrics_port, running.webhook_port, tmp / "stack.log")
        wait_until_routed(stack.base_url, API_KEY)
        register_webhook(int(localstripe.rsplit(":", 1)[1]), f"{stack.base_url}/webhooks/stripe", WEBHOOK_SECRET)
        yield stack


@pytest.fixture
async def stack_store(stack: Stack) -> AsyncIterator[storage.Storage]:
    """The store behind the gateway, emptied for this test once no earlier test's webhook
    is still on its way to it."""
    await until_delivered(stack.localstripe)
    pool = await asyncpg.create_pool(stack.database, min_size=1, max_size=2)
    await pool.execute("TRUNCATE invoices, stripe_events, create_requests, deleted_invoices, credit_notes")
    yield storage.Storage(pool)
    await pool.close()


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.base_url, headers={"Api-Key": API_KEY}, timeout=10) as client:
        yield client
