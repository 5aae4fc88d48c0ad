"""Creating an invoice so that it is billed once, whatever fails in between: the key's
row in Postgres records each step as it is done (the Stripe draft's id first of all), and
a retry resumes from what Stripe shows, never from Stripe's own idempotency cache alone,
which forgets after 24 hours and replays a 500 for as long. Also Pay and Void, the verbs
that manage an invoice after it exists. Knows no SQL and no status codes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from service.auth import CALLER
from service.domain import (
    Audited,
    ClaimUnconfirmed,
    CreateClaim,
    CreateInProgress,
    FailedPrecondition,
    Invoice,
    NewInvoice,
    NewItem,
    NotFound,
    Status,
    StoreUnavailable,
    StripeFailed,
    StripeInvoice,
    Unavailable,
    audit_outcome,
    fingerprint,
)
from service.logs import REQUEST_ID
from service.payments import StripePayments, invoice_from_stripe

log = logging.getLogger(__name__)
T = TypeVar("T")


class CreateRequests(Protocol):
    async def claim_create(
        self, key: str, fingerprints: tuple[str, ...], lease_s: float, audited: Audited, claim_id: uuid.UUID
    ) -> dict[str, Any] | CreateClaim: ...
    async def record_create_step(
        self, key: str, attempt: int, step: str, stripe_invoice_id: str | None, lease_s: float
    ) -> None: ...
    async def finish_create(
        self, key: str, attempt: int, stripe_invoice_id: str, response: dict[str, Any], audited: Audited
    ) -> None: ...
    async def release_create(
        self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]
    ) -> None: ...
    async def settle_claim(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> bool: ...
    async def new_stripe_keys(self, key: str, attempt: int) -> int: ...
    async def recorded_invoices(self, stripe_invoice_ids: list[str]) -> set[str]: ...
    async def claim_keyless(self, fingerprint: str, key: str, window_s: float) -> str: ...


class InvoiceRecords(Protocol):
    async def get_invoice(self, key: str) -> Invoice: ...
    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice: ...


class NoStripe:
    """The creator of a server started without STRIPE_API_KEY: reads work, writes cannot."""

    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]:
        raise Unavailable("Stripe is not configured on this server (STRIPE_API_KEY)")

    async def pay(self, invoice_id: str, payment_method: str | None, idempotency_key: str | None) -> Invoice:
        raise Unavailable("Stripe is not configured on this server (STRIPE_API_KEY)")

    async def void(self, invoice_id: str, idempotency_key: str | None) -> Invoice:
        raise Unavailable("Stripe is not configured on this server (STRIPE_API_KEY)")


@dataclass(frozen=True)
class Timing:
    """How long an attempt owns its key between two renewals (one before every Stripe
    call; the composition root sizes it from the Stripe timeout and retries), how long a
    duplicate waits for the attempt in progress, how often a failed attempt's claim is
    offered back while the store is away, and the keyless duplicate window."""

    lease_s: float
    wait_s: float = 10.0
    poll_s: float = 0.1
    release_retry_s: float = 0.5
    duplicate_window_s: float = 120.0


@dataclass
class _Progress:
    """What one attempt learned, across its runs: the Stripe invoice's id."""

    invoice_id: str | None


def _audited(action: str, idempotency_key: str | None, stripe_invoice_id: str | None = None) -> Audited:
    """Who asked, from the call being handled: the edge names the caller (service/auth.py)
    and the request id (service/logs.py); `-` for a caller that is not a call (a test)."""
    caller = CALLER.get()
    return Audited(action, caller.name if caller else "-", REQUEST_ID.get(), idempotency_key, stripe_invoice_id)


def _stripe_key(key: str, generation: int, step: str) -> str:
    """Stripe's Idempotency-Key for one step. Attempts share it, so that Stripe collapses
    a call still in flight (an attempt that timed out, or whose lease ran out) with its
    retry instead of doing the work twice; a new generation follows a 5xx that Stripe
    replayed for one of them (StripeFailed), and is safe because a step runs only when
    its effect is absent."""
    return f"invoice-service:{key}:{generation}:{step}"


def lines_done(invoice: dict[str, Any], batches: list[tuple[NewItem, ...]]) -> int:
    """How many batches of lines the draft already carries. Each batch is added in one
    call, all or nothing, and every amount is positive, so the subtotal names the count."""
    subtotal, total = int(invoice.get("subtotal") or 0), 0
    for done, batch in enumerate(batches):
        if subtotal == total:
            return done
        total += sum(item.amount for item in batch)
    if subtotal == total:
        return len(batches)
    raise FailedPrecondition(
        f"the Stripe draft {invoice.get('id')} holds lines the service did not add; delete it in Stripe, then retry"
    )


class InvoiceCreator:
    def __init__(self, requests: CreateRequests, records: InvoiceRecords, payments: StripePayments, timing: Timing):
        self._requests = requests
        self._records = records
        self._payments = payments
        self._timing = timing
        # Attempts run as tasks of their own, from their claim on: a caller that goes away
        # (Envoy's route timeout, a client deadline) must not cut an attempt between Stripe
        # charging and the row recording it, nor a claim as it commits (it would hold the
        # key for nobody). Held here so that they are not garbage-collected, and so that
        # shutdown can wait for them (`drain`).
        self._running: set[asyncio.Task[Any]] = set()

    def _in_background(self, work: Awaitable[T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _detached(self, work: Awaitable[T]) -> T:
        return await asyncio.shield(self._in_background(work))

    async def drain(self, timeout_s: float) -> None:
        """Waits for the attempts still running (their callers may have gone), so that
        they record what they did before the pool closes."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)

    async def _claim(self, key: str, fingerprints: tuple[str, ...], audited: Audited) -> dict[str, Any] | CreateClaim:
        """Claims the key, waiting a while for an attempt in progress to answer. A claim
        whose commit broke off may have been made (it reached Postgres and the standby,
        and then a failover cut the connection): it is ended in the background if so, or
        the caller's retries would wait out its lease. In the failover chaos scenario one
        Create's retries got 503 for 45 s before this."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timing.wait_s
        while True:
            claim_id = uuid.uuid4()
            try:
                return await self._requests.claim_create(key, fingerprints, self._timing.lease_s, audited, claim_id)
            except CreateInProgress:
                if loop.time() >= deadline:
                    raise
            except ClaimUnconfirmed as exc:
                self._in_background(self._settle(key, claim_id, audited, (Unavailable.__name__, str(exc))))
                raise
            await asyncio.sleep(self._timing.poll_s)

    async def _settle(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> None:
        """Ends an unconfirmed claim once the store answers, if it was made (while the
        store cannot tell, settle_claim says so)."""
        await self._until_done(lambda: self._requests.settle_claim(key, claim_id, audited, outcome))

    async def _until_done(self, step: Callable[[], Awaitable[bool]]) -> bool:
        """Repeats `step` while the store is away or it says it is not done, until the
        lease would have ended the claim it ends anyway; whether it got done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timing.lease_s
        while loop.time() < deadline:
            try:
                if await step():
                    return True
            except Unavailable:
                pass
            await asyncio.sleep(self._timing.release_retry_s)
        return False

    async def _attempt(
        self,
        key: str,
        claim: CreateClaim,
        run: Callable[[int], Awaitable[T]],
        answer: Callable[[T], tuple[str, dict[str, Any]]],
        audited: Callable[[], Audited],
    ) -> T:
        """Runs one attempt under its claim with the key's current generation of Stripe
        keys, and once more with the next if Stripe replays a 5xx it saved for one of them
        (then no call of the key is running, and `run` starts from what Stripe shows). On
        failure the key is released; on success the answer is stored. Should storing fail
        after Stripe did the work, the key is released too, so the caller's retry reads
        what Stripe holds instead of waiting out the lease. Either end writes the attempt's
        audit entry with it (`audited`, asked at the end: a Create knows its invoice only
        once Stripe made it)."""
        try:
            try:
                result = await run(claim.generation)
            except StripeFailed:
                result = await run(await self._requests.new_stripe_keys(key, claim.attempt))
            stripe_invoice_id, response = answer(result)
            await self._requests.finish_create(key, claim.attempt, stripe_invoice_id, response, audited())
        except BaseException as exc:
            await self._release(key, claim.claim_id, audited(), exc)
            raise
        return result

    async def _release(self, key: str, claim_id: uuid.UUID, audited: Audited, failure: BaseException) -> None:
        """Ends a failed attempt's claim; when the store is away (it failed the attempt,
        not asked again: the caller would wait a second budget for its 503; or it fails
        this), once it answers again, so the caller's retry need not wait out the lease
        (failover chaos: 35 s before this). Late is safe: the statement ends only this
        attempt's claim (by its id), while it has no answer and no other claim took over."""
        outcome = audit_outcome(failure)
        if not isinstance(failure, StoreUnavailable):
            with contextlib.suppress(Unavailable):
                return await self._requests.release_create(key, claim_id, audited, outcome)
        self._in_background(self._release_later(key, claim_id, audited, outcome))

    async def _release_later(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> None:
        async def release() -> bool:
            await self._requests.release_create(key, claim_id, audited, outcome)
            return True

        await asyncio.sleep(self._timing.release_retry_s)  # it failed a moment ago
        if await self._until_done(release):
            return
        # The lease ended the claim meanwhile; the attempt that takes the key over writes
        # this one's audit entry (`abandoned`), without its outcome.
        log.warning(
            "a failed attempt's key could not be released, nor its outcome audited, before its lease ran out",
            extra={"action": audited.action, "claim": str(claim_id), "invoice": audited.stripe_invoice_id},
        )

    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]:
        audited = _audited("create", idempotency_key)
        key = idempotency_key
        if key is None:
            # A key of the service's own, shared by identical requests within the window, so
            # that a keyless caller's retry answers the first invoice instead of billing again.
            key = f"keyless:{uuid.uuid4().hex}"
            if self._timing.duplicate_window_s > 0:
                key = await self._requests.claim_keyless(new.fingerprint(), key, self._timing.duplicate_window_s)
        return await self._detached(self._claimed_create(new, key, audited))

    async def _claimed_create(self, new: NewInvoice, key: str, audited: Audited) -> dict[str, Any]:
        claim = await self._claim(key, (new.fingerprint(), new.legacy_fingerprint()), audited)
        if not isinstance(claim, CreateClaim):
            return claim
        progress = _Progress(claim.stripe_invoice_id)
        return await self._attempt(
            key,
            claim,
            lambda gen: self._run(new, key, claim, progress, gen),
            lambda i: (str(i["id"]), i),
            lambda: dataclasses.replace(audited, stripe_invoice_id=progress.invoice_id),
        )

    async def _find(self, new: NewInvoice, key: str, claim: CreateClaim, known: str | None) -> dict[str, Any] | None:
        """The invoice an earlier attempt (or run) made: by its recorded id; else by the
        key in its metadata; for a Create of the service before it recorded progress
        (`legacy`), by its content, among the invoices no other key names."""
        stripe = self._payments
        if known is not None:
            return await stripe.retrieve(known)
        if claim.step == "legacy":
            found = await stripe.find_unmarked(new, claim.created_at)
            recorded = await self._requests.recorded_invoices([str(i["id"]) for i in found]) if found else set()
            found = [i for i in found if i["id"] not in recorded]
            if len(found) > 1:
                ids = ", ".join(str(i["id"]) for i in found)
                raise FailedPrecondition(f"this Create was cut off before an upgrade and may have made any of {ids}")
            return found[0] if found else None
        if claim.attempt > 1:
            return await stripe.find_draft(new.customer, key, claim.created_at)
        return None

    async def _run(
        self, new: NewInvoice, key: str, claim: CreateClaim, progress: _Progress, generation: int
    ) -> dict[str, Any]:
        """Each step only if Stripe does not show it done; the lease is renewed (and the
        attempt's hold checked) before every Stripe call."""
        stripe = self._payments

        async def record(step: str) -> None:
            await self._requests.record_create_step(key, claim.attempt, step, progress.invoice_id, self._timing.lease_s)

        invoice = await self._find(new, key, claim, progress.invoice_id)
        if invoice is None:
            await record("claimed")
            invoice = await stripe.create_draft(new, key, _stripe_key(key, generation, "invoice"))
        elif progress.invoice_id is None:
            log.info("resumed an invoice found in Stripe", extra={"invoice": invoice["id"], "attempt": claim.attempt})
        progress.invoice_id = invoice_id = str(invoice["id"])
        await record("drafted")
        if invoice.get("status") == Status.DRAFT:
            batches = stripe.batches(new.items)
            for n in range(lines_done(invoice, batches), len(batches)):
                invoice = await stripe.add_lines(invoice_id, batches[n], _stripe_key(key, generation, f"lines-{n}"))
                await record("drafted" if n + 1 < len(batches) else "lined")
            invoice = await stripe.finalize(invoice_id, _stripe_key(key, generation, "finalize"))
            await record("finalized")
        if invoice.get("status") == Status.OPEN:
            invoice = await stripe.pay(invoice_id, new.payment_method, _stripe_key(key, generation, "pay"))
        return invoice

    async def pay(self, invoice_id: str, payment_method: str | None, idempotency_key: str | None) -> Invoice:
        """Charges an open or uncollectible invoice now; a paid one is answered as it is."""

        async def act(current: dict[str, Any], stripe_key: str) -> dict[str, Any]:
            status = current.get("status")
            if status == Status.PAID:
                return current
            if status not in (Status.OPEN, Status.UNCOLLECTIBLE):
                raise FailedPrecondition(f"invoice {current['id']} is {status}; only open or uncollectible can be paid")
            return await self._payments.pay(str(current["id"]), payment_method, stripe_key, declined_ok=False)

        return await self._manage("pay", invoice_id, {"payment_method": payment_method}, idempotency_key, act)

    async def void(self, invoice_id: str, idempotency_key: str | None) -> Invoice:
        """Voids an open or uncollectible invoice; a void one is answered as it is."""

        async def act(current: dict[str, Any], stripe_key: str) -> dict[str, Any]:
            status = current.get("status")
            if status == Status.VOID:
                return current
            if status not in (Status.OPEN, Status.UNCOLLECTIBLE):
                raise FailedPrecondition(
                    f"invoice {current['id']} is {status}; only open or uncollectible can be voided"
                )
            return await self._payments.void(str(current["id"]), stripe_key)

        return await self._manage("void", invoice_id, {}, idempotency_key, act)

    async def _manage(
        self,
        operation: str,
        invoice_id: str,
        fields: dict[str, Any],
        idempotency_key: str | None,
        act: Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]],
    ) -> Invoice:
        """Pay and Void: the key's rules as for Create (a finished key answers the record
        without calling Stripe; another request with it is ALREADY_EXISTS), Stripe's
        current invoice read before acting, and the record written from Stripe's answer,
        so that a GET right after shows it."""
        stripe_id = await self._stripe_id(invoice_id)
        key = idempotency_key or f"{operation}:{uuid.uuid4().hex}"
        audited = _audited(operation, idempotency_key, stripe_id)

        async def run(generation: int) -> Invoice:
            # What Stripe answers is true as of the second before the call: an event of the
            # same second may be newer, and wins the tie (as in reconcile).
            asked_at = int(time.time()) - 1
            current = await self._payments.retrieve(stripe_id)
            answer = await act(current, _stripe_key(key, generation, operation))
            return await self._records.record_stripe_invoice(invoice_from_stripe(answer), stripe_time=asked_at)

        async def claimed() -> Invoice:
            claim = await self._claim(key, (fingerprint(operation, {"invoice": stripe_id, **fields}),), audited)
            if not isinstance(claim, CreateClaim):
                return await self._records.get_invoice(stripe_id)
            return await self._attempt(key, claim, run, lambda _: (stripe_id, {"invoice": stripe_id}), lambda: audited)

        return await self._detached(claimed())

    async def _stripe_id(self, invoice_id: str) -> str:
        """Stripe's id of the invoice named by the service's `_id` or by `in_...`; an
        `in_...` id the store does not know yet (its webhook has not arrived) is asked of
        Stripe."""
        try:
            return (await self._records.get_invoice(invoice_id)).stripe_invoice_id
        except NotFound:
            if not invoice_id.startswith("in_"):
                raise
        if not await self._payments.exists(invoice_id):
            raise NotFound(f"invoice {invoice_id} not found")
        return invoice_id
