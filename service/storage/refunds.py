"""The statements that keep refunds made outside a credit note and the invoice payments
that say whose they are (migration 0012), run inside the transaction of
service/storage/postgres.py that holds the payment intent's advisory lock. Either may
arrive first; whichever comes second brings the invoice's totals up to date, under the
invoice's lock too (payment intent first, then invoice: the one order every path takes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg

from service.credit_notes import InvoicePayment, RefundStatus, StripeRefund, refund_overtaken
from service.domain import Outcome
from service.storage.credit_notes import REFRESH_TOTALS

_PAYMENT = """
    INSERT INTO invoice_payments (payment_intent, stripe_invoice_id) VALUES ($1, $2)
    ON CONFLICT (payment_intent) DO NOTHING RETURNING payment_intent"""
_INVOICE_OF = "SELECT stripe_invoice_id FROM invoice_payments WHERE payment_intent = $1"
_INSERT_REFUND = """
    INSERT INTO refunds (id, payment_intent, status, amount, currency, reason, created_at, stripe_updated, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (id) DO NOTHING RETURNING id"""
_LOCK_REFUND = "SELECT status, amount, currency, reason, stripe_updated FROM refunds WHERE id = $1 FOR UPDATE"
_UPDATE_REFUND = """
    UPDATE refunds SET status = $2, amount = $3, currency = coalesce($4, currency), reason = $5,
        stripe_updated = greatest(stripe_updated, $6), updated_at = $7
    WHERE id = $1"""

# Takes an invoice's advisory lock (service/storage/postgres.py's, passed in to keep one).
LockInvoice = Callable[[str], Awaitable[None]]


async def _refresh(
    conn: asyncpg.pool.PoolConnectionProxy, invoice: str | None, lock: LockInvoice, now: datetime
) -> None:
    if invoice is not None:
        await lock(invoice)
        await conn.execute(REFRESH_TOTALS, invoice, now)


async def apply_payment(
    conn: asyncpg.pool.PoolConnectionProxy, paid: InvoicePayment, lock: LockInvoice, now: datetime
) -> Outcome:
    """Records whose payment the intent is; the refunds that came before it now count."""
    if await conn.fetchval(_PAYMENT, paid.payment_intent, paid.stripe_invoice_id) is None:
        return Outcome.UNCHANGED
    await _refresh(conn, paid.stripe_invoice_id, lock, now)
    return Outcome.CREATED


async def apply_refund(
    conn: asyncpg.pool.PoolConnectionProxy, refund: StripeRefund, stripe_time: int, lock: LockInvoice, now: datetime
) -> Outcome:
    """Brings the refund to what Stripe said at `stripe_time`, unless it holds a later
    state, then its invoice's totals, once its invoice is known."""
    created = datetime.fromtimestamp(refund.created, UTC) if refund.created is not None else now
    values = (refund.status, refund.amount, refund.currency, refund.reason)
    if await conn.fetchval(_INSERT_REFUND, refund.id, refund.payment_intent, *values, created, stripe_time, now):
        outcome = Outcome.CREATED
    else:
        stored = await conn.fetchrow(_LOCK_REFUND, refund.id)
        if stored is None or not refund_overtaken(
            RefundStatus(stored["status"]), stored["stripe_updated"], refund.status, stripe_time
        ):
            return Outcome.STALE
        if tuple(stored)[:4] == (*values[:2], refund.currency or stored["currency"], refund.reason):
            return Outcome.UNCHANGED
        await conn.execute(_UPDATE_REFUND, refund.id, *values, stripe_time, now)
        outcome = Outcome.UPDATED
    await _refresh(conn, await conn.fetchval(_INVOICE_OF, refund.payment_intent), lock, now)
    return outcome
