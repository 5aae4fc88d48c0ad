"""`make bench`'s database: BENCH_INVOICES invoices over two years loaded by COPY with a
realistic spread (users, Stripe's usual status mix, times to the millisecond), and the
query plans of the statements the store runs on it, kept with the results."""

from __future__ import annotations

import random
import string
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.report import DEEP_PAGE, DEEPEST_NUMBERED, PAGE_SIZE
from service import pagetoken, storage
from service.domain import Cursor, Filters, Page, new_record_id
from service.feed import FeedPosition
from service.storage import changes
from service.storage.postgres import GET_BY_ID, RECORD_COLUMNS, list_query

STATUSES = (["paid"] * 80) + (["open"] * 10) + (["void"] * 4) + (["uncollectible"] * 3) + (["draft"] * 3)


def _stripe_id(rng: random.Random) -> str:
    return "in_" + "".join(rng.choices(string.ascii_letters + string.digits, k=14))


def rows(n: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    """n invoices over two years: 20,000 users, Stripe's usual status mix, times to the ms."""
    rng = random.Random(seed)  # noqa: S311 - data shape, not secrets
    start = datetime.now(UTC) - timedelta(days=730)
    for _ in range(n):
        created = start + timedelta(milliseconds=rng.randrange(730 * 86_400_000) + 1)
        user = rng.randrange(20_000)
        status = rng.choice(STATUSES)
        amount = rng.choice((900, 1900, 3300, 4900, 9900, 19900)) * rng.randint(1, 3)
        sid = _stripe_id(rng)
        pdf = f"https://pay.stripe.com/invoice/acct_bench/{sid}/pdf" if status != "draft" else ""
        updated = created + timedelta(milliseconds=rng.randrange(1, 86_400_000))
        yield (new_record_id(), sid, f"user{user:05d}", f"User {user}", status, amount, "eur", pdf, created, updated)


async def load(dsn: str, n: int) -> dict[str, Any]:
    url = await storage.fresh_database(dsn, "bench")
    pool = await storage.connect(url, max_size=1, command_timeout=600)
    started = time.monotonic()
    columns = list(RECORD_COLUMNS)  # the order rows() yields them in
    async with pool.acquire() as conn:
        # The invoices are history, as if recorded long ago: not in the change feed, which
        # would have pruned them by now (and feeding a million rows doubles the load's time).
        await conn.execute(f"ALTER TABLE invoices DISABLE TRIGGER {changes.INSERT_TRIGGER}")
        await conn.copy_records_to_table("invoices", records=rows(n), columns=columns)
        await conn.execute(f"ALTER TABLE invoices ENABLE TRIGGER {changes.INSERT_TRIGGER}")
        await conn.execute("ANALYZE invoices")
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM invoices TABLESAMPLE SYSTEM (1) LIMIT 500")]
        ids += [r["stripe_invoice_id"] for r in await conn.fetch("SELECT stripe_invoice_id FROM invoices LIMIT 500")]
        deep = await conn.fetchrow(
            "SELECT created_at, id FROM invoices ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
            DEEP_PAGE * PAGE_SIZE - PAGE_SIZE - 1,
        )
        user = await conn.fetchval("SELECT user_id FROM invoices LIMIT 1")
        explained = _explained(deep, user, ids[0]).items()
        plans = {name: await _plan(conn, sql, *args) for name, (sql, args) in explained}
    await pool.close()
    token = pagetoken.encode(Cursor(deep["created_at"], deep["id"]), Filters()) if deep else ""
    return {"url": url, "ids": ids, "token": token, "load_s": round(time.monotonic() - started, 1), "plans": plans}


def _explained(deep: Any, user: str, some_id: str) -> dict[str, tuple[str, list[Any]]]:
    """The statements the store runs, taken from it, with the arguments of each case."""
    after = Cursor(deep["created_at"], deep["id"]) if deep else Cursor(datetime.now(UTC), "0" * 24)
    year_ago = datetime.now(UTC) - timedelta(days=365)
    feed_head = FeedPosition(2**62, 0)  # past every change: the reader's idle read
    return {
        "page 1": list_query(Page(1, PAGE_SIZE, keyset=True)),
        "deep page_token": list_query(Page(1, PAGE_SIZE, after=after, keyset=True)),
        "deepest page/limit": list_query(Page(DEEPEST_NUMBERED, PAGE_SIZE)),
        "status filter": list_query(Page(1, PAGE_SIZE, Filters(status="uncollectible"), keyset=True)),
        "user filter": list_query(Page(1, PAGE_SIZE, Filters(user_id=user), keyset=True)),
        "created filter": list_query(Page(1, PAGE_SIZE, Filters(created_before=year_ago), keyset=True)),
        "get by id": (GET_BY_ID, [some_id]),
        "change feed read": (changes.READ_CHANGES, [feed_head.xact, feed_head.seq, 500]),
    }


async def _plan(conn: asyncpg.pool.PoolConnectionProxy, sql: str, *args: Any) -> str:
    lines = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS OFF, TIMING ON) {sql}", *args)
    return "\n".join(r[0] for r in lines)
