"""Creating an invoice: the idempotency bookkeeping around the Stripe calls. A retry
with the same key answers the stored invoice; one whose first attempt did not finish
repeats the Stripe calls with the same derived keys, which Stripe answers with the
objects it already made, so no second invoice can appear."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from service.domain import NewInvoice, Unavailable
from service.payments import StripePayments


class CreateRequests(Protocol):
    async def claim_create(self, key: str, fingerprint: str) -> dict[str, Any] | None: ...
    async def finish_create(self, key: str, stripe_invoice_id: str, response: dict[str, Any]) -> None: ...


class NoStripe:
    """The creator of a server started without STRIPE_API_KEY: reads work, creates cannot."""

    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]:
        raise Unavailable("Stripe is not configured on this server (STRIPE_API_KEY)")


class InvoiceCreator:
    def __init__(self, requests: CreateRequests, payments: StripePayments) -> None:
        self._requests = requests
        self._payments = payments

    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]:
        if idempotency_key is None:
            # Still one key for all calls of this Create, so the SDK's own retries are safe.
            return await self._payments.create_invoice(new, uuid.uuid4().hex)
        stored = await self._requests.claim_create(idempotency_key, new.fingerprint())
        if stored is not None:
            return stored
        invoice = await self._payments.create_invoice(new, idempotency_key)
        await self._requests.finish_create(idempotency_key, str(invoice["id"]), invoice)
        return invoice
