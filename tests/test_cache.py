"""The record cache (service/cache.py) on its own, where the test decides when a read of
Postgres returns and what the feed's reader applies meanwhile (with the real reader over
the real Postgres: test_cache_feed.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from functools import partial

import pytest

from service.cache import BYPASS, HIT, MAX_AGE_S, MISS, ForgettingWrites, RecordCache
from service.credit_notes import NoteStatus, StripeCreditNote, StripeRefund
from service.domain import Invoice, NotFound, StripeInvoice, User
from service.feed import Change, ChangeKind, FeedPosition, FeedRead
from tests.helpers import make_invoice, until


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


def _stripe(invoice: Invoice, status: str) -> StripeInvoice:
    return StripeInvoice(invoice.stripe_invoice_id, status, invoice.amount, "", User("u1", "Ada"), "eur", 1_700_000_000)


class FailingStore:
    async def get_invoice(self, key: str) -> Invoice:
        raise AssertionError("not read")

    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice:
        raise ConnectionResetError("lost after COMMIT was sent")

    async def record_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> None:
        raise ConnectionResetError("lost after COMMIT was sent")

    async def record_stripe_refunds(
        self, stripe_invoice_id: str, refunds: list[StripeRefund], *, stripe_time: int
    ) -> None:
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
    await cache.get(invoice.id, Postgres(invoice).read)
    with pytest.raises(ConnectionResetError):
        await ForgettingWrites(FailingStore(), cache).record_stripe_refunds(
            invoice.stripe_invoice_id, [], stripe_time=1
        )
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
