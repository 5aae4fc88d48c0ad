"""The record cache: GetInvoice answered from memory, kept current by the change feed.

Why: a Get that reaches Postgres spends most of its CPU on the round trip (the event loop's
turns for the socket, asyncpg), not on its SQL; see docs/performance.md. Boundary: knows
Invoices and the feed reader's reads; no SQL, no gRPC. What it promises:

- Never a record older than the last change the feed's reader applied: the reader forgets
  each changed record before it hands the change to any watch, and a Get that read
  Postgres while a change to its record was being applied does not keep what it read.
- Served only while the reader is LISTENing (woken by each commit's NOTIFY, it applies a
  change within milliseconds of its commit) and has caught up with every commit within
  the last `max_lag_s`. Otherwise (polling only, behind PgBouncer; Postgres away; an old
  write transaction holding the feed back; the reader slow) every Get reads Postgres.
- What this process writes itself (Pay, Void) is forgotten before the call answers, so a
  Get right after it shows it. A commit made elsewhere (the webhook sidecar, another
  replica) shows from the moment this process's reader applies it: milliseconds later.
- Decisions about money never read it: Pay, Void and Create read the store directly.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from service.credit_notes import StripeCreditNote, StripeRefund
from service.domain import Invoice, InvoicePage, Page, StripeInvoice
from service.feed import FeedRead

# A lookup's outcome, a metric's label (service/metrics.py).
HIT, MISS, BYPASS = "hit", "miss", "bypass"
LOOKUP_OUTCOMES = (HIT, MISS, BYPASS)
# The longest a record stays without being read again: a bound on what a write the feed
# never saw (a trigger disabled by an operator, a restore) leaves served.
MAX_AGE_S = 60.0
# How many keys forgotten while Gets were reading Postgres are remembered at most before
# the ones no running Get can need are dropped.
_FORGOTTEN_PRUNE_AT = 10_000


class RecordCache:
    """Invoices by either id, least recently used dropped beyond `capacity` records."""

    def __init__(
        self,
        capacity: int,
        max_lag_s: float,
        *,
        observe: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._max_lag_s = max_lag_s
        self._observe = observe
        self._clock = clock
        # Each record under both of its ids, one entry: the record and when it was read.
        self._entries: OrderedDict[str, tuple[Invoice, float]] = OrderedDict()
        # A count of forgets: a Get that read Postgres keeps what it read only if none of
        # its record's keys was forgotten after it began.
        self._forgets = 0
        self._cleared_at = 0
        self._forgotten: dict[str, int] = {}
        self._reads: Counter[int] = Counter()  # Gets reading Postgres, by the count they began at
        self._listening = False
        self._caught_up_at = -math.inf

    @property
    def serving(self) -> bool:
        return self._serving(self._clock())

    def _serving(self, now: float) -> bool:
        return self._capacity > 0 and self._listening and now - self._caught_up_at <= self._max_lag_s

    def __len__(self) -> int:
        return len(self._entries) // 2

    async def get(self, key: str, read: Callable[[str], Awaitable[Invoice]]) -> Invoice:
        """The record under `key`, from memory when it may be, else from `read`."""
        now = self._clock()
        if not self._serving(now):
            self._count(BYPASS)
            return await read(key)
        cached = self._entries.get(key)
        if cached is not None:
            invoice, read_at = cached
            if now - read_at <= MAX_AGE_S:
                self._entries.move_to_end(invoice.id)
                self._entries.move_to_end(invoice.stripe_invoice_id)
                self._count(HIT)
                return invoice
            self._drop(key)
        self._count(MISS)
        began = self._forgets
        self._reads[began] += 1
        try:
            invoice = await read(key)
            if self._keeps(began, (key, invoice.id, invoice.stripe_invoice_id)):
                self._put(invoice, now)
            return invoice
        finally:
            self._read_done(began)

    def listening(self, on: bool) -> None:
        """The reader's LISTEN connection is up (on) or lost. Lost, everything goes: a
        failover drops every connection, and the database now serving may lack commits
        that records read before it still show."""
        self._listening = on
        if not on:
            self.clear()

    def applied(self, read: FeedRead, began: float) -> None:
        """The reader read the feed with a statement sent at `began` (monotonic): forgets
        every record it names, and, when the read saw every commit made before `began`,
        counts the cache current as of then."""
        for change in read.changes:
            if change.invoice is not None:
                self.forget((change.invoice.id, change.invoice.stripe_invoice_id))
        self.forget(read.held)
        if read.complete:
            self._caught_up_at = began

    def forget(self, keys: Iterable[str]) -> None:
        self._forgets += 1
        for key in keys:
            self._drop(key)
            if self._reads:
                self._forgotten[key] = self._forgets

    def clear(self) -> None:
        """Forgets everything, and every Get reading now keeps nothing (the feed went back,
        or a write ended without saying what it left)."""
        self._forgets += 1
        self._cleared_at = self._forgets
        self._entries.clear()
        self._caught_up_at = -math.inf

    def _keeps(self, began: int, keys: tuple[str, ...]) -> bool:
        if self._forgets == began:
            return True
        return self._cleared_at <= began and all(self._forgotten.get(k, 0) <= began for k in keys)

    def _read_done(self, began: int) -> None:
        self._reads[began] -= 1
        if not self._reads[began]:
            del self._reads[began]
        if not self._reads:
            self._forgotten.clear()
        elif len(self._forgotten) > _FORGOTTEN_PRUNE_AT:
            oldest = min(self._reads)
            self._forgotten = {k: n for k, n in self._forgotten.items() if n > oldest}

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._entries.pop(entry[0].id, None)
            self._entries.pop(entry[0].stripe_invoice_id, None)

    def _put(self, invoice: Invoice, read_at: float) -> None:
        keys = (invoice.id, invoice.stripe_invoice_id)
        held = [self._entries[k][0] for k in keys if k in self._entries]
        if held:
            # Another Get kept the record while this one read: which of the two reads saw
            # the newer version is unknown, so neither is kept when they differ.
            if any(h != invoice for h in held):
                for key in keys:
                    self._drop(key)
            return
        for key in keys:
            self._entries[key] = (invoice, read_at)
        while len(self._entries) > 2 * self._capacity:
            self._drop(next(iter(self._entries)))  # the least recently used, under both ids

    def _count(self, outcome: str) -> None:
        if self._observe is not None:
            self._observe(outcome)


class Reads(Protocol):
    async def list_invoices(self, page: Page) -> InvoicePage: ...
    async def get_invoice(self, key: str) -> Invoice: ...


class Records(Protocol):
    async def get_invoice(self, key: str) -> Invoice: ...
    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice: ...
    async def record_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> None: ...
    async def record_stripe_refunds(
        self, stripe_invoice_id: str, refunds: list[StripeRefund], *, stripe_time: int
    ) -> None: ...


class CachedReads:
    """The servicer's reads: Get through the cache, List from the store."""

    def __init__(self, store: Reads, cache: RecordCache) -> None:
        self._store = store
        self._cache = cache

    async def list_invoices(self, page: Page) -> InvoicePage:
        return await self._store.list_invoices(page)

    async def get_invoice(self, key: str) -> Invoice:
        return await self._cache.get(key, self._store.get_invoice)


class ForgettingWrites:
    """Pay's, Void's and Refund's records: read from the store itself, and each write forgotten by
    the cache before it answers (the record it left, or everything when it failed
    without saying, since it may have committed)."""

    def __init__(self, store: Records, cache: RecordCache) -> None:
        self._store = store
        self._cache = cache

    async def get_invoice(self, key: str) -> Invoice:
        return await self._store.get_invoice(key)

    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice:
        try:
            record = await self._store.record_stripe_invoice(invoice, stripe_time=stripe_time)
        except BaseException:
            self._cache.clear()
            raise
        self._cache.forget((record.id, record.stripe_invoice_id))
        return record

    async def record_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> None:
        """The note changes its invoice's totals: the invoice is forgotten (its record's
        id with it, once Refund records the invoice after the note)."""
        try:
            await self._store.record_stripe_credit_note(note, stripe_time=stripe_time)
        except BaseException:
            self._cache.clear()
            raise
        self._cache.forget((note.stripe_invoice_id,))

    async def record_stripe_refunds(
        self, stripe_invoice_id: str, refunds: list[StripeRefund], *, stripe_time: int
    ) -> None:
        """Refunds of the invoice's payments change its totals, as a note does."""
        try:
            await self._store.record_stripe_refunds(stripe_invoice_id, refunds, stripe_time=stripe_time)
        except BaseException:
            self._cache.clear()
            raise
        self._cache.forget((stripe_invoice_id,))
