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
    SELECT status, amount, refunded, credited, out_of_band, currency, reason, memo, refund_ids, refund_amounts,
        stripe_updated
    FROM credit_notes WHERE id = $1 FOR UPDATE"""
_NOTE_COLUMNS = (
    "stripe_invoice_id, status, amount, refunded, credited, out_of_band, currency, reason, memo, refund_ids,"
    " refund_amounts, created_at, stripe_updated, updated_at"
)
_INSERT_NOTE = f"""
    INSERT INTO credit_notes (id, {_NOTE_COLUMNS})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
    ON CONFLICT (id) DO NOTHING RETURNING id"""  # noqa: S608 - constants
_UPDATE_NOTE = """
    UPDATE credit_notes SET status = $3, amount = $4, refunded = $5, credited = $6, out_of_band = $7,
        currency = coalesce($8, currency), reason = $9, memo = $10, refund_ids = $11, refund_amounts = $12,
        created_at = coalesce($13, created_at), stripe_updated = greatest(stripe_updated, $14), updated_at = $15
    WHERE id = $1 AND stripe_invoice_id = $2"""
# A note's links, once known, whatever the age of the description they came with: Stripe
# never changes which refunds a note made.
_FILL_LINKS = """
    UPDATE credit_notes SET refund_ids = $2, refund_amounts = $3, updated_at = $4
    WHERE id = $1 AND refund_ids IS NULL"""
# The invoice's totals, summed afresh from its issued notes and from what the refunds of its
# payments gave beyond the parts issued notes link (never added to, so that a replay or a
# reorder cannot drift them); written only when they change, so that the change feed hears
# of real changes only. service/credit_notes.py's refunded_outside is the same rule: a
# failed or canceled refund gave nothing back, and a note of unknown links may have made
# any refund, so its `refunded` is taken off the refunds' rest.
REFRESH_TOTALS = """
    WITH issued AS (SELECT * FROM credit_notes WHERE stripe_invoice_id = $1 AND status = 'issued'),
    linked AS (SELECT l.id, sum(l.amount) AS amount FROM issued, unnest(refund_ids, refund_amounts) AS l(id, amount)
               GROUP BY l.id),
    rest AS (SELECT coalesce(sum(greatest(r.amount - coalesce(linked.amount, 0), 0)), 0) AS amount
             FROM refunds AS r JOIN invoice_payments AS p ON p.payment_intent = r.payment_intent
             LEFT JOIN linked ON linked.id = r.id
             WHERE p.stripe_invoice_id = $1 AND r.status IN ('pending', 'requires_action', 'succeeded')),
    t AS (SELECT coalesce(sum(refunded), 0) + greatest((SELECT amount FROM rest)
                     - coalesce(sum(refunded) FILTER (WHERE refund_ids IS NULL), 0), 0) AS refunded,
                 coalesce(sum(amount), 0) AS credited
          FROM issued)
    UPDATE invoices AS i SET amount_refunded = t.refunded, amount_credited = t.credited, updated_at = $2
    FROM t
    WHERE i.stripe_invoice_id = $1
      AND (i.amount_refunded, i.amount_credited) IS DISTINCT FROM (t.refunded, t.credited)"""

NOTES_OF = """
    SELECT id, stripe_invoice_id, status, amount, refunded, credited, out_of_band, reason, memo, currency,
        extract(epoch FROM created_at)::bigint AS created, refund_ids, refund_amounts
    FROM credit_notes WHERE stripe_invoice_id = $1 ORDER BY created_at, id"""


def note_of(row: asyncpg.Record) -> StripeCreditNote:
    fields = {k: v for k, v in dict(row).items() if k not in ("refund_ids", "refund_amounts")}
    ids, amounts = row["refund_ids"], row["refund_amounts"]
    links = None if ids is None else tuple(zip(ids, amounts, strict=True))
    return StripeCreditNote(**{**fields, "status": NoteStatus(row["status"]), "refund_links": links})


def _links(note: StripeCreditNote) -> tuple[list[str] | None, list[int] | None]:
    if note.refund_links is None:
        return None, None
    return [ref for ref, _ in note.refund_links], [amount for _, amount in note.refund_links]


async def apply(
    conn: asyncpg.pool.PoolConnectionProxy, note: StripeCreditNote, stripe_time: int, now: datetime
) -> Outcome:
    """Brings the note to what Stripe said at `stripe_time`, unless it holds a later state,
    then the invoice's totals to its notes."""
    created = datetime.fromtimestamp(note.created, UTC) if note.created is not None else None
    values: tuple[object, ...] = (note.amount, note.refunded, note.credited, note.out_of_band, note.currency)
    values += (note.reason, note.memo, *_links(note))
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
            if stored is not None and stored["refund_ids"] is None and note.refund_links is not None:
                await conn.execute(_FILL_LINKS, note.id, *_links(note), now)
                await conn.execute(REFRESH_TOTALS, note.stripe_invoice_id, now)
            return Outcome.STALE
        described: tuple[object, ...] = (note.status, note.amount, note.refunded, note.credited, note.out_of_band)
        described += (note.currency or stored["currency"], note.reason, note.memo, *_links(note))
        if tuple(stored)[:10] == described:  # _LOCK_NOTE's columns, in its order
            return Outcome.UNCHANGED
        await conn.execute(
            _UPDATE_NOTE, note.id, note.stripe_invoice_id, note.status, *values, created, stripe_time, now
        )
        outcome = Outcome.UPDATED
    await conn.execute(REFRESH_TOTALS, note.stripe_invoice_id, now)
    return outcome
