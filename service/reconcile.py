"""Reconcile's logic: Stripe's listed invoices, credit notes, invoice payments and refunds
applied to the store as of when each was listed, the fix for webhooks that never arrived
(service/app.py wires the run: its pool, its Stripe client). One object the service cannot
read or record is reported (`rejected`, logged at ERROR) and the others still count:
Stripe lists newest first, so stopping would leave every older one behind."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from service import stripe_objects
from service.credit_notes import InvoicePayment, StripeCreditNote, StripeRefund
from service.domain import InvalidArgument, Outcome, StripeInvoice, Unrecordable

log = logging.getLogger(__name__)

T = TypeVar("T")
Listed = AsyncIterator[tuple[dict[str, Any], int]]


class ReconciledStore(Protocol):
    async def apply_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Outcome: ...
    async def apply_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> Outcome: ...
    async def apply_stripe_refund(self, refund: StripeRefund, *, stripe_time: int) -> Outcome: ...
    async def apply_stripe_invoice_payment(self, payment: InvoicePayment) -> Outcome: ...


async def _reconciled(
    listed: Listed,
    read: Callable[[dict[str, Any]], T | None],
    apply: Callable[[T, int], Awaitable[Outcome]],
    kind: str,
    prefix: str = "",
) -> Counter[str]:
    """Applies each listed object as of when it was listed, counting outcomes under
    `prefix`; one that `read` answers None for (not an invoice's) is `ignored`."""
    outcomes: Counter[str] = Counter()
    async for obj, asked_at in listed:
        try:
            read_obj = read(obj)
            outcome = "ignored" if read_obj is None else await apply(read_obj, asked_at)
            outcomes[f"{prefix}{outcome}"] += 1
        except (InvalidArgument, Unrecordable) as error:
            log.error(
                f"{kind} not reconciled", extra={kind.replace(" ", "_"): str(obj.get("id")), "reason": str(error)}
            )
            outcomes[f"{prefix}rejected"] += 1
    return outcomes


async def reconcile_from(listed: Listed, store: ReconciledStore) -> Counter[str]:
    """Applies each listed Stripe invoice as of when it was listed."""

    async def apply(invoice: StripeInvoice, at: int) -> Outcome:
        return await store.apply_stripe_invoice(invoice, stripe_time=at)

    return await _reconciled(listed, stripe_objects.invoice_from_stripe, apply, "invoice")


async def reconcile_notes_from(listed: Listed, store: ReconciledStore) -> Counter[str]:
    """Applies each listed Stripe credit note as of when it was listed; the outcomes are
    counted apart from the invoices' (`notes_updated`, ...)."""

    async def apply(note: StripeCreditNote, at: int) -> Outcome:
        return await store.apply_stripe_credit_note(note, stripe_time=at)

    return await _reconciled(listed, stripe_objects.credit_note_from_stripe, apply, "credit note", "notes_")


async def reconcile_refunds_from(
    listed: Listed, payment_of: Callable[[str], Awaitable[dict[str, Any] | None]], store: ReconciledStore
) -> Counter[str]:
    """Applies each listed Stripe refund as of when it was listed (`refunds_created`, ...),
    after the invoice payment its payment intent made, asked of Stripe (`payment_of`): the
    payment may be older than the listing's start. A refund of no payment intent, or of one
    that paid no invoice, pays back no invoice (`refunds_ignored`, still recorded)."""
    asked: set[str] = set()

    async def apply(refund: StripeRefund, at: int) -> Outcome:
        if refund.payment_intent not in asked:
            asked.add(refund.payment_intent)
            paid = await payment_of(refund.payment_intent)
            payment = None if paid is None else stripe_objects.invoice_payment_from_stripe(paid)
            if payment is not None:
                await store.apply_stripe_invoice_payment(payment)
        return await store.apply_stripe_refund(refund, stripe_time=at)

    return await _reconciled(listed, stripe_objects.refund_from_stripe, apply, "refund", "refunds_")
