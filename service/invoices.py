"""Creating an invoice so that it is billed once, whatever fails in between: the key's
row in Postgres records each step as it is done (the Stripe draft's id first of all), and
a retry resumes from what Stripe shows, never from Stripe's own idempotency cache alone,
which forgets after 24 hours and replays a 500 or a refusal for as long (service/attempts.py
says when a retry moves on to new Stripe keys). Also Pay, Void and MarkUncollectible, the
verbs that manage an invoice after it exists. Knows no SQL and no status codes."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service.attempts import CreateRequests, Timing, audited_call, stripe_key
from service.credit_notes import RefundAsk
from service.domain import (
    Audited,
    CreateClaim,
    FailedPrecondition,
    Invoice,
    NewInvoice,
    NewItem,
    Status,
    StripeInvoice,
    Unavailable,
    fingerprint,
)
from service.payments import StripePayments
from service.refunds import Refunding, RefundRecords
from service.stripe_objects import invoice_from_stripe

log = logging.getLogger(__name__)
# Timing is built by the composition root and the tests with the creator.
__all__ = ["InvoiceCreator", "NoStripe", "Timing", "lines_done"]


class InvoiceRecords(RefundRecords, Protocol):
    async def get_invoice(self, key: str) -> Invoice: ...
    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice: ...


_NO_STRIPE = "Stripe is not configured on this server (STRIPE_API_KEY)"


class NoStripe:
    """The creator of a server started without STRIPE_API_KEY: reads work, writes cannot."""

    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]:
        raise Unavailable(_NO_STRIPE)

    async def pay(self, invoice_id: str, payment_method: str | None, idempotency_key: str | None) -> Invoice:
        raise Unavailable(_NO_STRIPE)

    async def void(self, invoice_id: str, idempotency_key: str | None) -> Invoice:
        raise Unavailable(_NO_STRIPE)

    async def mark_uncollectible(self, invoice_id: str, idempotency_key: str | None) -> Invoice:
        raise Unavailable(_NO_STRIPE)

    async def refund(self, invoice_id: str, ask: RefundAsk, idempotency_key: str | None) -> Invoice:
        raise Unavailable(_NO_STRIPE)


@dataclass(frozen=True)
class _Verb:
    """A verb that moves an existing invoice to a status of its own: its name (the audit
    entry's action, the prefix of a keyless call's key), the status it leads to, the
    statuses Stripe does it from, and the words a refusal names it by."""

    operation: str
    goal: Status
    acts_on: tuple[Status, ...]
    done: str


_PAY = _Verb("pay", Status.PAID, (Status.OPEN, Status.UNCOLLECTIBLE), "paid")
_VOID = _Verb("void", Status.VOID, (Status.OPEN, Status.UNCOLLECTIBLE), "voided")
_MARK_UNCOLLECTIBLE = _Verb("mark_uncollectible", Status.UNCOLLECTIBLE, (Status.OPEN,), "marked uncollectible")


@dataclass
class _Progress:
    """What one attempt learned, across its runs: the Stripe invoice's id."""

    invoice_id: str | None


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


class InvoiceCreator(Refunding):
    """Create, Pay, Void and MarkUncollectible (and RefundInvoice, from Refunding), each an
    attempt of its idempotency key (KeyedAttempts)."""

    def __init__(self, requests: CreateRequests, records: InvoiceRecords, payments: StripePayments, timing: Timing):
        super().__init__(requests, timing)
        self._records = records
        self._payments = payments

    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]:
        audited = audited_call("create", idempotency_key)
        key = idempotency_key
        if key is None:
            # A key of the service's own, shared by identical requests within the window,
            # so that a keyless caller's retry answers the first invoice instead of billing
            # again.
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
            invoice = await stripe.create_draft(new, key, stripe_key(key, generation, "invoice"))
        elif progress.invoice_id is None:
            log.info("resumed an invoice found in Stripe", extra={"invoice": invoice["id"], "attempt": claim.attempt})
        progress.invoice_id = invoice_id = str(invoice["id"])
        await record("drafted")
        if invoice.get("status") == Status.DRAFT:
            batches = stripe.batches(new.items)
            for n in range(lines_done(invoice, batches), len(batches)):
                invoice = await stripe.add_lines(invoice_id, batches[n], stripe_key(key, generation, f"lines-{n}"))
                await record("drafted" if n + 1 < len(batches) else "lined")
            invoice = await stripe.finalize(invoice_id, stripe_key(key, generation, "finalize"))
            await record("finalized")
        if invoice.get("status") == Status.OPEN:
            invoice = await stripe.pay(invoice_id, new.payment_method, stripe_key(key, generation, "pay"))
        return invoice

    async def pay(self, invoice_id: str, payment_method: str | None, idempotency_key: str | None) -> Invoice:
        """Charges an open or uncollectible invoice now; a paid one is answered as it is."""

        async def act(invoice_id: str, key: str) -> dict[str, Any]:
            return await self._payments.pay(invoice_id, payment_method, key, declined_ok=False)

        return await self._manage(_PAY, invoice_id, {"payment_method": payment_method}, idempotency_key, act)

    async def void(self, invoice_id: str, idempotency_key: str | None) -> Invoice:
        """Voids an open or uncollectible invoice; a void one is answered as it is."""
        return await self._manage(_VOID, invoice_id, {}, idempotency_key, self._payments.void)

    async def mark_uncollectible(self, invoice_id: str, idempotency_key: str | None) -> Invoice:
        """Writes an open invoice off; an uncollectible one is answered as it is."""
        act = self._payments.mark_uncollectible
        return await self._manage(_MARK_UNCOLLECTIBLE, invoice_id, {}, idempotency_key, act)

    async def _manage(
        self,
        verb: _Verb,
        invoice_id: str,
        fields: dict[str, Any],
        idempotency_key: str | None,
        act: Callable[[str, str], Awaitable[dict[str, Any]]],
    ) -> Invoice:
        """Pay, Void and MarkUncollectible: the key's rules as for Create (a finished key
        answers the record without calling Stripe; another request with it is
        ALREADY_EXISTS), Stripe's current invoice read before acting, and the record
        written from what Stripe says, so that a GET right after shows it. An invoice
        already at the verb's goal is answered as it is; one in a status from which it
        cannot get there (draft; paid for a Void) is FAILED_PRECONDITION naming that
        status, whether the read before the call shows it or the read after Stripe refused
        the call (it changed in between: paid or voided from Stripe's dashboard;
        payments._after_refusal), and recorded."""
        operation = verb.operation
        stripe_id = await self._stripe_id(invoice_id)
        key = idempotency_key or f"{operation}:{uuid.uuid4().hex}"
        audited = audited_call(operation, idempotency_key, stripe_id)

        async def run(generation: int) -> Invoice:
            # What Stripe answers is true as of the second before the call: an event of the
            # same second may be newer, and wins the tie (as in reconcile).
            asked_at = int(time.time()) - 1
            answer = await self._payments.retrieve(stripe_id)
            if answer.get("status") in verb.acts_on:
                answer = await act(stripe_id, stripe_key(key, generation, operation))
            record = await self._records.record_stripe_invoice(invoice_from_stripe(answer), stripe_time=asked_at)
            if answer.get("status") != verb.goal:
                status, allowed = answer.get("status"), " or ".join(verb.acts_on)
                raise FailedPrecondition(f"invoice {stripe_id} is {status}; only {allowed} can be {verb.done}")
            return record

        async def claimed() -> Invoice:
            claim = await self._claim(key, (fingerprint(operation, {"invoice": stripe_id, **fields}),), audited)
            if not isinstance(claim, CreateClaim):
                return await self._records.get_invoice(stripe_id)
            return await self._attempt(key, claim, run, lambda _: (stripe_id, {"invoice": stripe_id}), lambda: audited)

        return await self._detached(claimed())
