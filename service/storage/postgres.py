"""The invoice store on Postgres. Every SQL statement of the service lives here; callers
get domain objects and domain errors, never asyncpg types."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg

from service.domain import (
    CREATE_STEPS,
    AlreadyExists,
    CreateClaim,
    CreateInProgress,
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
    User,
    new_record_id,
)
from service.storage import migrations

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

# Statements are whole literals, except the list, whose WHERE is assembled from the
# constant fragments below (values are always $n parameters).
# The record's columns, written once: the order of _invoice's reads and of the VALUES below.
_COLUMNS = "id, stripe_invoice_id, user_id, user_name, status, amount, currency, invoice_pdf, created_at, updated_at"
_SELECT = f"SELECT {_COLUMNS}"
_ORDER = "ORDER BY created_at DESC, id DESC"
_FILTERS = {
    "status": "status = ${}",
    "user_id": "user_id = ${}",
    "created_after": "created_at >= ${}",
    "created_before": "created_at < ${}",
}
_AFTER = "(created_at, id) < (${}, ${})"
_COUNT_ALL = "SELECT coalesce(sum(n), 0)::bigint FROM invoice_counts"
_COUNT_STATUS = "SELECT coalesce(sum(n), 0)::bigint FROM invoice_counts WHERE status = $1"
_GET_BY_ID = f"{_SELECT} FROM invoices WHERE id = $1"
_GET_BY_STRIPE_ID = f"{_SELECT} FROM invoices WHERE stripe_invoice_id = $1"
# A Create's idempotency key: a new key is claimed by its first attempt; a key whose
# attempts did not finish is claimed again (attempt + 1) once no attempt holds its lease.
# Read committed: ON CONFLICT then sees, and locks, the row a concurrent claim committed.
_CLAIM_CREATE = """
    INSERT INTO create_requests AS r (idempotency_key, fingerprint, lease_until, step)
    VALUES ($1, $2, now() + make_interval(secs => $3), 'claimed')
    ON CONFLICT (idempotency_key) DO UPDATE SET
        attempt = r.attempt + 1, lease_until = EXCLUDED.lease_until, updated_at = now()
    WHERE r.fingerprint = ANY($4::text[]) AND r.response IS NULL
        AND (r.lease_until IS NULL OR r.lease_until < now())
    RETURNING attempt, stripe_key_gen, stripe_invoice_id, step, created_at"""
_GET_CREATE = """
    SELECT fingerprint, response, coalesce(lease_until > now(), false) AS leased
    FROM create_requests WHERE idempotency_key = $1"""
# Progress is fenced by the attempt: one whose lease another attempt took over records nothing.
# A step never goes back (a resumed attempt renews its lease with the step it found done).
_RECORD_CREATE_STEP = """
    UPDATE create_requests SET
        step = CASE WHEN array_position($6::text[], $3) > array_position($6::text[], step) THEN $3 ELSE step END,
        stripe_invoice_id = coalesce($4, stripe_invoice_id),
        lease_until = now() + make_interval(secs => $5), updated_at = now()
    WHERE idempotency_key = $1 AND attempt = $2 AND response IS NULL"""
_FINISH_CREATE = """
    UPDATE create_requests SET stripe_invoice_id = $3, response = $4, step = 'done', completed_at = now(),
        lease_until = NULL, updated_at = now()
    WHERE idempotency_key = $1 AND attempt = $2 AND response IS NULL"""
_RELEASE_CREATE = """
    UPDATE create_requests SET lease_until = NULL, updated_at = now()
    WHERE idempotency_key = $1 AND attempt = $2 AND response IS NULL"""
_NEW_STRIPE_KEYS = """
    UPDATE create_requests SET stripe_key_gen = stripe_key_gen + 1, updated_at = now()
    WHERE idempotency_key = $1 AND attempt = $2 AND response IS NULL
    RETURNING stripe_key_gen"""
_RECORDED_INVOICES = "SELECT stripe_invoice_id FROM create_requests WHERE stripe_invoice_id = ANY($1::text[])"
# The first of identical keyless requests within the window holds the fingerprint.
# ... and keeps it past the window while that key's attempt still runs.
_CLAIM_KEYLESS = """
    INSERT INTO keyless_creates AS k (fingerprint, idempotency_key) VALUES ($1, $2)
    ON CONFLICT (fingerprint) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key, claimed_at = now()
    WHERE k.claimed_at < now() - make_interval(secs => $3)
        AND NOT EXISTS (
            SELECT 1 FROM create_requests r
            WHERE r.idempotency_key = k.idempotency_key AND r.response IS NULL AND r.lease_until > now())
    RETURNING idempotency_key"""
_GET_KEYLESS = "SELECT idempotency_key FROM keyless_creates WHERE fingerprint = $1"

# Events of one invoice are applied one at a time, under a transaction-scoped advisory lock
# on its Stripe id (two-key form, its own key space; a hash collision only serializes two
# invoices). Row locks cannot do it: before `invoice.created` is applied there is no row,
# and a concurrent `invoice.deleted` would not be seen until it committed.
_INVOICE_LOCKS = 0x1A70
_LOCK_INVOICE = f"SELECT pg_advisory_xact_lock({_INVOICE_LOCKS}, hashtext($1))"
_RECORD_EVENT = f"""
    WITH locked AS (SELECT pg_advisory_xact_lock({_INVOICE_LOCKS}, hashtext($3)))
    INSERT INTO stripe_events (id, type, stripe_invoice_id, outcome) SELECT $1, $2, $3, 'pending' FROM locked
    ON CONFLICT (id) DO NOTHING RETURNING id"""  # noqa: S608 - a constant, values are $n
_SET_EVENT_OUTCOME = "UPDATE stripe_events SET outcome = $2 WHERE id = $1"
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
    return where, args


def _clause(where: list[str]) -> str:
    return f" WHERE {' AND '.join(where)}" if where else ""


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
        currency=row["currency"],
    )


class Storage:
    def __init__(self, pool: asyncpg.Pool, *, observe_wait: Callable[[float], None] | None = None) -> None:
        self._pool = pool
        self._observe_wait = observe_wait

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        try:
            started = time.perf_counter()
            async with self._pool.acquire() as conn:
                if self._observe_wait is not None:
                    self._observe_wait(time.perf_counter() - started)
                yield conn
        except CONNECTION_ERRORS as exc:
            log.warning("database unavailable: %s", type(exc).__name__)
            raise Unavailable("the invoice store is unavailable; retry later") from exc
        except asyncpg.UndefinedTableError as exc:
            # The server started before its migrations ran; health still says NOT_SERVING.
            raise Unavailable("the invoice store's schema is not migrated yet; retry later") from exc

    async def open_connections(self, n: int) -> None:
        """Opens up to `n` pooled connections now, so the first calls do not pay for them
        (a warm-up: like any idle pooled connection they close after 300 s unused)."""
        async with AsyncExitStack() as held:
            for _ in range(min(n, self._pool.get_max_size())):
                await held.enter_async_context(self._connection())

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
        where, args = _where(page.filters)
        count_sql = f"SELECT count(*) FROM invoices{_clause(where)}"  # noqa: S608 - constant fragments
        if page.filters.user_id is None and page.filters.created_after is None and page.filters.created_before is None:
            count_sql = _COUNT_STATUS if page.filters.status else _COUNT_ALL
        if page.after is not None:
            args += [page.after.created_at, page.after.id]
            where = [*where, _AFTER.format(len(args) - 1, len(args))]
        args += [page.limit + 1, page.offset]
        n = len(args)
        rows_sql = f"{_SELECT} FROM invoices{_clause(where)} {_ORDER} LIMIT ${n - 1} OFFSET ${n}"
        sql = f"SELECT t.total, r.* FROM ({count_sql}) AS t(total) LEFT JOIN LATERAL ({rows_sql}) AS r ON true"  # noqa: S608 - constant fragments, values are $n
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *args)
        total = rows[0]["total"]
        rows = [r for r in rows if r["id"] is not None]
        invoices = [_invoice(r) for r in rows[: page.limit]]
        more = len(rows) > page.limit
        next_after = Cursor(invoices[-1].created_at, invoices[-1].id) if more else None
        return InvoicePage(invoices=invoices, total=total, next_after=next_after)

    async def get_invoice(self, key: str) -> Invoice:
        """Finds an invoice by the service's id or, for `in_...` keys, by Stripe's id."""
        query = _GET_BY_STRIPE_ID if key.startswith("in_") else _GET_BY_ID
        async with self._connection() as conn:
            row = await conn.fetchrow(query, key)
        if row is None:
            raise NotFound(f"invoice {key} not found")
        return _invoice(row)

    async def claim_create(
        self, key: str, fingerprints: tuple[str, ...], lease_s: float
    ) -> dict[str, Any] | CreateClaim:
        """Claims `key` for an attempt of the request whose fingerprint is the first of
        `fingerprints` (the others: the same request's older encodings). Answers the
        finished request's stored answer, or the claim with what earlier attempts
        recorded; refuses the key for another request, and while another attempt holds it."""
        async with self._connection() as conn, conn.transaction(isolation="read_committed"):
            row = await conn.fetchrow(_CLAIM_CREATE, key, fingerprints[0], lease_s, list(fingerprints))
            if row is not None:
                return CreateClaim(
                    row["attempt"], row["stripe_key_gen"], row["stripe_invoice_id"], row["step"], row["created_at"]
                )
            row = await conn.fetchrow(_GET_CREATE, key)
        if row is None or row["fingerprint"] not in fingerprints:
            raise AlreadyExists("this Idempotency-Key was already used for a different request")
        if row["response"] is not None:
            return dict(json.loads(row["response"]))
        if row["leased"]:
            raise CreateInProgress("a request with this Idempotency-Key is in progress; retry later")
        raise CreateInProgress("this Idempotency-Key was just released; retry")

    async def record_create_step(
        self, key: str, attempt: int, step: str, stripe_invoice_id: str | None, lease_s: float
    ) -> None:
        """Records a step done and renews the attempt's lease; an attempt that lost the key
        to another (its lease ran out) is stopped here, before its next Stripe call."""
        async with self._connection() as conn:
            status = await conn.execute(
                _RECORD_CREATE_STEP, key, attempt, step, stripe_invoice_id, lease_s, list(CREATE_STEPS)
            )
        if status == "UPDATE 0":
            raise CreateInProgress("another attempt took over this Idempotency-Key; retry later")

    async def finish_create(self, key: str, attempt: int, stripe_invoice_id: str, response: dict[str, Any]) -> None:
        async with self._connection() as conn:
            status = await conn.execute(_FINISH_CREATE, key, attempt, stripe_invoice_id, json.dumps(response))
        if status == "UPDATE 0":
            log.warning("a finished attempt had lost its key", extra={"invoice": stripe_invoice_id})

    async def release_create(self, key: str, attempt: int) -> None:
        """Ends an attempt that failed, so that the caller's retry may claim the key now."""
        async with self._connection() as conn:
            await conn.execute(_RELEASE_CREATE, key, attempt)

    async def new_stripe_keys(self, key: str, attempt: int) -> int:
        """The next generation of the key's Stripe keys, for this attempt and those after."""
        async with self._connection() as conn:
            generation = await conn.fetchval(_NEW_STRIPE_KEYS, key, attempt)
        if generation is None:
            raise CreateInProgress("another attempt took over this Idempotency-Key; retry later")
        return int(generation)

    async def recorded_invoices(self, stripe_invoice_ids: list[str]) -> set[str]:
        """Which of these Stripe invoices a Create's key already names."""
        async with self._connection() as conn:
            rows = await conn.fetch(_RECORDED_INVOICES, stripe_invoice_ids)
        return {row["stripe_invoice_id"] for row in rows}

    async def claim_keyless(self, fingerprint: str, key: str, window_s: float) -> str:
        """The key of the first identical keyless request within `window_s`, or `key` if
        there is none (it is then the first)."""
        async with self._connection() as conn:
            claimed = await conn.fetchval(_CLAIM_KEYLESS, fingerprint, key, window_s)
            if claimed is None:  # the other request committed first: read what it holds
                claimed = await conn.fetchval(_GET_KEYLESS, fingerprint)
        return str(claimed or key)

    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice:
        """Applies what Stripe answered to a call of the service's own (Pay, Void) and
        answers the record as that transaction left it."""
        key = invoice.stripe_invoice_id
        with _recordable():
            async with self._connection() as conn, conn.transaction(isolation="read_committed"):
                await conn.execute(_LOCK_INVOICE, key)
                await self._apply(conn, invoice, stripe_time, deleted=False)
                row = await conn.fetchrow(_GET_BY_STRIPE_ID, key)
        if row is None:
            raise NotFound(f"invoice {key} was deleted in Stripe")
        return _invoice(row)

    async def apply_stripe_invoice(
        self, invoice: StripeInvoice, *, stripe_time: int, event_id: str | None = None, event_type: str = ""
    ) -> Outcome:
        """Brings the record to what Stripe said at `stripe_time`, in one transaction with
        the event's record, so each event counts once. Returns the outcome: `created`,
        `updated`, `unchanged`, `duplicate` (event seen before), `stale` (older than the
        record) or `deleted`/`ignored-deleted` for invoices Stripe deleted."""
        key = invoice.stripe_invoice_id
        # Read committed, whatever the database's default: the lock and the ON CONFLICT
        # clauses rely on seeing what committed while waiting.
        with _recordable():
            async with self._connection() as conn, conn.transaction(isolation="read_committed"):
                if event_id is None:
                    await conn.execute(_LOCK_INVOICE, key)
                elif await conn.fetchval(_RECORD_EVENT, event_id, event_type, key) is None:
                    return Outcome.DUPLICATE
                outcome = await self._apply(conn, invoice, stripe_time, deleted=event_type == "invoice.deleted")
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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's release hook. The service sets no session state (no SET, LISTEN, cursors
    or session advisory locks; open transactions are still rolled back by asyncpg), so
    the default RESET ALL query, one more round trip on every release, buys nothing: the
    GetInvoice profile showed it at 7% of the server's time."""


async def connect(dsn: str, *, max_size: int, command_timeout: float, pooler: str = "none") -> asyncpg.Pool:
    """Creates the pool without connecting, so the server starts (NOT_SERVING) while
    Postgres is still away; `Storage.open_connections` opens DB_POOL_MIN_SIZE of them once it
    answers (asyncpg refuses a floor above the initial size). Behind PgBouncer in transaction mode
    (`pooler="pgbouncer"`) a connection's prepared statements may live on another
    server session, so asyncpg's statement cache is off."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        init_size=0,
        min_size=0,
        max_size=max_size,
        command_timeout=command_timeout,
        reset=_keep_session,
        statement_cache_size=0 if pooler == "pgbouncer" else 100,
    )
    return pool
