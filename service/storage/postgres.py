"""The invoice store on Postgres: the records, the Stripe events applied to them (invoices',
their credit notes' and refunds', storage/credit_notes.py and refunds.py), the list and its
counts. Every statement
about invoices and events lives here or there (the storage package holds all of the
service's SQL); callers get domain objects and domain errors, never asyncpg types."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import asyncpg

from service.credit_notes import InvoicePayment, StripeCreditNote, StripeRefund
from service.domain import (
    Cursor,
    Filters,
    Invoice,
    InvoicePage,
    NotFound,
    Outcome,
    Page,
    StoredState,
    StripeInvoice,
    Unavailable,
    Unrecordable,
    new_record_id,
)
from service.storage import credit_notes, migrations, refunds
from service.storage.changes import ChangeFeed, invoice_of
from service.storage.creates import CreateRequests

log = logging.getLogger(__name__)

# The record's columns, written once: the order of invoice_of's reads and of the VALUES below.
RECORD_COLUMNS = (
    "id",
    "stripe_invoice_id",
    "user_id",
    "user_name",
    "status",
    "amount",
    "currency",
    "invoice_pdf",
    "created_at",
    "updated_at",
)
_COLUMNS = ", ".join(RECORD_COLUMNS)
# Read too, written only from the invoice's credit notes (storage/credit_notes.py).
GIVEN_BACK_COLUMNS = ("amount_refunded", "amount_credited")
_SELECT = f"SELECT {_COLUMNS}, {', '.join(GIVEN_BACK_COLUMNS)}"
_ORDER = "ORDER BY created_at DESC, id DESC"
_FILTERS = {
    "status": "status = ${}",
    "user_id": "user_id = ${}",
    "created_after": "created_at >= ${}",
    "created_before": "created_at < ${}",
}
# Money given back (ListInvoices' given_back): written as migration 0013 writes it in its
# counters' trigger and its partial index's predicate, which the planner matches by text.
GIVEN_BACK = "(amount_refunded <> 0 OR amount_credited <> 0)"
_AFTER = "(created_at, id) < (${}, ${})"
_COUNTED = "SELECT coalesce(sum(n), 0)::bigint FROM invoice_counts"
GET_BY_ID = f"{_SELECT} FROM invoices WHERE id = $1"
GET_BY_STRIPE_ID = f"{_SELECT} FROM invoices WHERE stripe_invoice_id = $1"

# Events of one invoice are applied one at a time, under a transaction-scoped advisory lock
# on its Stripe id (two-key form, its own key space; a hash collision only serializes two
# invoices). Row locks cannot do it: before `invoice.created` is applied there is no row,
# and a concurrent `invoice.deleted` would not be seen until it committed.
_INVOICE_LOCKS = 0x1A70
_LOCK_INVOICE = f"SELECT pg_advisory_xact_lock({_INVOICE_LOCKS}, hashtext($1))"
_RECORD_EVENT = f"""
    WITH locked AS (SELECT pg_advisory_xact_lock({_INVOICE_LOCKS}, hashtext($3)))
    INSERT INTO stripe_events (id, type, stripe_invoice_id, outcome, applications)
    SELECT $1, $2, $3, 'pending', 0 FROM locked
    ON CONFLICT (id) DO NOTHING RETURNING id"""  # noqa: S608 - a constant, values are $n
# Each application of an event's effect counts itself here, in its own transaction
# (migration 0009), so that a double shows in the row whatever the answers said; the
# duplicate check above decides whether this runs, and this does not trust it.
_SET_EVENT_OUTCOME = "UPDATE stripe_events SET outcome = $2, applications = applications + 1 WHERE id = $1"
_IS_DELETED = "SELECT 1 FROM deleted_invoices WHERE stripe_invoice_id = $1"
_MARK_DELETED = "INSERT INTO deleted_invoices (stripe_invoice_id) VALUES ($1) ON CONFLICT DO NOTHING"
_DELETE_INVOICE = "DELETE FROM invoices WHERE stripe_invoice_id = $1"
# What Stripe says of an invoice, in this order: user_id, user_name, status, amount,
# currency, invoice_pdf, created_at (Stripe's `created`).
INSERT_RECORD = f"""
    INSERT INTO invoices ({_COLUMNS}, stripe_updated) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT (stripe_invoice_id) DO NOTHING RETURNING id"""  # noqa: S608 - constants
_LOCK_FROM_STRIPE = """
    SELECT user_id, user_name, status, amount, currency, invoice_pdf, created_at, stripe_updated
    FROM invoices WHERE stripe_invoice_id = $1 FOR UPDATE"""
_UPDATE_FROM_STRIPE = """
    UPDATE invoices SET user_id = $2, user_name = $3, status = $4, amount = $5, currency = $6, invoice_pdf = $7,
        created_at = $8, updated_at = $9, stripe_updated = $10
    WHERE stripe_invoice_id = $1"""


@contextmanager
def _recordable() -> Iterator[None]:
    """Postgres refusing a value (out of a column's range, a character its encoding cannot
    hold, a check) is the data's fault, not the database's: retrying cannot help."""
    try:
        yield
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError) as exc:
        log.error("Stripe's invoice cannot be recorded: %s", type(exc).__name__)
        raise Unrecordable(f"Postgres refused the invoice: {type(exc).__name__}") from exc


def record_time(now: datetime | None = None) -> datetime:
    """Record times are kept to whole milliseconds, never .000, so that they always print
    as RFC 3339 with three fraction digits, the format REST callers know (protobuf's JSON
    printer drops a zero fraction)."""
    now = now or datetime.now(UTC)
    millis = now.microsecond // 1000 or 1
    return now.replace(microsecond=millis * 1000)


def _where(filters: Filters) -> tuple[list[str], list[object]]:
    where: list[str] = []
    args: list[object] = []
    for name, fragment in _FILTERS.items():
        value = getattr(filters, name)
        if value is not None:
            args.append(value)
            where.append(fragment.format(len(args)))
    if filters.given_back is not None:  # a constant, not $n: the partial index's predicate must be seen
        where.append(GIVEN_BACK if filters.given_back else f"NOT {GIVEN_BACK}")
    return where, args


def _kept_count(filters: Filters) -> str | None:
    """The total from the counters (migration 0003, keyed by money given back since 0013),
    when they are keyed by every filter set; None when it needs rows (user, time)."""
    if filters.user_id is not None or filters.created_after is not None or filters.created_before is not None:
        return None
    where = ["status = $1"] if filters.status else []  # status is _where's first argument
    if filters.given_back is not None:
        where.append("given_back" if filters.given_back else "NOT given_back")
    return _COUNTED + _clause(where)


def _clause(where: list[str]) -> str:
    return f" WHERE {' AND '.join(where)}" if where else ""


def list_query(page: Page) -> tuple[str, list[object]]:
    """The one statement of a list page and its arguments (make bench explains it too)."""
    where, args = _where(page.filters)
    count_sql = _kept_count(page.filters) or f"SELECT count(*) FROM invoices{_clause(where)}"  # noqa: S608 - constant fragments
    if page.after is not None:
        args += [page.after.created_at, page.after.id]
        where = [*where, _AFTER.format(len(args) - 1, len(args))]
    args += [page.limit + 1, page.offset]
    n = len(args)
    rows_sql = f"{_SELECT} FROM invoices{_clause(where)} {_ORDER} LIMIT ${n - 1} OFFSET ${n}"
    sql = f"SELECT t.total, r.* FROM ({count_sql}) AS t(total) LEFT JOIN LATERAL ({rows_sql}) AS r ON true"  # noqa: S608 - constant fragments, values are $n
    return sql, args


class Storage(CreateRequests, ChangeFeed):
    """Invoice records and the Stripe events applied to them (and, inherited, the Create
    idempotency keys and the change feed), over one pool."""

    async def check_ready(self) -> None:
        """Raises Unavailable unless Postgres answers and the schema is the one this code
        expects (a deploy's migrations may not have run yet)."""
        async with self._connection() as conn:
            version = await migrations.current_version(conn)
        if version < migrations.latest():
            raise Unavailable(f"the schema is not migrated to version {migrations.latest()} yet (it is at {version})")

    async def list_invoices(self, page: Page) -> InvoicePage:
        """One page and the matching total in one statement, so one snapshot (they agree)
        and one round trip. The total comes from the counters unless the filters need
        rows (user, time); the page's rows join it, so a page past the end still has it."""
        sql, args = list_query(page)
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *args)
        total = rows[0]["total"]
        rows = [r for r in rows if r["id"] is not None]
        invoices = [invoice_of(r) for r in rows[: page.limit]]
        more = len(rows) > page.limit
        next_after = Cursor(invoices[-1].created_at, invoices[-1].id) if more else None
        return InvoicePage(invoices=invoices, total=total, next_after=next_after)

    async def get_invoice(self, key: str) -> Invoice:
        """Finds an invoice by the service's id or, for `in_...` keys, by Stripe's id."""
        query = GET_BY_STRIPE_ID if key.startswith("in_") else GET_BY_ID
        async with self._connection() as conn:
            row = await conn.fetchrow(query, key)
        if row is None:
            raise NotFound(f"invoice {key} not found")
        return invoice_of(row)

    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice:
        """Applies what Stripe answered to a call of the service's own (Pay, Void) and
        answers the record as that transaction left it."""
        key = invoice.stripe_invoice_id
        with _recordable():
            async with self._connection() as conn, conn.transaction(isolation="read_committed"):
                await conn.execute(_LOCK_INVOICE, key)
                await self._apply(conn, invoice, stripe_time, deleted=False)
                row = await conn.fetchrow(GET_BY_STRIPE_ID, key)
        if row is None:
            raise NotFound(f"invoice {key} was deleted in Stripe")
        return invoice_of(row)

    async def apply_stripe_invoice(
        self, invoice: StripeInvoice, *, stripe_time: int, event_id: str | None = None, event_type: str = ""
    ) -> Outcome:
        """Brings the record to what Stripe said at `stripe_time`, in one transaction with
        the event's record, so each event counts once. Returns the outcome: `created`,
        `updated`, `unchanged`, `duplicate` (event seen before), `stale` (older than the
        record) or `deleted`/`ignored-deleted` for invoices Stripe deleted."""
        deleted = event_type == "invoice.deleted"
        paid_by = invoice.payment_intent

        async def apply(conn: asyncpg.pool.PoolConnectionProxy) -> Outcome:
            outcome = await self._apply(conn, invoice, stripe_time, deleted=deleted)
            if paid_by is not None and outcome not in (Outcome.DELETED, Outcome.IGNORED_DELETED):
                # An API version before basil names the invoice's payment here.
                payment = InvoicePayment(paid_by, invoice.stripe_invoice_id)
                await refunds.apply_payment(conn, payment, self._lock_invoice(conn), record_time())
            return outcome

        # The payment intent is locked before the invoice, the order every path takes.
        return await self._applied(
            invoice.stripe_invoice_id, event_id, event_type, apply, first=() if paid_by is None else (paid_by,)
        )

    async def apply_stripe_refund(
        self, refund: StripeRefund, *, stripe_time: int, event_id: str | None = None, event_type: str = ""
    ) -> Outcome:
        """Brings a refund to what Stripe said at `stripe_time`, and its invoice's totals
        with it once the invoice is known, under its payment intent's lock."""
        return await self._applied(
            refund.payment_intent,
            event_id,
            event_type,
            lambda conn: refunds.apply_refund(conn, refund, stripe_time, self._lock_invoice(conn), record_time()),
        )

    async def apply_stripe_invoice_payment(
        self, payment: InvoicePayment, *, event_id: str | None = None, event_type: str = ""
    ) -> Outcome:
        """Records which invoice a payment intent pays, under the intent's lock."""
        return await self._applied(
            payment.payment_intent,
            event_id,
            event_type,
            lambda conn: refunds.apply_payment(conn, payment, self._lock_invoice(conn), record_time()),
        )

    @staticmethod
    def _lock_invoice(conn: asyncpg.pool.PoolConnectionProxy) -> refunds.LockInvoice:
        async def lock(invoice_key: str) -> None:
            await conn.execute(_LOCK_INVOICE, invoice_key)

        return lock

    async def apply_stripe_credit_note(
        self, note: StripeCreditNote, *, stripe_time: int, event_id: str | None = None, event_type: str = ""
    ) -> Outcome:
        """Brings the credit note to what Stripe said at `stripe_time`, and its invoice's
        totals with it, in one transaction with the event's record (as for invoices)."""
        return await self._applied(
            note.stripe_invoice_id,
            event_id,
            event_type,
            lambda conn: credit_notes.apply(conn, note, stripe_time, record_time()),
        )

    async def credit_notes_of(self, stripe_invoice_id: str) -> list[StripeCreditNote]:
        """The invoice's credit notes, oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(credit_notes.NOTES_OF, stripe_invoice_id)
        return [credit_notes.note_of(row) for row in rows]

    async def record_stripe_refunds(
        self, stripe_invoice_id: str, refunds: list[StripeRefund], *, stripe_time: int
    ) -> None:
        """Applies the refunds Stripe listed for the invoice's payments to a call of the
        service's own (Refund): each payment intent is the invoice's, since it was listed
        by the invoice."""
        for intent in sorted({r.payment_intent for r in refunds}):
            await self.apply_stripe_invoice_payment(InvoicePayment(intent, stripe_invoice_id))
        for refund in refunds:
            await self.apply_stripe_refund(refund, stripe_time=stripe_time)

    async def record_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> None:
        """Applies a credit note Stripe answered to a call of the service's own (Refund)."""
        await self.apply_stripe_credit_note(note, stripe_time=stripe_time)

    async def _applied(
        self,
        invoice_key: str,
        event_id: str | None,
        event_type: str,
        apply: Callable[[asyncpg.pool.PoolConnectionProxy], Awaitable[Outcome]],
        *,
        first: tuple[str, ...] = (),
    ) -> Outcome:
        """Runs `apply` under the lock of `invoice_key` (an invoice, or the payment intent
        of a refund), once per event: `duplicate` for an event recorded before, else its
        outcome, stored with the event. The keys `first` are locked before it."""
        # Read committed, whatever the database's default: the lock and the ON CONFLICT
        # clauses rely on seeing what committed while waiting.
        with _recordable():
            async with self._connection() as conn, conn.transaction(isolation="read_committed"):
                for key in first:
                    await conn.execute(_LOCK_INVOICE, key)
                if event_id is None:
                    await conn.execute(_LOCK_INVOICE, invoice_key)
                elif await conn.fetchval(_RECORD_EVENT, event_id, event_type, invoice_key) is None:
                    return Outcome.DUPLICATE
                outcome = await apply(conn)
                if event_id is not None:
                    await conn.execute(_SET_EVENT_OUTCOME, event_id, outcome)
        return outcome

    @staticmethod
    async def _apply(
        conn: asyncpg.pool.PoolConnectionProxy, invoice: StripeInvoice, stripe_time: int, *, deleted: bool
    ) -> Outcome:
        key = invoice.stripe_invoice_id
        if deleted:
            await conn.execute(_MARK_DELETED, key)
            await conn.execute(_DELETE_INVOICE, key)
            return Outcome.DELETED
        if await conn.fetchval(_IS_DELETED, key):
            return Outcome.IGNORED_DELETED
        now = record_time()
        created = now if invoice.created is None else record_time(datetime.fromtimestamp(invoice.created, UTC))
        user = invoice.user
        values = (user.id, user.name, invoice.status, invoice.amount, invoice.currency, invoice.invoice_pdf, created)
        if await conn.fetchval(INSERT_RECORD, new_record_id(), key, *values, now, stripe_time) is not None:
            await conn.execute(credit_notes.REFRESH_TOTALS, key, now)  # notes that arrived before it
            return Outcome.CREATED
        current = await conn.fetchrow(_LOCK_FROM_STRIPE, key)
        if current is None:  # deleted by a concurrent invoice.deleted
            return Outcome.IGNORED_DELETED
        stored = StoredState(current["status"], current["amount"], current["invoice_pdf"], current["stripe_updated"])
        if not stored.overtaken_by(invoice, stripe_time):
            return Outcome.STALE
        # What an object leaves out (an older API version, a partial payload) the record keeps.
        if invoice.currency is None:
            values = (*values[:4], current["currency"], *values[5:])
        if invoice.created is None:
            values = (*values[:6], current["created_at"])
        if tuple(current)[:7] == values:
            return Outcome.UNCHANGED
        await conn.execute(_UPDATE_FROM_STRIPE, key, *values, now, max(stripe_time, current["stripe_updated"]))
        return Outcome.UPDATED
