"""The change feed's statements (the table and the trigger that fills it are in migration
0006): reading it in position order, never past a transaction that may still commit;
replaying a resumed watch; pruning what is older than the retention; and the LISTEN
connection that wakes a reader early. Callers get domain Changes and positions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

import asyncpg

from service.domain import InvalidArgument, Invoice, OutOfRange, User
from service.feed import Change, ChangeKind, FeedPosition, FeedRead, WatchFilter
from service.storage.connecting import CONNECTION_ERRORS, Connector
from service.storage.pool import Pooled

log = logging.getLogger(__name__)

# The trigger's NOTIFY channel, and the trigger that feeds new records (migration 0006).
CHANNEL = "invoice_changes"
INSERT_TRIGGER = "invoices_changes_insert"
# How often the LISTEN connection is checked with a statement.
LISTEN_CHECK_S = 30.0
_LISTEN_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
_XMIN = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_XMAX = "pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
_CHANGE = (
    "seq, xact, kind, changed_at, id, stripe_invoice_id, user_id, user_name, status, amount, currency,"
    " invoice_pdf, created_at, updated_at, amount_refunded, amount_credited"
)
# Everything after `after` written by transactions older than this statement's snapshot's
# xmin: all of those have finished, so nothing can still commit below the answer's end.
# And the records that committed changes from younger transactions name (held back
# behind an older one still open): the record cache must not serve them meanwhile.
READ_CHANGES = f"""
    SELECT s.xmin, s.xmax, h.ids AS held_ids, h.stripe_ids AS held_stripe_ids, c.*
    FROM (SELECT {_XMIN} AS xmin, {_XMAX} AS xmax) AS s
    CROSS JOIN LATERAL (
        SELECT array_agg(id) AS ids, array_agg(stripe_invoice_id) AS stripe_ids
        FROM (SELECT id, stripe_invoice_id FROM invoice_changes WHERE xact >= s.xmin LIMIT $3) AS young) AS h
    LEFT JOIN LATERAL (
        SELECT {_CHANGE} FROM invoice_changes WHERE (xact, seq) > ($1, $2) AND xact < s.xmin
        ORDER BY xact, seq LIMIT $3) AS c ON true"""  # noqa: S608 - constants
# A watch of one invoice names it by the service's id or Stripe's (`in_...`): one column each.
_FILTERS = {
    "user_id": "user_id = ${0}",
    "status": "status = ${0}",
}
_BY_RECORD_ID = "id = ${0}"
_BY_STRIPE_ID = "stripe_invoice_id = ${0}"
_BOUNDS = f"SELECT h.xact, h.seq, {_XMAX} AS xmax FROM invoice_changes_horizon AS h"  # noqa: S608 - constants
_PRUNE = """
    DELETE FROM invoice_changes WHERE seq IN (
        SELECT seq FROM invoice_changes WHERE changed_at < $1 ORDER BY xact, seq LIMIT $2)
    RETURNING xact, seq"""
_ADVANCE_HORIZON = "UPDATE invoice_changes_horizon SET xact = $1, seq = $2 WHERE (xact, seq) < ($1, $2)"

_GONE = "resume_token: the changes after it are older than the retention and gone; list, then watch again from now"


def invoice_of(row: asyncpg.Record) -> Invoice:
    """A record's row, or a change's (which holds the record as the change left it)."""
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
        amount_refunded=row["amount_refunded"],
        amount_credited=row["amount_credited"],
    )


def _change(row: asyncpg.Record) -> Change:
    position = FeedPosition(row["xact"], row["seq"])
    return Change(position, ChangeKind(row["kind"]), invoice_of(row), row["changed_at"])


class ChangeFeed(Pooled):
    """The feed's reads and its pruning, over the store's pool."""

    async def feed_head(self) -> FeedPosition:
        """Now, as a position: every change after it is one that had not finished yet."""
        async with self._connection() as conn:
            return FeedPosition(await conn.fetchval(f"SELECT {_XMIN}"), 0)

    async def read_changes(self, after: FeedPosition, limit: int) -> FeedRead:
        """Up to `limit` changes after `after`, in order, and the position the answer
        reaches: the last change's when `limit` cut it short, else the snapshot's xmin,
        below which nothing can appear any more; with the records of up to `limit`
        committed changes held back above it. OUT_OF_RANGE if `after` is past the
        database's newest transaction (it failed over to one behind it)."""
        async with self._connection() as conn:
            rows = await conn.fetch(READ_CHANGES, after.xact, after.seq, limit)
        first = rows[0]
        if after.xact > first["xmax"]:
            raise OutOfRange(f"position {after} is past the database's next transaction {first['xmax']}")
        changes = [_change(r) for r in rows if r["seq"] is not None]
        reached = changes[-1].position if len(changes) == limit else FeedPosition(first["xmin"], 0)
        held_ids, held_stripe_ids = first["held_ids"] or [], first["held_stripe_ids"] or []
        return FeedRead(
            changes,
            max(reached, after),
            held=(*held_ids, *held_stripe_ids),
            complete=len(changes) < limit and len(held_ids) < limit,
        )

    async def check_resumable(self, after: FeedPosition) -> None:
        """OUT_OF_RANGE unless every change after `after` is still kept; INVALID_ARGUMENT
        if `after` is past the feed's newest transaction (no token of this feed can be)."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_BOUNDS)
        if row is None:
            raise RuntimeError("migration 0006 left no horizon row")
        if after < FeedPosition(row["xact"], row["seq"]):
            raise OutOfRange(_GONE)
        if after.xact > row["xmax"]:
            raise InvalidArgument(
                "resume_token",
                "not a token of this feed: it is ahead of its newest change (another database's, or from before"
                " this one was restored from a backup); list, then watch again from now",
            )

    async def replay_changes(
        self, after: FeedPosition, upto: FeedPosition, match: WatchFilter, limit: int
    ) -> list[Change]:
        """Up to `limit` changes in (`after`, `upto`] that `match`, in order; OUT_OF_RANGE
        if pruning has removed some after `after` (read in the same snapshot)."""
        args: list[object] = [after.xact, after.seq, upto.xact, upto.seq]
        where = ["(xact, seq) > ($1, $2)", "(xact, seq) <= ($3, $4)"]
        fragments = dict(_FILTERS)
        if match.invoice_id is not None:
            fragments["invoice_id"] = _BY_STRIPE_ID if match.invoice_id.startswith("in_") else _BY_RECORD_ID
        for name, fragment in fragments.items():
            value = getattr(match, name)
            if value is not None:
                args.append(value)
                where.append(fragment.format(len(args)))
        args.append(limit)
        sql = (
            f"SELECT h.xact AS horizon_xact, h.seq AS horizon_seq, c.* FROM invoice_changes_horizon AS h"  # noqa: S608 - constant fragments, values are $n
            f" LEFT JOIN LATERAL (SELECT {_CHANGE} FROM invoice_changes WHERE {' AND '.join(where)}"
            f" ORDER BY xact, seq LIMIT ${len(args)}) AS c ON true"
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *args)
        if after < FeedPosition(rows[0]["horizon_xact"], rows[0]["horizon_seq"]):
            raise OutOfRange(_GONE)
        return [_change(r) for r in rows if r["seq"] is not None]

    async def prune_changes(self, older_than: datetime, limit: int) -> int:
        """Deletes up to `limit` of the oldest changes written before `older_than` and moves
        the horizon past them, in one transaction; answers how many went."""
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch(_PRUNE, older_than, limit)
            if rows:
                newest = max(FeedPosition(r["xact"], r["seq"]) for r in rows)
                await conn.execute(_ADVANCE_HORIZON, newest.xact, newest.seq)
        return len(rows)


async def listen(dsn: str, wake: Callable[[], None], *, connector: Connector | None = None) -> None:
    """Holds a connection of its own LISTENing to the feed's channel, calling `wake` once
    it listens and on each notification, until the connection is lost (then returns; at once if Postgres
    cannot be reached). Not a pooled connection: LISTEN is session state, which a pooled
    one must not carry back, and which PgBouncer in transaction mode cannot keep. Opened
    like the pool's (`connector`: host by host, with keepalives)."""
    try:
        conn: asyncpg.Connection = await (connector or Connector())(dsn)
    except _LISTEN_ERRORS as exc:
        log.warning("cannot LISTEN for changes now: %s", type(exc).__name__)
        return
    lost = asyncio.Event()
    conn.add_termination_listener(lambda _: lost.set())
    try:
        await conn.add_listener(CHANNEL, lambda *_: wake())
        wake()  # what committed before the LISTEN was announced to nobody
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_CHECK_S):
                    await lost.wait()
            if not lost.is_set():  # a network that went silent shows only when asked
                await conn.execute("SELECT 1", timeout=5)
    except _LISTEN_ERRORS as exc:
        log.warning("the LISTEN connection was lost: %s", type(exc).__name__)
    finally:
        conn.terminate()
