"""The Stripe emulator's webhooks (the tools/localstripe package): each invoice step
sends Stripe's events, signed with the endpoint's secret, each type once, and
/_config/deliveries counts a delivery until its receiver answered. Only the emulator's
side: what the service does with events is tested elsewhere."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import stripe

from tests import emulator_helpers as shared
from tests.emulator_helpers import (
    Receiver,
    draft_params,
    key,
    open_invoice,
)
from tools.customers import DECLINED_ON_CHARGE, customer_with_card

# The shared fixtures (tests/emulator_helpers.py): this module gets an emulator of its own
# (module scope), so that no other module's webhooks reach its receivers.
emulator, client, config, receiver = shared.emulator, shared.client, shared.config, shared.receiver


async def test_webhooks_are_signed_stripe_events(client: stripe.StripeClient, receiver: Receiver) -> None:
    customer, method = await customer_with_card(client)
    paid_id = await open_invoice(client, customer, method)
    await client.v1.invoices.pay_async(paid_id, {"payment_method": method}, key("pay"))
    expected = {"invoice.created", "invoice.finalized", "invoice.payment_succeeded", "invoice.paid"}
    by_type = await receiver.wait_for(paid_id, lambda types: expected <= types)
    await asyncio.sleep(1.5)  # a stray or duplicate event would have arrived by now
    assert set(await receiver.wait_for(paid_id, lambda types: True)) == expected
    assert by_type["invoice.created"]["status"] == "draft"
    assert by_type["invoice.created"]["currency"] == "eur"
    assert by_type["invoice.created"]["metadata"]["invoice_service_user_id"] == "u-42"
    assert (by_type["invoice.finalized"]["status"], by_type["invoice.finalized"]["total"]) == ("open", 4000)
    assert by_type["invoice.finalized"]["invoice_pdf"]
    assert by_type["invoice.payment_succeeded"]["status"] == by_type["invoice.paid"]["status"] == "paid"

    bad_customer, bad_method = await customer_with_card(client, DECLINED_ON_CHARGE)
    failed_id = await open_invoice(client, bad_customer, bad_method)
    with pytest.raises(stripe.CardError):
        await client.v1.invoices.pay_async(failed_id, {"payment_method": bad_method}, key("pay"))
    await client.v1.invoices.mark_uncollectible_async(failed_id, options=key("uncollectible"))
    await client.v1.invoices.void_invoice_async(failed_id, options=key("void"))
    wanted = {"invoice.payment_failed", "invoice.marked_uncollectible", "invoice.voided"}
    by_type = await receiver.wait_for(failed_id, lambda types: wanted <= types)
    assert "invoice.paid" not in by_type and "invoice.payment_succeeded" not in by_type
    assert by_type["invoice.payment_failed"]["status"] == "open"
    assert by_type["invoice.marked_uncollectible"]["status"] == "uncollectible"
    assert by_type["invoice.voided"]["status"] == "void"


async def test_deliveries_are_counted_until_every_receiver_answered(
    client: stripe.StripeClient, config: httpx.AsyncClient, receiver: Receiver
) -> None:
    customer, method = await customer_with_card(client)
    await until_no_delivery(config)
    receiver.hold = asyncio.Event()  # the receiver answers nothing until released
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    assert (await config.get("/deliveries")).json()["in_flight"] >= 1, "counted before the call answers"
    await asyncio.sleep(1.5)  # past localstripe's one-second delay: now at the held receiver
    assert (await config.get("/deliveries")).json()["in_flight"] >= 1
    receiver.hold.set()
    await until_no_delivery(config)
    assert "invoice.created" in {e["type"] for e in receiver.events(draft.id)}


async def until_no_delivery(config: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 15
    while (await config.get("/deliveries")).json()["in_flight"]:
        assert time.monotonic() < deadline, "deliveries never done"
        await asyncio.sleep(0.1)


async def test_add_lines_and_a_settled_finalization_send_stripes_webhooks(
    client: stripe.StripeClient, receiver: Receiver
) -> None:
    customer, method = await customer_with_card(client)
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    await client.v1.invoices.add_lines_async(
        draft.id, {"lines": [{"amount": 20, "description": "Tiny"}]}, key("add_lines")
    )
    updated = await receiver.wait_for(draft.id, lambda types: "invoice.updated" in types)
    assert [line["description"] for line in updated["invoice.updated"]["lines"]["data"]] == ["Tiny"]

    await client.v1.invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, key("finalize"))
    expected = {"invoice.created", "invoice.updated", "invoice.finalized", "invoice.payment_succeeded", "invoice.paid"}
    by_type = await receiver.wait_for(draft.id, lambda types: expected <= types)
    assert (by_type["invoice.paid"]["status"], by_type["invoice.paid"]["amount_paid"]) == ("paid", 0)
    assert by_type["invoice.paid"]["ending_balance"] == 20
