"""Helpers the tests share (not fixtures: those are in conftest.py)."""

from __future__ import annotations

from service.domain import Invoice
from service.storage import Storage
from service.storage.postgres import INSERT_RECORD, record_time


async def save_invoice(store: Storage, invoice: Invoice) -> Invoice:
    """Loads a record as the service writes it (the store's own INSERT, used by every
    webhook), with the record's own id and times, and answers it as the store reads it."""
    async with store._connection() as conn:
        await conn.execute(
            INSERT_RECORD,
            invoice.id,
            invoice.stripe_invoice_id,
            invoice.user.id,
            invoice.user.name,
            invoice.status,
            invoice.amount,
            invoice.currency,
            invoice.invoice_pdf,
            record_time(invoice.created_at),
            record_time(invoice.updated_at),
            0,
        )
    return await store.get_invoice(invoice.stripe_invoice_id)
