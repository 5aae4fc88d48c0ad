"""RefundInvoice: money given back on a paid invoice as one Stripe credit note refunded to
the invoice's payment, however the call is retried or cut off. An attempt of the key
(service/attempts.py) first looks for the note an earlier attempt made, by the key in its
metadata, among the invoice's notes at Stripe; only if there is none does it check what is
left to refund and create one, under the generation's Stripe key, so that a create still
in flight and its retry collapse into one at Stripe. The note and the invoice are then
recorded from what Stripe says. Knows no SQL and no status codes."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Protocol

from service.attempts import KeyedAttempts, audited_call, stripe_key
from service.credit_notes import NoteStatus, RefundAsk, StripeCreditNote, StripeRefund, refunded_outside
from service.domain import (
    CreateClaim,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    Invoice,
    NotFound,
    Status,
    StripeInvoice,
    StripeReplayed,
)
from service.domain import fingerprint as fingerprint_of
from service.payments import StripePayments
from service.stripe_objects import CREATE_KEY, credit_note_from_stripe, invoice_from_stripe, refund_from_stripe

log = logging.getLogger(__name__)


class RefundRecords(Protocol):
    async def get_invoice(self, key: str) -> Invoice: ...
    async def record_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Invoice: ...
    async def record_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> None: ...
    async def record_stripe_refunds(
        self, stripe_invoice_id: str, refunds: list[StripeRefund], *, stripe_time: int
    ) -> None: ...


def left_to_refund(invoice: dict[str, Any], notes: list[StripeCreditNote], refunds: list[StripeRefund]) -> int:
    """What a credit note may still refund: no more than was paid less what the issued
    notes refunded and what refunds outside them gave back (Stripe refuses a note's refund
    beyond what the payment has left), and no more than the invoice's total less every
    note's amount (a note's credit to the balance counts against the total too)."""
    issued = [n for n in notes if n.status == NoteStatus.ISSUED]
    paid = int(invoice.get("amount_paid") or 0) - sum(n.refunded for n in issued) - refunded_outside(notes, refunds)
    creditable = int(invoice.get("total") or 0) - sum(n.amount for n in issued)
    return max(0, min(paid, creditable))


class Refunding(KeyedAttempts):
    """RefundInvoice, an attempt of its idempotency key (the base of InvoiceCreator, which
    holds the records and the Stripe calls)."""

    _records: RefundRecords
    _payments: StripePayments

    async def refund(self, invoice_id: str, ask: RefundAsk, idempotency_key: str | None) -> Invoice:
        stripe_id = await self._stripe_id(invoice_id)
        key = idempotency_key or f"refund:{uuid.uuid4().hex}"
        audited = audited_call("refund", idempotency_key, stripe_id)

        async def run(generation: int) -> Invoice:
            asked_at = int(time.time()) - 1  # as in Pay: an event of the same second wins
            notes = await self._payments.credit_notes(stripe_id)
            made = next((n for n in notes if (n.get("metadata") or {}).get(CREATE_KEY) == key), None)
            if made is None:  # no earlier attempt (or run) of the key made one
                made = await self._create(stripe_id, ask, (key, stripe_key(key, generation, "refund")), asked_at, notes)
            await self._records.record_stripe_credit_note(credit_note_from_stripe(made), stripe_time=asked_at)
            invoice = await self._payments.retrieve(stripe_id)
            return await self._records.record_stripe_invoice(invoice_from_stripe(invoice), stripe_time=asked_at)

        async def claimed() -> Invoice:
            fields = {"invoice": stripe_id, **ask.fields()}
            claim = await self._claim(key, (fingerprint_of("refund", fields),), audited)
            if not isinstance(claim, CreateClaim):
                return await self._records.get_invoice(stripe_id)
            return await self._attempt(key, claim, run, lambda _: (stripe_id, {"invoice": stripe_id}), lambda: audited)

        return await self._detached(claimed())

    async def _create(
        self, stripe_id: str, ask: RefundAsk, keys: tuple[str, str], asked_at: int, notes: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The credit note, once the invoice shows it paid with enough left to refund
        (`notes`: the invoice's, as just listed). Stripe refusing it (another refund took
        what was left meanwhile) is answered from what is left then, as the check before
        would have."""
        amount = await self._amount(stripe_id, ask, asked_at, notes)
        try:
            return await self._payments.refund(stripe_id, amount, ask, *keys)
        except DomainError as error:
            if isinstance(error, StripeReplayed | FailedPrecondition):
                raise
            await self._amount(stripe_id, ask, asked_at)  # FAILED_PRECONDITION if that is why
            raise

    async def _amount(
        self, stripe_id: str, ask: RefundAsk, asked_at: int, notes: list[dict[str, Any]] | None = None
    ) -> int:
        invoice = await self._payments.retrieve(stripe_id)
        status = invoice.get("status")
        if status != Status.PAID:
            await self._records.record_stripe_invoice(invoice_from_stripe(invoice), stripe_time=asked_at)
            raise FailedPrecondition(f"invoice {stripe_id} is {status}; only paid can be refunded")
        listed = notes if notes is not None else await self._payments.credit_notes(stripe_id)
        described = [credit_note_from_stripe(n) for n in listed]
        for note in described:  # recorded first: a note kept without its refunds learns them
            await self._records.record_stripe_credit_note(note, stripe_time=asked_at)
        refunds = await self._refunds(stripe_id, asked_at)
        left = left_to_refund(invoice, described, refunds)
        currency = invoice.get("currency") or ""
        if left == 0:
            raise FailedPrecondition(f"invoice {stripe_id} has nothing left to refund")
        if ask.amount is not None and ask.amount > left:
            raise FailedPrecondition(f"invoice {stripe_id} has {left} {currency} (minor units) left to refund")
        return ask.amount or left

    async def _refunds(self, stripe_id: str, asked_at: int) -> list[StripeRefund]:
        """The refunds of the invoice's payments, recorded as Stripe listed them: one made
        without a note may not have reached the record by its webhook yet, and the answer
        should show what the check counted."""
        refunds = []
        for obj in await self._payments.refunds_of(stripe_id):
            try:
                refund = refund_from_stripe(obj)
            except InvalidArgument as error:  # the webhook rejects it too, at ERROR
                log.warning("a refund the service cannot read", extra={"refund": obj.get("id"), "error": str(error)})
                continue
            if refund is not None:
                refunds.append(refund)
        await self._records.record_stripe_refunds(stripe_id, refunds, stripe_time=asked_at)
        return refunds

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
