"""Creating an invoice so that it is billed once, whatever fails in between: the key's
row in Postgres records each step as it is done (the Stripe draft's id first of all), and
a retry resumes from what Stripe shows, never from Stripe's own idempotency cache alone,
which forgets after 24 hours and replays a 500 for as long. Also Pay and Void, the verbs
that manage an invoice after it exists. Knows no SQL and no status codes."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from service.domain import (
    CreateClaim,
    CreateInProgress,
    FailedPrecondition,
    Internal,
    Invoice,
    NewInvoice,
    NewItem,
    NotFound,
    StripeInvoice,
    Unavailable,
    fingerprint,
)
from service.payments import StripePayments, invoice_from_stripe

log = logging.getLogger(__name__)
T = TypeVar("T")


class CreateRequests(Protocol):
    async def claim_create(
        self, key: str, fingerprints: tuple[str, ...], customer: str | None, lease_s: float
    ) -> dict[str, Any] | CreateClaim: ...
    async def record_create_step(
        self, key: str, attempt: int, step: str, stripe_invoice_id: str | None, lease_s: float
    ) -> None: ...
    async def finish_create(self, key: str, attempt: int, stripe_invoice_id: str, response: dict[str, Any]) -> None: ...
    async def release_create(self, key: str, attempt: int) -> None: ...
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
    """How long an attempt owns its key without recording progress (longer than one
    Stripe call with the SDK's retries can take, or a second attempt could run beside
    it); how long a duplicate waits for the attempt in progress; the keyless window."""

    lease_s: float = 40.0
    wait_s: float = 10.0
    poll_s: float = 0.1
    duplicate_window_s: float = 120.0


def _stripe_key(key: str, attempt: int, step: str) -> str:
    """Stripe's Idempotency-Key for one step of one attempt. Each attempt has its own, so
    a 500 Stripe saved under the last attempt's key is never replayed to this one; that
    is safe because an attempt only calls a step whose effect it found absent."""
    return f"invoice-service:{key}:{attempt}:{step}"


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
    raise Internal(f"the Stripe draft {invoice.get('id')} holds lines the service did not add")


class InvoiceCreator:
    def __init__(self, requests: CreateRequests, records: InvoiceRecords, payments: StripePayments, timing: Timing):
        self._requests = requests
        self._records = records
        self._payments = payments
        self._timing = timing
        # Attempts run as tasks of their own: a caller that goes away (Envoy's route
        # timeout, a client deadline) must not cut an attempt between Stripe charging and
        # the row recording it. Held here so that they are not garbage-collected.
        self._running: set[asyncio.Task[Any]] = set()

    async def _detached(self, work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _claim(
        self, key: str, fingerprints: tuple[str, ...], customer: str | None
    ) -> dict[str, Any] | CreateClaim:
        """Claims the key, waiting a while for an attempt in progress to answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timing.wait_s
        while True:
            try:
                return await self._requests.claim_create(key, fingerprints, customer, self._timing.lease_s)
            except CreateInProgress:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(self._timing.poll_s)

    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]:
        key = idempotency_key
        if key is None:
            # A key of the service's own, shared by identical requests within the window,
            # so that a keyless caller's retry answers the first invoice instead of billing
            # again.
            key = f"keyless:{uuid.uuid4().hex}"
            if self._timing.duplicate_window_s > 0:
                key = await self._requests.claim_keyless(new.fingerprint(), key, self._timing.duplicate_window_s)
        claim = await self._claim(key, (new.fingerprint(), new.legacy_fingerprint()), new.customer)
        if not isinstance(claim, CreateClaim):
            return claim
        return await self._detached(self._attempt(new, key, claim))

    async def _attempt(self, new: NewInvoice, key: str, claim: CreateClaim) -> dict[str, Any]:
        try:
            invoice = await self._run(new, key, claim)
        except BaseException:
            await self._requests.release_create(key, claim.attempt)
            raise
        await self._requests.finish_create(key, claim.attempt, str(invoice["id"]), invoice)
        return invoice

    async def _run(self, new: NewInvoice, key: str, claim: CreateClaim) -> dict[str, Any]:
        """Each step only if Stripe does not show it done: a resumed attempt first finds
        the draft (by the recorded id, or by the key in its metadata), then continues."""
        stripe, attempt = self._payments, claim.attempt

        async def record(step: str, stripe_invoice_id: str | None = None) -> None:
            await self._requests.record_create_step(key, attempt, step, stripe_invoice_id, self._timing.lease_s)

        invoice: dict[str, Any] | None = None
        if claim.stripe_invoice_id is not None:
            invoice = await stripe.retrieve(claim.stripe_invoice_id)
        elif attempt > 1:
            invoice = await stripe.find_draft(new.customer, key, claim.created_at)
            if invoice is not None:
                log.info("resumed a draft found in Stripe", extra={"invoice": invoice["id"], "attempt": attempt})
        if invoice is None:
            invoice = await stripe.create_draft(new, key, _stripe_key(key, attempt, "invoice"))
        invoice_id = str(invoice["id"])
        if claim.stripe_invoice_id is None:
            await record("drafted", invoice_id)
        if invoice.get("status") == "draft":
            batches = stripe.batches(new.items)
            for n in range(lines_done(invoice, batches), len(batches)):
                invoice = await stripe.add_lines(invoice_id, batches[n], _stripe_key(key, attempt, f"lines-{n}"))
            await record("lined")
            invoice = await stripe.finalize(invoice_id, _stripe_key(key, attempt, "finalize"))
            await record("finalized")
        if invoice.get("status") == "open":
            invoice = await stripe.pay(invoice_id, new.payment_method, _stripe_key(key, attempt, "pay"))
        return invoice

    async def pay(self, invoice_id: str, payment_method: str | None, idempotency_key: str | None) -> Invoice:
        """Charges an open or uncollectible invoice now; a paid one is answered as it is."""

        async def act(current: dict[str, Any], stripe_key: str) -> dict[str, Any]:
            status = current.get("status")
            if status == "paid":
                return current
            if status not in ("open", "uncollectible"):
                raise FailedPrecondition(f"invoice {current['id']} is {status}; only open or uncollectible can be paid")
            return await self._payments.pay(str(current["id"]), payment_method, stripe_key)

        return await self._manage("pay", invoice_id, {"payment_method": payment_method}, idempotency_key, act)

    async def void(self, invoice_id: str, idempotency_key: str | None) -> Invoice:
        """Voids an open or uncollectible invoice; a void one is answered as it is."""

        async def act(current: dict[str, Any], stripe_key: str) -> dict[str, Any]:
            status = current.get("status")
            if status == "void":
                return current
            if status not in ("open", "uncollectible"):
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
        claim = await self._claim(key, (fingerprint(operation, {"invoice": stripe_id, **fields}),), None)
        if not isinstance(claim, CreateClaim):
            return await self._records.get_invoice(stripe_id)

        async def attempt() -> Invoice:
            try:
                # What Stripe answers is true as of the second before the call: an event of
                # the same second may be newer, and wins the tie (as in reconcile).
                asked_at = int(time.time()) - 1
                current = await self._payments.retrieve(stripe_id)
                answer = await act(current, _stripe_key(key, claim.attempt, operation))
                record = await self._records.record_stripe_invoice(invoice_from_stripe(answer), stripe_time=asked_at)
            except BaseException:
                await self._requests.release_create(key, claim.attempt)
                raise
            await self._requests.finish_create(key, claim.attempt, stripe_id, {"invoice": stripe_id})
            return record

        return await self._detached(attempt())

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
