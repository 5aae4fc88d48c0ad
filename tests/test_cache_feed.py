"""The record cache (service/cache.py) kept current by the real feed reader over the real
Postgres: a commit made elsewhere, a write transaction holding the feed back and this
process's own writes must each show; without LISTEN it serves nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial

import asyncpg
import pytest

from service.cache import BYPASS, HIT, MISS, CachedReads, ForgettingWrites, RecordCache
from service.domain import Invoice, StripeInvoice, User
from service.feed import Change, ChangeKind, FeedPosition, FeedRead, WatchFilter
from service.storage import Storage, changes
from service.watch import Watches, WatchLimits
from tests.helpers import make_invoice, poll_until, save_invoices, until


def _count(outcomes: Counter[str], outcome: str) -> None:
    outcomes[outcome] += 1


@pytest.fixture
def outcomes() -> Counter[str]:
    return Counter()


@pytest.fixture
async def cached(
    store: Storage, database: str, outcomes: Counter[str]
) -> AsyncIterator[tuple[CachedReads, Watches, RecordCache]]:
    cache = RecordCache(100, 1.0, observe=partial(_count, outcomes))
    watches = Watches(store, WatchLimits(poll_s=0.5), listen=partial(changes.listen, database), follower=cache)
    watches.start()
    await until(lambda: cache.serving, "the reader to LISTEN and catch up")
    yield CachedReads(store, cache), watches, cache
    await watches.close()


def _stripe(invoice: Invoice, status: str) -> StripeInvoice:
    return StripeInvoice(invoice.stripe_invoice_id, status, invoice.amount, "", User("u1", "Ada"), "eur", 1_700_000_000)


async def _handed_out(watches: Watches, store: Storage, invoice: Invoice) -> AsyncGenerator[Change, None]:
    """A watch of the invoice, once the reader has handed out its creation: the cache, its
    follower, heard of that read first (the caller closes the watch)."""
    watch = watches.watch(None, WatchFilter(invoice_id=invoice.id))
    async with asyncio.timeout(20):
        await anext(watch)  # the bookmark: watching from now
        await save_invoices(store, [invoice])
        assert (await anext(watch)).kind is ChangeKind.CREATED
    return watch


async def _primed(
    cached: tuple[CachedReads, Watches, RecordCache], store: Storage, outcomes: Counter[str]
) -> tuple[Invoice, AsyncGenerator[Change, None]]:
    """An open invoice the cache holds once the reader has applied its creation, and a
    watch of it (the caller closes it)."""
    reads, watches, _ = cached
    invoice = make_invoice(1, status="open")
    watch = await _handed_out(watches, store, invoice)
    for _ in range(3):
        assert (await reads.get_invoice(invoice.id)).status == "open"
    assert outcomes == {MISS: 1, HIT: 2}
    return invoice, watch


async def test_a_commit_made_elsewhere_shows_once_the_reader_applies_it(
    cached: tuple[CachedReads, Watches, RecordCache], store: Storage, outcomes: Counter[str]
) -> None:
    reads, _, _ = cached
    invoice, watch = await _primed(cached, store, outcomes)
    async with asyncio.timeout(20), contextlib.aclosing(watch):
        # As the sidecar records a webhook: another connection, another transaction.
        await store.apply_stripe_invoice(_stripe(invoice, "paid"), stripe_time=1_700_000_100)
        change = await anext(watch)
    assert change.invoice is not None and change.invoice.status == "paid"
    # A watcher told of a change never reads the record as it was before it.
    assert (await reads.get_invoice(invoice.stripe_invoice_id)).status == "paid"


async def test_a_change_held_back_behind_an_open_transaction_still_shows(
    cached: tuple[CachedReads, Watches, RecordCache], store: Storage, database: str, outcomes: Counter[str]
) -> None:
    """An older write transaction stays open: the feed cannot hand out the younger commit
    (the older one may yet commit changes before it), but Get must not serve what it replaced."""
    reads, _, _ = cached
    invoice, watch = await _primed(cached, store, outcomes)
    older: asyncpg.Connection = await asyncpg.connect(database)
    try:
        async with contextlib.aclosing(watch), older.transaction():
            await older.fetchval("SELECT pg_current_xact_id()")  # holds the feed's xmin back
            await store.apply_stripe_invoice(_stripe(invoice, "paid"), stripe_time=1_700_000_100)

            async def shows_paid() -> bool | None:
                return (await reads.get_invoice(invoice.id)).status == "paid" or None

            await poll_until(shows_paid, "Get to show the held-back commit", timeout_s=5)
            assert outcomes[BYPASS] == 0  # read again because it was named, not because the cache stopped
            with pytest.raises(TimeoutError):  # the feed is indeed held back
                async with asyncio.timeout(0.3):
                    await anext(watch)
    finally:
        await older.close()


async def test_a_write_of_this_process_shows_to_the_next_get_at_once(store: Storage) -> None:
    """No reader here: only the write itself can make the cache forget what it changed."""
    cache = RecordCache(100, 1.0, clock=lambda: 100.0)
    cache.listening(True)
    cache.applied(FeedRead([], FeedPosition(1, 0)), 100.0)
    reads = CachedReads(store, cache)
    invoice = make_invoice(1, status="open")
    await save_invoices(store, [invoice])
    assert (await reads.get_invoice(invoice.id)).status == "open"
    await ForgettingWrites(store, cache).record_stripe_invoice(_stripe(invoice, "void"), stripe_time=1_700_000_100)
    assert (await reads.get_invoice(invoice.id)).status == "void"
    assert (await reads.get_invoice(invoice.stripe_invoice_id)).status == "void"


async def test_a_read_of_the_feed_names_the_records_held_back_and_whether_it_saw_them_all(
    store: Storage, database: str
) -> None:
    head = await store.feed_head()
    invoices = [make_invoice(n) for n in range(3)]
    older: asyncpg.Connection = await asyncpg.connect(database)
    try:
        async with older.transaction():
            await older.fetchval("SELECT pg_current_xact_id()")
            await save_invoices(store, invoices)  # three transactions, younger than `older`
            cut = await store.read_changes(head, 2)
            whole = await store.read_changes(head, 5)
    finally:
        await older.close()
    assert cut.changes == [] and whole.changes == []
    assert not cut.complete and len(cut.held) == 4  # two records, each by both ids
    assert whole.complete
    assert set(whole.held) == {k for i in invoices for k in (i.id, i.stripe_invoice_id)}
    after = await store.read_changes(head, 5)  # `older` ended: they are handed out now
    assert [c.invoice.id for c in after.changes if c.invoice] == [i.id for i in invoices]
    assert after.held == () and after.complete


async def test_without_listen_every_get_reads_postgres(store: Storage, outcomes: Counter[str]) -> None:
    cache = RecordCache(100, 1.0, observe=partial(_count, outcomes))
    watches = Watches(store, WatchLimits(poll_s=0.05), follower=cache)  # as behind PgBouncer
    watches.start()
    try:
        invoice = make_invoice(1)
        await (await _handed_out(watches, store, invoice)).aclose()  # the cache followed the reader past it
        reads = CachedReads(store, cache)
        for _ in range(3):
            await reads.get_invoice(invoice.id)
        assert outcomes == {BYPASS: 3}
        cache.listening(True)  # the one thing it lacked: the same reads of the feed now let it serve
        await reads.get_invoice(invoice.id)
        assert outcomes == {BYPASS: 3, MISS: 1}
    finally:
        await watches.close()
