"""The statements that keep credit notes (migration 0010) and the invoice record's totals
of money given back (its notes, and refunds made outside them: storage/refunds.py), run
inside the transaction of service/storage/postgres.py that holds the invoice's advisory
lock, so that a note and its invoice's events apply one at a time."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from service.credit_notes import NoteStatus, StripeCreditNote, note_overtaken
from service.domain import Outcome

_LOCK_NOTE = """
    SELECT status, amount, refunded, credited, out_of_band, currency, reason, memo, refund_ids, stripe_updated
    FROM credit_notes WHERE id = $1 FOR UPDATE"""
_NOTE_COLUMNS = (
    "stripe_invoice_id, status, amount, refunded, credited, out_of_band, currency, reason, memo, refund_ids,"
    " created_at, stripe_updated, updated_at"
)
_INSERT_NOTE = f"""
    INSERT INTO credit_notes (id, {_NOTE_COLUMNS})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT (id) DO NOTHING RETURNING id"""  # noqa: S608 - constants
_UPDATE_NOTE = """
    UPDATE credit_notes SET status = $3, amount = $4, refunded = $5, credited = $6, out_of_band = $7,
        currency = coalesce($8, currency), reason = $9, memo = $10, refund_ids = $11,
        created_at = coalesce($12, created_at), stripe_updated = greatest(stripe_updated, $13), updated_at = $14
    WHERE id = $1 AND stripe_invoice_id = $2"""
# The invoice's totals, summed afresh from its issued notes and from the refunds of its
# payments that no issued note counts (never added to, so that a replay or a reorder cannot
# drift them); written only when they change, so that the change feed hears of real
# changes only. A failed or canceled refund gave nothing back.
REFRESH_TOTALS = """
    UPDATE invoices AS i SET amount_refunded = t.refunded + t.outside, amount_credited = t.credited, updated_at = $2
    FROM (SELECT coalesce(sum(n.refunded), 0) AS refunded, coalesce(sum(n.amount), 0) AS credited,
              (SELECT coalesce(sum(r.amount), 0) FROM refunds AS r
               JOIN invoice_payments AS p ON p.payment_intent = r.payment_intent
               WHERE p.stripe_invoice_id = $1 AND r.status IN ('pending', 'requires_action', 'succeeded')
                 AND NOT EXISTS (SELECT 1 FROM credit_notes AS c WHERE c.stripe_invoice_id = $1
                                 AND c.status = 'issued' AND r.id = ANY(c.refund_ids))) AS outside
          FROM credit_notes AS n WHERE n.stripe_invoice_id = $1 AND n.status = 'issued') AS t
    WHERE i.stripe_invoice_id = $1
      AND (i.amount_refunded, i.amount_credited) IS DISTINCT FROM (t.refunded + t.outside, t.credited)"""

NOTES_OF = """
    SELECT id, stripe_invoice_id, status, amount, refunded, credited, out_of_band, reason, memo, currency,
        extract(epoch FROM created_at)::bigint AS created, refund_ids
    FROM credit_notes WHERE stripe_invoice_id = $1 ORDER BY created_at, id"""


def note_of(row: asyncpg.Record) -> StripeCreditNote:
    return StripeCreditNote(
        **{**dict(row), "status": NoteStatus(row["status"]), "refund_ids": tuple(row["refund_ids"])}
    )


async def apply(
    conn: asyncpg.pool.PoolConnectionProxy, note: StripeCreditNote, stripe_time: int, now: datetime
) -> Outcome:
    """Brings the note to what Stripe said at `stripe_time`, unless it holds a later state,
    then the invoice's totals to its notes."""
    created = datetime.fromtimestamp(note.created, UTC) if note.created is not None else None
    values: tuple[object, ...] = (note.amount, note.refunded, note.credited, note.out_of_band, note.currency)
    values += (note.reason, note.memo, list(note.refund_ids))
    inserted = await conn.fetchval(
        _INSERT_NOTE, note.id, note.stripe_invoice_id, note.status, *values, created or now, stripe_time, now
    )
    if inserted is not None:
        outcome = Outcome.CREATED
    else:
        stored = await conn.fetchrow(_LOCK_NOTE, note.id)
        if stored is None or not note_overtaken(
            NoteStatus(stored["status"]), stored["stripe_updated"], note.status, stripe_time
        ):
            return Outcome.STALE
        described: tuple[object, ...] = (note.status, note.amount, note.refunded, note.credited, note.out_of_band)
        described += (note.currency or stored["currency"], note.reason, note.memo, list(note.refund_ids))
        if tuple(stored)[:9] == described:  # _LOCK_NOTE's columns, in its order
            return Outcome.UNCHANGED
        await conn.execute(
            _UPDATE_NOTE, note.id, note.stripe_invoice_id, note.status, *values, created, stripe_time, now
        )
        outcome = Outcome.UPDATED
    await conn.execute(REFRESH_TOTALS, note.stripe_invoice_id, now)
    return outcome
