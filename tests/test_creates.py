"""A Create bills once, whatever fails in between: the service's own InvoiceCreator and
StripePayments against the Stripe emulator, which behaves as Stripe does where it matters
here (it replays a saved 500 for a key, forgets its keys after 24 hours on request, and
settles at finalization an invoice under the currency's minimum charge). Every test
counts what Stripe holds for its own customer afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
import stripe

from service import storage, validation
from service.domain import (
    AUDIT_ABANDONED,
    AUDIT_OK,
    Audited,
    ClaimUnconfirmed,
    CreateClaim,
    CreateInProgress,
    FailedPrecondition,
    NewInvoice,
    Unavailable,
)
from service.invoices import InvoiceCreator, Timing
from service.payments import StripePayments
from service.storage import Storage, creates
from tests.helpers import poll_until, until
from tools.customers import DECLINED_ON_CHARGE, customer_with_card


class Interrupted(Exception):
    """What a process killed right after a Stripe call returned would leave behind."""


class Payments(StripePayments):
    """The real payments, counting calls by operation, and optionally cut off right after
    one step's call has reached Stripe (its effect exists, the service never heard)."""

    def __init__(self, client: stripe.StripeClient, *, cut_after: str = "", lines_per_call: int = 250) -> None:
        self.calls: list[str] = []
        super().__init__(client, observe=lambda op, _outcome, _s: self.calls.append(op), lines_per_call=lines_per_call)
        self.cut_after = cut_after

    def _cut(self, step: str) -> None:
        if self.cut_after == step:
            self.cut_after = ""
            raise Interrupted(step)

    async def create_draft(self, new: NewInvoice, key: str, stripe_key: str) -> dict[str, Any]:
        answer = await super().create_draft(new, key, stripe_key)
        self._cut("draft")
        return answer

    async def add_lines(self, invoice_id: str, items: Any, stripe_key: str) -> dict[str, Any]:
        answer = await super().add_lines(invoice_id, items, stripe_key)
        self._cut("lines")
        return answer

    async def finalize(self, invoice_id: str, stripe_key: str) -> dict[str, Any]:
        answer = await super().finalize(invoice_id, stripe_key)
        self._cut("finalize")
        return answer

    async def pay(
        self, invoice_id: str, payment_method: str | None, stripe_key: str, *, declined_ok: bool = True
    ) -> dict[str, Any]:
        answer = await super().pay(invoice_id, payment_method, stripe_key, declined_ok=declined_ok)
        self._cut("pay")
        return answer


async def emulator(localstripe: str, method: str, path: str, body: object = None) -> Any:
    """The emulator's test hooks (tools/localstripe/config.py, /_config/...)."""
    async with httpx.AsyncClient(base_url=localstripe, timeout=10) as http:
        reply = await http.request(method, path, json=body)
        reply.raise_for_status()
        return reply.json() if reply.content else None


async def stripe_invoices(client: stripe.StripeClient, customer: str) -> list[Any]:
    """Every invoice of the customer, page by page (a page holds at most 100)."""
    found: list[Any] = []
    params: Any = {"customer": customer, "limit": 100}
    while True:
        page = await client.v1.invoices.list_async(params)
        found += page.data
        if not page.has_more or not page.data:
            return found
        params = {**params, "starting_after": page.data[-1].id}


def request(customer: str, method: str, amounts: list[int] | None = None) -> NewInvoice:
    items = [(f"item {i}", amount) for i, amount in enumerate(amounts or [3300, 700])]
    return validation.new_invoice(items, customer, method, currency="eur")


def creator(store: Storage, stripe_payments: StripePayments, **timing: float) -> InvoiceCreator:
    return InvoiceCreator(store, store, stripe_payments, Timing(**{"lease_s": 40.0, **timing}))


async def claim_key(store: Storage, key: str, fingerprint: str, lease_s: float, audited: Audited) -> CreateClaim:
    """A claim of `key` made directly, as an attempt makes it."""
    claim = await store.claim_create(key, (fingerprint,), lease_s, audited, uuid.uuid4())
    assert isinstance(claim, CreateClaim), claim
    return claim


def test_the_fingerprint_is_a_pinned_canonical_encoding() -> None:
    """Stored fingerprints must survive a deploy: this value may never change (a new field
    enters under a new FINGERPRINT_VERSION)."""
    new = validation.new_invoice(
        [("All resources", 3300), ("Support", 700)], "cus_A", "pm_B", currency="eur", user=("u-1", "Ada")
    )
    canonical = (
        '["create",{"currency":"eur","customer":"cus_A","items":[["All resources",3300],["Support",700]],'
        '"payment_method":"pm_B","user":["u-1","Ada"]}]'
    )
    pinned = "v1:7b3a35465953cdeb610570295b9633d2c64ea06356640a8f927235d80c9d3494"
    assert new.fingerprint() == "v1:" + hashlib.sha256(canonical.encode()).hexdigest() == pinned


@pytest.mark.parametrize("count", [1, 10, 100])
async def test_four_stripe_calls_whatever_the_item_count(
    store: Storage, stripe_client: stripe.StripeClient, count: int
) -> None:
    customer, method = await customer_with_card(stripe_client)
    stripe_payments = Payments(stripe_client)
    answer = await creator(store, stripe_payments).create(
        request(customer, method, [100 + i for i in range(count)]), uuid.uuid4().hex
    )
    assert stripe_payments.calls == ["invoices.create", "invoices.add_lines", "invoices.finalize", "invoices.pay"]
    assert (answer["status"], answer["total"]) == ("paid", sum(100 + i for i in range(count)))
    listed = await stripe_client.v1.invoices.line_items.list_async(answer["id"], {"limit": 100})
    assert [(line.description, line.amount) for line in listed.data] == [(f"item {i}", 100 + i) for i in range(count)]


async def test_lines_beyond_one_call_go_in_batches_in_order(store: Storage, stripe_client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(stripe_client)
    stripe_payments = Payments(stripe_client, lines_per_call=3)
    answer = await creator(store, stripe_payments).create(request(customer, method, list(range(1, 11))), "batches")
    assert stripe_payments.calls.count("invoices.add_lines") == 4
    listed = await stripe_client.v1.invoices.line_items.list_async(answer["id"], {"limit": 100})
    assert [line.amount for line in listed.data] == list(range(1, 11))
    assert answer["total"] == 55


async def test_an_invoice_under_the_minimum_charge_is_answered_paid(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """The seed's own example bills one cent: Stripe settles it at finalization (and
    refuses `pay` afterwards); the Create answers the paid invoice, it does not fail."""
    customer, method = await customer_with_card(stripe_client)
    stripe_payments = Payments(stripe_client)
    answer = await creator(store, stripe_payments).create(request(customer, method, [1]), uuid.uuid4().hex)
    assert answer["status"] == "paid"
    assert "invoices.pay" not in stripe_payments.calls
    assert [i.status for i in await stripe_invoices(stripe_client, customer)] == ["paid"]


async def test_a_create_in_another_currency_than_the_customers_credit_is_charged_in_full(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """Stripe applies a customer's balance only to invoices in its currency: a customer
    with euro credit is charged the whole of a dollar invoice, and keeps the credit."""
    customer, method = await customer_with_card(stripe_client)
    await stripe_client.v1.customers.update_async(customer, {"balance": -1000})
    euros = await creator(store, Payments(stripe_client)).create(request(customer, method), uuid.uuid4().hex)
    assert (euros["currency"], euros["total"], euros["amount_paid"]) == ("eur", 4000, 3000)  # the credit applied
    await stripe_client.v1.customers.update_async(customer, {"balance": -1000})  # euro credit again
    items = [("item 0", 3300), ("item 1", 700)]
    dollars = validation.new_invoice(items, customer, method, currency="usd")
    answer = await creator(store, Payments(stripe_client)).create(dollars, uuid.uuid4().hex)
    assert (answer["status"], answer["currency"], answer["total"]) == ("paid", "usd", 4000)
    assert (answer["starting_balance"], answer["amount_due"], answer["amount_paid"]) == (0, 4000, 4000)
    assert (await stripe_client.v1.customers.retrieve_async(customer)).balance == -1000


@pytest.mark.parametrize("step", ["draft", "lines", "finalize", "pay"])
async def test_a_create_cut_off_after_each_step_and_retried_after_stripe_forgot_its_keys_bills_once(
    store: Storage, stripe_client: stripe.StripeClient, localstripe: str, step: str
) -> None:
    customer, method = await customer_with_card(stripe_client)
    key = uuid.uuid4().hex
    with pytest.raises(Interrupted):
        await creator(store, Payments(stripe_client, cut_after=step)).create(request(customer, method), key)
    await emulator(localstripe, "POST", "/_config/idempotency/forget")  # more than 24 h later

    answer = await creator(store, Payments(stripe_client)).create(request(customer, method), key)
    invoices = await stripe_invoices(stripe_client, customer)
    assert [i.id for i in invoices] == [answer["id"]]
    assert (invoices[0].status, invoices[0].amount_paid, invoices[0].total) == ("paid", 4000, 4000)
    listed = await stripe_client.v1.invoices.line_items.list_async(answer["id"])
    assert [line.amount for line in listed.data] == [3300, 700]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(
    ("step", "path"),
    [
        ("invoices.create", "^/v1/invoices$"),
        ("invoices.add_lines", "^/v1/invoices/[^/]+/add_lines$"),
        ("invoices.finalize", "^/v1/invoices/[^/]+/finalize$"),
        ("invoices.pay", "^/v1/invoices/[^/]+/pay$"),
    ],
)
async def test_a_stripe_500_on_a_step_then_the_callers_retry_bills_once(
    store: Storage, stripe_client: stripe.StripeClient, localstripe: str, step: str, path: str, when: str
) -> None:
    """Stripe saves a 500 under its idempotency key and replays it for a day: the retry
    must find out what exists and go on with keys of its own, not resend the old ones."""
    customer, method = await customer_with_card(stripe_client)
    key = uuid.uuid4().hex
    await emulator(localstripe, "POST", "/_config/faults", {"path": path, "method": "POST", "count": 1, "when": when})
    try:
        with pytest.raises(Unavailable):
            await creator(store, Payments(stripe_client)).create(request(customer, method), key)
    finally:
        await emulator(localstripe, "DELETE", "/_config/faults")
    retry = Payments(stripe_client)
    answer = await creator(store, retry).create(request(customer, method), key)
    invoices = await stripe_invoices(stripe_client, customer)
    assert [i.id for i in invoices] == [answer["id"]]
    assert (invoices[0].status, invoices[0].amount_paid) == ("paid", 4000)
    assert "invoices.create" not in retry.calls or (step, when) == ("invoices.create", "before")


async def test_a_finished_create_is_answered_again_without_calling_stripe(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    first = await creator(store, Payments(stripe_client)).create(request(customer, method), "replayed")
    again = Payments(stripe_client)
    assert await creator(store, again).create(request(customer, method), "replayed") == first
    assert again.calls == []


async def test_two_creates_with_one_key_in_flight_at_once_make_one_invoice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client), wait_s=0)
    answers = await asyncio.gather(
        *(one.create(request(customer, method), "in-flight") for _ in range(2)), return_exceptions=True
    )
    invoices = await stripe_invoices(stripe_client, customer)
    assert len(invoices) == 1
    for answer in answers:
        assert isinstance(answer, CreateInProgress) or (isinstance(answer, dict) and answer["id"] == invoices[0].id)
    assert any(isinstance(answer, dict) for answer in answers)


async def test_a_duplicate_waits_for_the_attempt_in_progress_and_answers_its_invoice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client))
    first, second = await asyncio.gather(*(one.create(request(customer, method), "waits") for _ in range(2)))
    assert first["id"] == second["id"]
    assert len(await stripe_invoices(stripe_client, customer)) == 1


async def test_an_attempt_that_died_holding_its_key_is_taken_over_after_its_lease(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """A process killed mid-Create releases nothing: the next attempt waits out the lease,
    then resumes the draft; the dead attempt, should it wake, can record nothing. The
    attempt that took over wrote the dead one's audit entry, naming its caller."""
    customer, method = await customer_with_card(stripe_client)
    dead = Audited("create", "dead-caller", "dead-request", "died")
    claim = await claim_key(store, "died", request(customer, method).fingerprint(), 0.5, dead)
    stuck = Payments(stripe_client)
    draft = await stuck.create_draft(request(customer, method), "died", "died-draft")
    await store.record_create_step("died", claim.attempt, "drafted", str(draft["id"]), 0.5)
    with pytest.raises(CreateInProgress):
        await creator(store, Payments(stripe_client), wait_s=0).create(request(customer, method), "died")
    await asyncio.sleep(0.6)
    answer = await creator(store, Payments(stripe_client)).create(request(customer, method), "died")
    assert answer["id"] == draft["id"]
    assert answer["status"] == "paid"
    with pytest.raises(CreateInProgress):
        await store.record_create_step("died", claim.attempt, "lined", None, 0.5)
    assert len(await stripe_invoices(stripe_client, customer)) == 1
    assert await audit_rows(store, "died") == [(1, AUDIT_ABANDONED, draft["id"]), (2, AUDIT_OK, draft["id"])]
    async with store._connection() as conn:
        first = await conn.fetchrow("SELECT * FROM invoice_audit WHERE idempotency_key = 'died' ORDER BY seq LIMIT 1")
    assert first is not None
    assert (first["action"], first["caller"], first["request_id"]) == ("create", "dead-caller", "dead-request")


async def test_a_takeover_notes_only_the_attempt_that_never_ended(store: Storage) -> None:
    """A Pay's attempt that died names its invoice in the entry its takeover writes; one
    whose release came after its lease ran out (but before a takeover) has the release's
    entry, and the takeover writes no second one."""
    pay = Audited("pay", "dead-payer", "pay-request", "pay-died", "in_paidbyone")
    await claim_key(store, "pay-died", "pay-f", 0.1, pay)
    late = Audited("void", "late-voider", "void-request", "void-late", "in_voidedlate")
    claim = await claim_key(store, "void-late", "void-f", 0.1, late)
    await asyncio.sleep(0.2)
    await store.release_create("void-late", claim.claim_id, late, ("Unavailable", "Stripe was away"))
    retry = Audited("pay", "retrier", "retry-request", "pay-died", "in_paidbyone")
    for key, fingerprint in (("pay-died", "pay-f"), ("void-late", "void-f")):
        await claim_key(store, key, fingerprint, 30, retry)
    assert await audit_rows(store, "pay-died") == [(1, AUDIT_ABANDONED, "in_paidbyone")]
    assert await audit_rows(store, "void-late") == [(1, "Unavailable", "in_voidedlate")]


async def _until_waiting_for_a_lock(database: str, task: asyncio.Future[Any]) -> None:
    """Until `task` ended or another backend of the database waits for a lock."""
    watcher = await asyncpg.connect(database)
    try:

        async def waiting() -> bool | None:
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return task.done() or await watcher.fetchval(query) > 0 or None

        await poll_until(waiting, "a statement waiting for a lock")
    finally:
        await watcher.close()


async def test_a_release_that_comes_late_but_before_the_takeover_stays_the_attempts_only_entry(
    store: Storage, database: str
) -> None:
    """The takeover reads the attempt it takes over under a lock: read without one, the
    release committing meanwhile would be noted `abandoned` as well."""
    late = Audited("void", "late-voider", "void-request", "held-release", "in_heldrelease")
    claim = await claim_key(store, "held-release", "held-f", 0.1, late)
    await asyncio.sleep(0.2)  # the lease runs out while the release is on its way
    releasing = await asyncpg.connect(database)
    try:
        async with releasing.transaction():
            await releasing.execute(
                creates._RELEASE_CREATE, "held-release", claim.claim_id, *creates._entry(late, "Unavailable", "away")
            )
            retry = Audited("void", "retrier", "retry-request", "held-release", "in_heldrelease")
            takeover = asyncio.ensure_future(claim_key(store, "held-release", "held-f", 30, retry))
            await _until_waiting_for_a_lock(database, takeover)
        await takeover
    finally:
        await releasing.close()
    assert await audit_rows(store, "held-release") == [(1, "Unavailable", "in_heldrelease")]


async def test_an_attempt_taken_over_by_a_replica_from_before_the_audit_of_claims_is_not_misnamed(
    store: Storage,
) -> None:
    """That replica claims without saying who: the entry would name the attempt before."""
    first = Audited("pay", "first-payer", "first-request", "old-replica", "in_oldreplica")
    await claim_key(store, "old-replica", "old-f", 30, first)
    async with store._connection() as conn:  # the old replica's takeover, then its death
        await conn.execute(
            "UPDATE create_requests SET attempt = attempt + 1, lease_until = now() - interval '1 second'"
            " WHERE idempotency_key = 'old-replica'"
        )
    assert (await claim_key(store, "old-replica", "old-f", 30, first)).attempt == 3
    assert await audit_rows(store, "old-replica") == []


async def test_a_late_release_leaves_alone_the_attempt_a_replica_from_before_claim_ids_took_over(
    store: Storage,
) -> None:
    """That replica's claim keeps the row's claim id of the attempt before: released by it,
    its running attempt would lose the key to a retry."""
    first = Audited("void", "first-voider", "first-request", "old-claimer", "in_oldclaimer")
    claim = await claim_key(store, "old-claimer", "old-f", 0.1, first)
    await asyncio.sleep(0.2)
    async with store._connection() as conn:  # the old replica's takeover, running
        await conn.execute(
            "UPDATE create_requests SET attempt = attempt + 1, lease_until = now() + interval '30 seconds'"
            " WHERE idempotency_key = 'old-claimer'"
        )
    await store.release_create("old-claimer", claim.claim_id, first, ("Unavailable", "late"))
    with pytest.raises(CreateInProgress):
        await store.claim_create("old-claimer", ("old-f",), 30, first, uuid.uuid4())
    assert await audit_rows(store, "old-claimer") == []


async def test_one_invoices_audit_entries_are_written_one_transaction_at_a_time(store: Storage, database: str) -> None:
    """So that their order is their commit order, and a page that ends at an entry never
    skips one before it that commits later."""
    writers = [Audited("pay", "payer", f"request-{n}", f"ordered-{n}", "in_ordered") for n in range(2)]
    claims = [await claim_key(store, f"ordered-{n}", f"f-{n}", 30, w) for n, w in enumerate(writers)]
    first = await asyncpg.connect(database)
    try:
        async with first.transaction():
            entry = creates._entry(writers[0], "error", "")
            await first.execute(creates._RELEASE_CREATE, "ordered-0", claims[0].claim_id, *entry)
            second = asyncio.ensure_future(
                store.release_create("ordered-1", claims[1].claim_id, writers[1], ("error", ""))
            )
            await _until_waiting_for_a_lock(database, second)
            assert not second.done()
            # ...and waits before it draws its seq (a sequence is read outside transactions).
            drawn = await first.fetchval(
                "SELECT last_value FROM pg_sequences WHERE sequencename = 'invoice_audit_seq_seq'"
            )
            assert drawn == await first.fetchval("SELECT max(seq) FROM invoice_audit")
        await second
    finally:
        await first.close()
    page = await store.audit_of("in_ordered", 0, 10)
    assert [e.idempotency_key for e in page.entries] == ["ordered-0", "ordered-1"]


class StoreAway:
    """The store, away for the first `n` releases of a claim: a failover that cut an
    attempt off also fails the release that would free its key. With `committed`, each
    of those releases commits before its caller hears the error (a timeout after the
    commit), so it is sent again on a row already released."""

    def __init__(self, store: Storage, n: int, *, committed: bool = False, away_at_step: str = "") -> None:
        self._store, self.left, self.committed, self.away_at_step = store, n, committed, away_at_step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def release_create(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> None:
        if self.left > 0:
            self.left -= 1
            if self.committed:
                await self._store.release_create(key, claim_id, audited, outcome)
            raise Unavailable("the invoice store is unavailable; retry later")
        await self._store.release_create(key, claim_id, audited, outcome)

    async def record_create_step(
        self, key: str, attempt: int, step: str, stripe_invoice_id: str | None, lease_s: float
    ) -> None:
        if step == self.away_at_step:
            raise Unavailable("the invoice store is unavailable; retry later")
        await self._store.record_create_step(key, attempt, step, stripe_invoice_id, lease_s)


async def audit_rows(store: Storage, key: str) -> list[tuple[int, str, str | None]]:
    """The key's audit rows: (attempt, outcome, invoice), in order."""
    async with store._connection() as conn:
        rows = await conn.fetch(
            "SELECT attempt, outcome, stripe_invoice_id FROM invoice_audit WHERE idempotency_key = $1 ORDER BY seq",
            key,
        )
    return [(r["attempt"], r["outcome"], r["stripe_invoice_id"]) for r in rows]


async def test_a_release_sent_again_after_it_committed_writes_one_audit_row(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    away = StoreAway(store, n=1, committed=True)
    cut = InvoiceCreator(
        away, away, Payments(stripe_client, cut_after="lines"), Timing(lease_s=40.0, release_retry_s=0.1)
    )
    with pytest.raises(Interrupted):
        await cut.create(request(customer, method), "released-twice")
    await until(lambda: away.left == 0, "the release sent again")
    await cut.drain(5)
    assert [(a, o) for a, o, _ in await audit_rows(store, "released-twice")] == [(1, "error")]


async def test_a_create_cut_off_after_stripe_made_its_draft_names_the_invoice_in_its_audit_row(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """The store went away as the Create recorded its draft: the entry names the draft."""
    customer, method = await customer_with_card(stripe_client)
    away = StoreAway(store, n=0, away_at_step="drafted")
    with pytest.raises(Unavailable):
        await InvoiceCreator(away, away, Payments(stripe_client), Timing(lease_s=40.0)).create(
            request(customer, method), "cut-at-draft"
        )
    [draft] = await stripe_invoices(stripe_client, customer)
    assert await audit_rows(store, "cut-at-draft") == [(1, "Unavailable", draft.id)]


async def test_a_claim_the_store_could_not_release_is_released_once_it_answers(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """Otherwise the caller's retry waits out the whole lease (40 s here) for an attempt
    that ended long before."""
    customer, method = await customer_with_card(stripe_client)
    away = StoreAway(store, n=2)
    cut = InvoiceCreator(
        away, away, Payments(stripe_client, cut_after="draft"), Timing(lease_s=40.0, release_retry_s=0.3)
    )
    with pytest.raises(Interrupted):
        await cut.create(request(customer, method), "released-late")
    retry = creator(store, Payments(stripe_client), wait_s=0)
    with pytest.raises(CreateInProgress):  # the release is still owed while the store is away
        await retry.create(request(customer, method), "released-late")
    await until(lambda: away.left == 0, "the store answering again")
    await cut.drain(5)
    answer = await retry.create(request(customer, method), "released-late")
    invoices = await stripe_invoices(stripe_client, customer)
    assert [i.id for i in invoices] == [answer["id"]]
    assert answer["status"] == "paid"


class ClaimUnheard:
    """The store away as its first claim commits: the claim is made (on the primary and
    its synchronous standby) and its answer lost, as a failover does; the first try to
    settle it fails too."""

    def __init__(self, store: Storage) -> None:
        self._store, self.unheard, self.settles = store, 1, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim_create(
        self, key: str, fingerprints: tuple[str, ...], lease_s: float, audited: Audited, claim_id: uuid.UUID
    ) -> dict[str, Any] | CreateClaim:
        claim = await self._store.claim_create(key, fingerprints, lease_s, audited, claim_id)
        if self.unheard > 0:
            self.unheard -= 1
            raise ClaimUnconfirmed("the invoice store is unavailable; retry later")
        return claim

    async def settle_claim(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> bool:
        self.settles += 1
        if self.settles == 1:
            raise Unavailable("the invoice store is unavailable; retry later")
        return await self._store.settle_claim(key, claim_id, audited, outcome)


async def test_a_claim_made_but_unheard_is_ended_once_the_store_answers(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """Its claimer never knew it held the key: the caller's retry waited out the lease."""
    customer, method = await customer_with_card(stripe_client)
    away = ClaimUnheard(store)
    cut = InvoiceCreator(away, away, Payments(stripe_client), Timing(lease_s=40.0, release_retry_s=0.1))
    with pytest.raises(Unavailable):
        await cut.create(request(customer, method), "claim-unheard")
    await cut.drain(5)
    assert away.settles == 2
    answer = await creator(store, Payments(stripe_client), wait_s=0).create(request(customer, method), "claim-unheard")
    assert [i.id for i in await stripe_invoices(stripe_client, customer)] == [answer["id"]]
    assert await audit_rows(store, "claim-unheard") == [(1, "Unavailable", None), (2, AUDIT_OK, answer["id"])]


async def test_an_unconfirmed_claim_is_settled_only_once_the_store_shows_the_key(store: Storage) -> None:
    """A claim's INSERT still committing is not seen: until the key has a row, nothing
    tells a claim never made from one about to be."""
    audited = Audited("create", "settler", "settle-request", "settled")
    claim_id = uuid.uuid4()
    assert not await store.settle_claim("settled", claim_id, audited, ("Unavailable", "away"))
    await store.claim_create("settled", ("settle-f",), 30, audited, claim_id)
    assert await store.settle_claim("settled", claim_id, audited, ("Unavailable", "away"))
    assert await audit_rows(store, "settled") == [(1, "Unavailable", None)]
    # Another's claim settles it too, and is left alone.
    assert await store.settle_claim("settled", uuid.uuid4(), audited, ("Unavailable", "away"))
    await claim_key(store, "settled", "settle-f", 30, audited)
    assert await store.settle_claim("settled", uuid.uuid4(), audited, ("Unavailable", "away"))
    with pytest.raises(CreateInProgress):
        await store.claim_create("settled", ("settle-f",), 30, audited, uuid.uuid4())


# Slow on purpose, for keys of these prefixes: at the claim's INSERT, or only as it commits
# (a deferred constraint trigger runs at COMMIT).
_SLOW_CLAIMS = """
CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
CREATE TRIGGER slow_insert AFTER INSERT ON create_requests
    FOR EACH ROW WHEN (NEW.idempotency_key LIKE 'slow-insert-%') EXECUTE FUNCTION slow_claim();
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON create_requests DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.idempotency_key LIKE 'slow-commit-%') EXECUTE FUNCTION slow_claim();
"""


async def test_only_a_claim_cut_off_as_it_commits_is_unconfirmed(database: str) -> None:
    """A claim cut off before its COMMIT was rolled back: nothing to settle. One cut off
    during it may have been made."""
    admin = await asyncpg.connect(database)
    try:
        await admin.execute(_SLOW_CLAIMS)
    finally:
        await admin.close()
    pool = await storage.connect(database, max_size=2, command_timeout=0.5)
    try:
        cut = Storage(pool)
        audited = Audited("create", "cut", "cut-request", None)
        with pytest.raises(ClaimUnconfirmed):
            await cut.claim_create("slow-commit-1", ("f",), 30, audited, uuid.uuid4())
        with pytest.raises(Unavailable) as info:
            await cut.claim_create("slow-insert-1", ("f",), 30, audited, uuid.uuid4())
        assert not isinstance(info.value, ClaimUnconfirmed)
    finally:
        await pool.close()


async def test_ten_identical_keyless_creates_at_once_make_one_invoice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client))
    answers = await asyncio.gather(*(one.create(request(customer, method), None) for _ in range(10)))
    invoices = await stripe_invoices(stripe_client, customer)
    assert len(invoices) == 1
    assert {answer["id"] for answer in answers} == {invoices[0].id}
    other = await one.create(request(customer, method, [3300, 701]), None)
    assert other["id"] != invoices[0].id


async def keyless_create_charged_then_cut_off(store: Storage, client: stripe.StripeClient, new: NewInvoice) -> None:
    """A keyless Create that Stripe charged and whose answer never came."""
    with pytest.raises(Interrupted):
        await creator(store, Payments(client, cut_after="pay")).create(new, None)


async def keyless_times(store: Storage, new: NewInvoice, *, first_s: int, last_s: int) -> None:
    """Both times the keyless window reads, moved back: the first request came `first_s`
    seconds ago (its claim of the fingerprint, and its Create's row), and the Create's
    last attempt `last_s` seconds ago."""
    async with store._connection() as conn:
        key = await conn.fetchval(
            "UPDATE keyless_creates SET claimed_at = claimed_at - make_interval(secs => $2)"
            " WHERE fingerprint = $1 RETURNING idempotency_key",
            new.fingerprint(),
            first_s,
        )
        status = await conn.execute(
            "UPDATE create_requests SET created_at = created_at - make_interval(secs => $2),"
            " updated_at = updated_at - make_interval(secs => $3) WHERE idempotency_key = $1 AND response IS NULL",
            key,
            first_s,
            last_s,
        )
    assert status == "UPDATE 1", "no unanswered keyless Create"


async def test_a_keyless_create_retried_past_the_window_after_its_charge_resumes_it(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """Stripe charged, the answer never came; the caller's retries went on past the window
    from the first request (an outage): each retry within the window of the last attempt
    stays the same Create, which finds the paid invoice instead of charging again."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await keyless_create_charged_then_cut_off(store, stripe_client, new)
    await keyless_times(store, new, first_s=240, last_s=60)  # two windows ago; half a window ago
    answer = await creator(store, Payments(stripe_client)).create(new, None)
    invoices = await stripe_invoices(stripe_client, customer)
    assert [i.id for i in invoices] == [answer["id"]] and answer["status"] == "paid"


async def test_a_keyless_create_sent_again_after_its_last_attempt_left_the_window_is_a_new_one(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """The window holds a keyless Create while it is tried; once neither its first request
    nor its last attempt is within it, an identical request is another order."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await keyless_create_charged_then_cut_off(store, stripe_client, new)
    await keyless_times(store, new, first_s=240, last_s=180)
    answer = await creator(store, Payments(stripe_client)).create(new, None)
    invoices = await stripe_invoices(stripe_client, customer)
    assert answer["id"] in [i.id for i in invoices] and len(invoices) == 2


async def test_without_a_duplicate_window_identical_keyless_creates_bill_each(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client), duplicate_window_s=0)
    for _ in range(2):
        await one.create(request(customer, method), None)
    assert len(await stripe_invoices(stripe_client, customer)) == 2


async def test_a_key_stored_before_the_canonical_fingerprint_still_answers(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    first = await creator(store, Payments(stripe_client)).create(new, "legacy")
    await pool.execute(
        "UPDATE create_requests SET fingerprint = $2 WHERE idempotency_key = $1", "legacy", new.legacy_fingerprint()
    )
    again = Payments(stripe_client)
    assert await creator(store, again).create(new, "legacy") == first
    assert again.calls == []


async def test_a_declined_create_can_be_paid_with_another_card(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    one = creator(store, Payments(stripe_client))
    open_invoice = await one.create(request(customer, declining), uuid.uuid4().hex)
    assert open_invoice["status"] == "open"
    card: Any = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    good = await stripe_client.v1.payment_methods.create_async({"type": "card", "card": card})
    assert good.id is not None
    await stripe_client.v1.payment_methods.attach_async(good.id, {"customer": customer})
    record = await one.pay(open_invoice["id"], good.id, None)
    assert (record.stripe_invoice_id, record.status, record.amount) == (open_invoice["id"], "paid", 4000)
    assert (await store.get_invoice(open_invoice["id"])).status == "paid"
    assert [i.status for i in await stripe_invoices(stripe_client, customer)] == ["paid"]


async def test_a_create_cut_off_before_the_upgrade_resumes_the_invoice_it_made(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    """What the service before progress records left behind when killed between paying and
    storing the answer: a row without an answer, a paid invoice without the key in its
    metadata. The retry must find that invoice, not bill again."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await pool.execute(
        "INSERT INTO create_requests (idempotency_key, fingerprint, step) VALUES ($1, $2, 'legacy')",
        "before-upgrade",
        new.legacy_fingerprint(),
    )
    made = await old_service_create(stripe_client, new, "before-upgrade")
    # Another order of the customer's, finalized, for another sum: not taken for this one.
    other = await old_service_create(stripe_client, request(customer, method, [999]), "other", pay=False)

    again = Payments(stripe_client)
    answer = await creator(store, again).create(new, "before-upgrade")
    assert (answer["id"], answer["status"]) == (made, "paid")
    assert "invoices.create" not in again.calls
    assert {i.id for i in await stripe_invoices(stripe_client, customer)} == {made, other}


async def test_an_admin_pay_with_a_declined_card_is_failed_precondition(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    one = creator(store, Payments(stripe_client))
    open_invoice = await one.create(request(customer, declining), uuid.uuid4().hex)
    with pytest.raises(FailedPrecondition, match="declined"):
        await one.pay(open_invoice["id"], None, None)
    assert (await stripe_client.v1.invoices.retrieve_async(open_invoice["id"])).status == "open"


async def old_service_create(client: stripe.StripeClient, new: NewInvoice, label: str, *, pay: bool = True) -> str:
    """An invoice as the service before progress records made it: no key in its metadata."""
    old = StripePayments(client)
    draft = await client.v1.invoices.create_async(
        {
            "customer": new.customer,
            "currency": new.currency,
            "auto_advance": False,
            "default_payment_method": new.payment_method,
            "pending_invoice_items_behavior": "exclude",
        }
    )
    assert draft.id is not None
    await old.add_lines(draft.id, new.items, f"{label}-lines")
    await old.finalize(draft.id, f"{label}-finalize")
    if pay:
        await old.pay(draft.id, new.payment_method, f"{label}-pay")
    return draft.id


async def test_a_row_an_old_replica_claims_during_the_rollout_is_legacy(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    """An old replica still serving after the migration claims keys with its own INSERT:
    the column default makes such a row legacy, so a new replica's retry looks for the
    old replica's invoice by content instead of billing again."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await pool.execute(
        "INSERT INTO create_requests (idempotency_key, fingerprint) VALUES ($1, $2)",
        "old-replica",
        new.legacy_fingerprint(),
    )
    made = await old_service_create(stripe_client, new, "old-replica")
    answer = await creator(store, Payments(stripe_client)).create(new, "old-replica")
    assert answer["id"] == made
    assert [i.id for i in await stripe_invoices(stripe_client, customer)] == [made]


async def test_a_legacy_create_never_takes_an_invoice_another_key_names(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    """The customer ordered the same thing twice before the upgrade: the other key's
    invoice (finished, named by its row) is not this key's, however alike."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    other = await old_service_create(stripe_client, new, "other-order")
    await pool.execute(
        "INSERT INTO create_requests (idempotency_key, fingerprint, stripe_invoice_id, response, step)"
        " VALUES ($1, $2, $3, '{}', 'done'), ($4, $2, NULL, NULL, 'legacy')",
        "other-order",
        new.legacy_fingerprint(),
        other,
        "this-order",
    )
    answer = await creator(store, Payments(stripe_client)).create(new, "this-order")
    assert answer["id"] != other
    assert answer["status"] == "paid"
    assert len(await stripe_invoices(stripe_client, customer)) == 2
