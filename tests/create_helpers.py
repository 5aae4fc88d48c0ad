"""What the Create tests share (tests/test_create_*.py, test_stripe_refusals.py): the
service's real StripePayments, counting its calls and optionally cut off right after a
step reached Stripe; a request; an InvoiceCreator with the tests' lease; the emulator's
/_config/ hooks; and a customer's invoices as Stripe holds them. No tests here."""

from __future__ import annotations

from typing import Any

import httpx
import stripe

from service import validation
from service.domain import (
    NewInvoice,
)
from service.invoices import InvoiceCreator, Timing
from service.payments import StripePayments
from service.storage import Storage


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
