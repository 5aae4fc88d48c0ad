"""The Stripe calls about money given back: an invoice's credit notes, the one a refund
creates, the refunds of the invoice's payments whatever made them, and which invoice a
payment intent paid. A base of service/payments.py's StripePayments, whose `_call` times
each call and maps Stripe's errors to domain errors; service/refunds.py and
service/reconcile.py decide when to make them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import stripe
from stripe.params import CreditNoteCreateParams, CreditNoteListParams

from service.credit_notes import RefundAsk
from service.stripe_objects import CREATE_KEY

T = TypeVar("T")


class MoneyBackCalls:
    """One method per call, each answering Stripe's objects as plain dicts."""

    _stripe: stripe.StripeClient

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        raise NotImplementedError  # StripePayments'

    async def credit_notes(self, invoice_id: str) -> list[dict[str, Any]]:
        """Every credit note of the invoice, newest first."""
        params: CreditNoteListParams = {"invoice": invoice_id, "limit": 100}
        return [
            note async for note in self._pages("credit_notes.list", self._stripe.v1.credit_notes.list_async, params)
        ]

    async def refund(self, invoice_id: str, amount: int, ask: RefundAsk, key: str, stripe_key: str) -> dict[str, Any]:
        """A credit note for `amount`, all of it refunded to the invoice's payment, carrying
        the RefundInvoice's key in its metadata (service/refunds.py finds it by that)."""
        params: CreditNoteCreateParams = {
            "invoice": invoice_id,
            "amount": amount,
            "refund_amount": amount,
            "metadata": {CREATE_KEY: key},
        }
        if ask.reason:
            params["reason"] = ask.reason
        if ask.memo:
            params["memo"] = ask.memo
        call = self._stripe.v1.credit_notes.create_async(params, {"idempotency_key": stripe_key})
        return (await self._call("credit_notes.create", call)).to_dict(for_json=True)

    async def refunds_of(self, invoice_id: str) -> list[dict[str, Any]]:
        """Every refund of the invoice's payments, made by a credit note or without one (the
        Dashboard, the API): a refund outside any note still takes from what a note may
        refund, and Stripe refuses a note's refund beyond what the payment has left."""
        found: list[dict[str, Any]] = []
        listing = self._stripe.v1.invoice_payments.list_async
        async for payment in self._pages("invoice_payments.list", listing, {"invoice": invoice_id, "limit": 100}):
            intent = (payment.get("payment") or {}).get("payment_intent")
            if not intent:
                continue  # paid by other than a payment intent: no refund names it
            params = {"payment_intent": intent if isinstance(intent, str) else intent["id"], "limit": 100}
            found += [
                refund async for refund in self._pages("refunds.list", self._stripe.v1.refunds.list_async, params)
            ]
        return found

    async def _pages(
        self, operation: str, list_async: Callable[[Any], Awaitable[Any]], params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Every object of a listing, page after page."""
        while True:
            page = await self._call(operation, list_async(params))
            for obj in page.data:
                yield obj.to_dict(for_json=True)
            if not page.has_more or not page.data:
                return
            params = {**params, "starting_after": str(page.data[-1].id)}

    async def invoice_payment_of(self, payment_intent: str) -> dict[str, Any] | None:
        """The invoice payment a payment intent made, if it paid an invoice."""
        params: Any = {"payment": {"type": "payment_intent", "payment_intent": payment_intent}, "limit": 1}
        page = await self._call("invoice_payments.list", self._stripe.v1.invoice_payments.list_async(params))
        return page.data[0].to_dict(for_json=True) if page.data else None
