"""A key's claim, held by one attempt at a time, and the audit entry each attempt leaves:
a lease taken over after its attempt died, a release that comes late, the store away as a
claim commits or is released (a failover), replicas of earlier releases claiming
meanwhile; one entry per attempt, naming its invoice, written in commit order. Real
Postgres, and the Stripe emulator where an attempt gets that far. Whether Stripe bills
once: test_create_billing.py."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
import stripe

from service import storage
from service.domain import (
    AUDIT_ABANDONED,
    AUDIT_OK,
    Audited,
    ClaimUnconfirmed,
    CreateClaim,
    CreateInProgress,
    Unavailable,
)
from service.invoices import InvoiceCreator, Timing
from service.storage import Storage, creates
from tests.create_helpers import Interrupted, Payments, creator, request, stripe_invoices
from tests.helpers import poll_until, until
from tools.customers import customer_with_card


async def claim_key(store: Storage, key: str, fingerprint: str, lease_s: float, audited: Audited) -> CreateClaim:
    """A claim of `key` made directly, as an attempt makes it."""
    claim = await store.claim_create(key, (fingerprint,), lease_s, audited, uuid.uuid4())
    assert isinstance(claim, CreateClaim), claim
    return claim


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
