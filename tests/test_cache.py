"""The record cache (service/cache.py): first on its own, where the test decides when a
read of Postgres returns and what the feed's reader applies meanwhile; then kept current
by the real reader over the real Postgres, where a commit made elsewhere, a write
transaction holding the feed back and this process's own writes must each show."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial

import asyncpg
import pytest

from service.cache import BYPASS, HIT, MAX_AGE_S, MISS, CachedReads, ForgettingWrites, RecordCache
from service.credit_notes import NoteStatus, StripeCreditNote
from service.domain import Invoice, NotFound, StripeInvoice, User
from service.feed import Change, ChangeKind, FeedPosition, FeedRead, WatchFilter
from service.storage import Storage, changes
from service.watch import Watches, WatchLimits
from tests.helpers import make_invoice, poll_until, save_invoices, until


def _count(outcomes: Counter[str], outcome: str) -> None:
    outcomes[outcome] += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Postgres:
    """What the cache reads on a miss: records by either id, each read counted, and a
    gate that holds a read until the test opens it."""

    def __init__(self, *invoices: Invoice) -> None:
        self.records = {k: i for i in invoices for k in (i.id, i.stripe_invoice_id)}
        self.reads = 0
        self.gate: asyncio.Event | None = None

    def update(self, invoice: Invoice) -> None:
        self.records.update({invoice.id: invoice, invoice.stripe_invoice_id: invoice})

    async def read(self, key: str) -> Invoice:
        self.reads += 1
        found = self.records.get(key)  # what the statement saw when it ran
        if self.gate is not None:
            await self.gate.wait()
        if found is None:
            raise NotFound(key)
        return found


def _change(invoice: Invoice) -> FeedRead:
    return FeedRead([Change(FeedPosition(1, 1), ChangeKind.UPDATED, invoice)], FeedPosition(2, 0))


@pytest.fixture
def outcomes() -> Counter[str]:
    return Counter()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(outcomes: Counter[str], clock: Clock) -> RecordCache:
    cache = RecordCache(100, 1.0, observe=partial(_count, outcomes), clock=clock)
    cache.listening(True)
    cache.applied(FeedRead([], FeedPosition(1, 0)), clock.now)
    return cache


async def test_a_record_read_once_is_served_by_either_id(cache: RecordCache, outcomes: Counter[str]) -> None:
    invoice = make_invoice(1)
    db = Postgres(invoice)
    assert await cache.get(invoice.id, db.read) == invoice
    assert await cache.get(invoice.stripe_invoice_id, db.read) == invoice
    assert await cache.get(invoice.id, db.read) == invoice
    assert db.reads == 1
    assert outcomes == {MISS: 1, HIT: 2}


async def test_a_missing_record_is_not_kept(cache: RecordCache) -> None:
    db = Postgres()
    for _ in range(2):
        with pytest.raises(NotFound):
            await cache.get("in_none", db.read)
    assert db.reads == 2


async def test_a_change_the_reader_applies_is_read_again(cache: RecordCache) -> None:
    invoice = make_invoice(1, status="open")
    db = Postgres(invoice)
    await cache.get(invoice.id, db.read)
    paid = dataclasses.replace(invoice, status="paid")
    db.update(paid)
    cache.applied(_change(paid), 100.0)
    assert await cache.get(invoice.stripe_invoice_id, db.read) == paid
    assert await cache.get(invoice.id, db.read) == paid
    assert db.reads == 2


async def test_a_read_overtaken_by_a_change_is_answered_but_not_kept(cache: RecordCache) -> None:
    """The read saw `open`; the reader applied `paid` before the read returned. Keeping
    what the read saw would serve `open` after the feed said `paid`."""
    invoice = make_invoice(1, status="open")
    db = Postgres(invoice)
    db.gate = asyncio.Event()
    reading = asyncio.create_task(cache.get(invoice.id, db.read))
    await until(lambda: db.reads == 1, "the read to start")
    paid = dataclasses.replace(invoice, status="paid")
    db.update(paid)
    cache.applied(_change(paid), 100.0)
    db.gate.set()
    assert (await reading).status == "open"  # what Postgres answered when asked
    db.gate = None
    assert (await cache.get(invoice.stripe_invoice_id, db.read)).status == "paid"


async def test_a_read_by_one_id_is_overtaken_by_a_change_named_by_both(cache: RecordCache) -> None:
    invoice = make_invoice(1, status="open")
    db = Postgres(invoice)
    db.gate = asyncio.Event()
    reading = asyncio.create_task(cache.get(invoice.stripe_invoice_id, db.read))
    other = make_invoice(2)
    others = asyncio.create_task(cache.get(other.id, Postgres(other).read))  # not overtaken: kept
    await until(lambda: db.reads == 1, "the read to start")
    paid = dataclasses.replace(invoice, status="paid")
    db.update(paid)
    cache.forget((paid.id, paid.stripe_invoice_id))
    db.gate.set()
    await reading
    await others
    db.gate = None
    assert (await cache.get(invoice.id, db.read)).status == "paid"
    assert len(cache) == 2


async def test_a_clear_while_reading_keeps_nothing_read_before_it(cache: RecordCache) -> None:
    invoice = make_invoice(1, status="open")
    db = Postgres(invoice)
    db.gate = asyncio.Event()
    reading = asyncio.create_task(cache.get(invoice.id, db.read))
    await until(lambda: db.reads == 1, "the read to start")
    cache.clear()
    db.gate.set()
    await reading
    assert len(cache) == 0


async def test_it_serves_only_while_listening_and_caught_up_lately(
    cache: RecordCache, clock: Clock, outcomes: Counter[str]
) -> None:
    invoice = make_invoice(1)
    db = Postgres(invoice)
    await cache.get(invoice.id, db.read)
    clock.now += 1.5  # the reader has not caught up for longer than the lag allowed
    await cache.get(invoice.id, db.read)
    assert outcomes[BYPASS] == 1
    # A read cut short by its limit says nothing about what came after it.
    cache.applied(FeedRead([], FeedPosition(3, 0), complete=False), clock.now)
    await cache.get(invoice.id, db.read)
    assert outcomes[BYPASS] == 2
    cache.applied(FeedRead([], FeedPosition(3, 0)), clock.now)
    await cache.get(invoice.id, db.read)
    assert outcomes[HIT] == 1
    cache.listening(False)
    await cache.get(invoice.id, db.read)
    assert outcomes[BYPASS] == 3
    assert db.reads == 4  # the miss and the three bypasses


async def test_records_held_back_by_an_older_transaction_are_read_again(cache: RecordCache) -> None:
    invoice = make_invoice(1, status="open")
    db = Postgres(invoice)
    await cache.get(invoice.id, db.read)
    db.update(dataclasses.replace(invoice, status="paid"))
    cache.applied(FeedRead([], FeedPosition(1, 0), held=(invoice.stripe_invoice_id, invoice.id)), 100.0)
    assert (await cache.get(invoice.id, db.read)).status == "paid"


async def test_beyond_its_capacity_the_least_recently_used_record_goes(clock: Clock) -> None:
    cache = RecordCache(2, 1.0, clock=clock)
    cache.listening(True)
    cache.applied(FeedRead([], FeedPosition(1, 0)), clock.now)
    first, second, third = make_invoice(1), make_invoice(2), make_invoice(3)
    db = Postgres(first, second, third)
    for invoice in (first, second, first, third):
        await cache.get(invoice.id, db.read)
    assert db.reads == 3
    assert len(cache) == 2
    await cache.get(first.stripe_invoice_id, db.read)  # used last but one: kept, under both ids
    assert db.reads == 3
    await cache.get(second.stripe_invoice_id, db.read)  # least recently used: gone under both
    assert db.reads == 4


async def test_two_reads_that_saw_different_versions_leave_neither(cache: RecordCache) -> None:
    """Both began before any forget; the one that read `open` returns last. Keeping it
    would answer `open` after a Get already answered `paid`."""
    invoice = make_invoice(1, status="open")
    old, new = Postgres(invoice), Postgres(dataclasses.replace(invoice, status="paid"))
    old.gate = asyncio.Event()
    slow = asyncio.create_task(cache.get(invoice.id, old.read))
    await until(lambda: old.reads == 1, "the first read to start")
    assert (await cache.get(invoice.stripe_invoice_id, new.read)).status == "paid"
    old.gate.set()
    await slow
    assert len(cache) == 0


async def test_a_record_is_read_again_after_its_maximum_age(cache: RecordCache, clock: Clock) -> None:
    invoice = make_invoice(1)
    db = Postgres(invoice)
    await cache.get(invoice.id, db.read)
    clock.now += MAX_AGE_S + 1
    cache.applied(FeedRead([], FeedPosition(2, 0)), clock.now)  # the reader keeps up meanwhile
    await cache.get(invoice.id, db.read)
    assert db.reads == 2


async def test_losing_listen_forgets_everything(cache: RecordCache, clock: Clock) -> None:
    invoice = make_invoice(1)
    db = Postgres(invoice)
    await cache.get(invoice.id, db.read)
    cache.listening(False)
    assert len(cache) == 0
    cache.listening(True)
    assert not cache.serving  # until the reader has caught up again
    cache.applied(FeedRead([], FeedPosition(2, 0)), clock.now)
    await cache.get(invoice.id, db.read)
    assert db.reads == 2


class FailingStore:
    async def get_invoice(self, key: str) -> Invoice:
        raise AssertionError("not read")

    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice:
        raise ConnectionResetError("lost after COMMIT was sent")

    async def record_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> None:
        raise ConnectionResetError("lost after COMMIT was sent")


async def test_a_write_that_fails_without_saying_forgets_everything(cache: RecordCache) -> None:
    invoice = make_invoice(1)
    await cache.get(invoice.id, Postgres(invoice).read)
    with pytest.raises(ConnectionResetError):
        await ForgettingWrites(FailingStore(), cache).record_stripe_invoice(_stripe(invoice, "void"), stripe_time=1)
    assert len(cache) == 0
    await cache.get(invoice.id, Postgres(invoice).read)
    note = StripeCreditNote("cn_1", invoice.stripe_invoice_id, NoteStatus.ISSUED, 100, 100, 0, 0, "", "")
    with pytest.raises(ConnectionResetError):
        await ForgettingWrites(FailingStore(), cache).record_stripe_credit_note(note, stripe_time=1)
    assert len(cache) == 0


async def test_size_zero_turns_it_off(clock: Clock) -> None:
    cache = RecordCache(0, 1.0, clock=clock)
    cache.listening(True)
    cache.applied(FeedRead([], FeedPosition(1, 0)), clock.now)
    invoice = make_invoice(1)
    db = Postgres(invoice)
    await cache.get(invoice.id, db.read)
    await cache.get(invoice.id, db.read)
    assert db.reads == 2


# --- kept current by the real reader over the real Postgres ---


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


async def _primed(
    cached: tuple[CachedReads, Watches, RecordCache], store: Storage, outcomes: Counter[str]
) -> tuple[Invoice, AsyncGenerator[Change, None]]:
    """An open invoice the cache holds once the reader has applied its creation, and a
    watch of it (the caller closes it)."""
    reads, watches, _ = cached
    invoice = make_invoice(1, status="open")
    watch = watches.watch(None, WatchFilter(invoice_id=invoice.id))
    async with asyncio.timeout(20):
        await anext(watch)  # the bookmark: watching from now
        await save_invoices(store, [invoice])
        assert (await anext(watch)).kind is ChangeKind.CREATED
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


async def test_a_write_of_this_process_shows_to_the_next_get_at_once(store: Storage, clock: Clock) -> None:
    """No reader here: only the write itself can make the cache forget what it changed."""
    cache = RecordCache(100, 1.0, clock=clock)
    cache.listening(True)
    cache.applied(FeedRead([], FeedPosition(1, 0)), clock.now)
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
        await save_invoices(store, [invoice])
        reads = CachedReads(store, cache)
        await asyncio.sleep(0.2)  # several reads of the feed
        for _ in range(3):
            await reads.get_invoice(invoice.id)
        assert outcomes == {BYPASS: 3}
    finally:
        await watches.close()
