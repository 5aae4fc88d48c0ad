"""Reconcile's logic: Stripe's listed invoices and credit notes applied to the store as of
when each was listed, the fix for webhooks that never arrived (service/app.py wires the
run: its pool, its Stripe client). One object the service cannot read or record is
reported (`rejected`, logged at ERROR) and the others still count: Stripe lists newest
first, so stopping would leave every older one behind."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Protocol

from service import stripe_objects
from service.credit_notes import StripeCreditNote
from service.domain import InvalidArgument, Outcome, StripeInvoice, Unrecordable

log = logging.getLogger(__name__)


class ReconciledStore(Protocol):
    async def apply_stripe_invoice(self, invoice: StripeInvoice, *, stripe_time: int) -> Outcome: ...
    async def apply_stripe_credit_note(self, note: StripeCreditNote, *, stripe_time: int) -> Outcome: ...


async def reconcile_from(listed: AsyncIterator[tuple[dict[str, Any], int]], store: ReconciledStore) -> Counter[str]:
    """Applies each listed Stripe invoice as of when it was listed."""
    outcomes: Counter[str] = Counter()
    async for obj, asked_at in listed:
        try:
            invoice = stripe_objects.invoice_from_stripe(obj)
            outcomes[await store.apply_stripe_invoice(invoice, stripe_time=asked_at)] += 1
        except (InvalidArgument, Unrecordable) as error:
            log.error("invoice not reconciled", extra={"invoice": str(obj.get("id")), "reason": str(error)})
            outcomes["rejected"] += 1
    return outcomes


async def reconcile_notes_from(
    listed: AsyncIterator[tuple[dict[str, Any], int]], store: ReconciledStore
) -> Counter[str]:
    """Applies each listed Stripe credit note as of when it was listed; the outcomes are
    counted apart from the invoices' (`notes_updated`, ...)."""
    outcomes: Counter[str] = Counter()
    async for obj, asked_at in listed:
        try:
            note = stripe_objects.credit_note_from_stripe(obj)
            outcomes[f"notes_{await store.apply_stripe_credit_note(note, stripe_time=asked_at)}"] += 1
        except (InvalidArgument, Unrecordable) as error:
            log.error("credit note not reconciled", extra={"note": str(obj.get("id")), "reason": str(error)})
            outcomes["notes_rejected"] += 1
    return outcomes
