"""The invoice store on Postgres. Every SQL statement of the service lives here; callers
get domain objects and domain errors, never asyncpg types."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg

from service.domain import Invoice, InvoicePage, NotFound, Page, Unavailable, User
from service.storage.migrations import migrate

log = logging.getLogger(__name__)

# What a lost or refused connection looks like through asyncpg: the caller gets
# UNAVAILABLE and may retry; anything else is a bug and surfaces as INTERNAL.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
    # Seen when the server terminates an idle pooled connection (a restart, an admin's
    # pg_terminate_backend): the next statement finds the protocol mid-teardown.
    asyncpg.InternalClientError,
)

# Statements are whole literals (no string building), so what runs is what is read here.
_LIST = """
    SELECT id, stripe_invoice_id, user_id, user_name, status, amount, invoice_pdf, created_at, updated_at
    FROM invoices ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2"""
_GET_BY_ID = """
    SELECT id, stripe_invoice_id, user_id, user_name, status, amount, invoice_pdf, created_at, updated_at
    FROM invoices WHERE id = $1"""
_GET_BY_STRIPE_ID = """
    SELECT id, stripe_invoice_id, user_id, user_name, status, amount, invoice_pdf, created_at, updated_at
    FROM invoices WHERE stripe_invoice_id = $1"""
_UPSERT = """
    INSERT INTO invoices
        (id, stripe_invoice_id, user_id, user_name, status, amount, invoice_pdf, created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (stripe_invoice_id) DO UPDATE SET
        user_id = EXCLUDED.user_id, user_name = EXCLUDED.user_name, status = EXCLUDED.status,
        amount = EXCLUDED.amount, invoice_pdf = EXCLUDED.invoice_pdf, updated_at = EXCLUDED.updated_at
    RETURNING id, stripe_invoice_id, user_id, user_name, status, amount, invoice_pdf, created_at, updated_at"""


def record_time(now: datetime | None = None) -> datetime:
    """Record times are kept to whole milliseconds, never .000, so that they always print
    as RFC 3339 with three fraction digits, the format REST callers know (protobuf's JSON
    printer drops a zero fraction)."""
    now = now or datetime.now(UTC)
    millis = now.microsecond // 1000 or 1
    return now.replace(microsecond=millis * 1000)


def _invoice(row: asyncpg.Record) -> Invoice:
    return Invoice(
        id=row["id"],
        stripe_invoice_id=row["stripe_invoice_id"],
        user=User(id=row["user_id"], name=row["user_name"]),
        status=row["status"],
        amount=row["amount"],
        invoice_pdf=row["invoice_pdf"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class Storage:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except CONNECTION_ERRORS as exc:
            log.warning("database unavailable: %s", type(exc).__name__)
            raise Unavailable("the invoice store is unavailable; retry later") from exc

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def list_invoices(self, page: Page) -> InvoicePage:
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            total = await conn.fetchval("SELECT count(*) FROM invoices")
            rows = await conn.fetch(_LIST, page.limit, page.offset)
        return InvoicePage(invoices=[_invoice(r) for r in rows], total=total)

    async def get_invoice(self, key: str) -> Invoice:
        """Finds an invoice by the service's id or, for `in_...` keys, by Stripe's id."""
        query = _GET_BY_STRIPE_ID if key.startswith("in_") else _GET_BY_ID
        async with self._connection() as conn:
            row = await conn.fetchrow(query, key)
        if row is None:
            raise NotFound(f"invoice {key} not found")
        return _invoice(row)

    async def save_invoice(self, invoice: Invoice) -> Invoice:
        """Inserts the invoice, or updates the one with the same Stripe id, keeping its
        own id and creation time."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                _UPSERT,
                invoice.id,
                invoice.stripe_invoice_id,
                invoice.user.id,
                invoice.user.name,
                invoice.status,
                invoice.amount,
                invoice.invoice_pdf,
                record_time(invoice.created_at),
                record_time(invoice.updated_at),
            )
        if row is None:
            raise RuntimeError("INSERT ... RETURNING returned no row")
        return _invoice(row)


async def connect(dsn: str, *, min_size: int, max_size: int, command_timeout: float) -> asyncpg.Pool:
    """Creates the pool and brings the schema up to date before anyone can use it."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout
    )
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
    except BaseException:
        await pool.close()
        raise
    return pool
