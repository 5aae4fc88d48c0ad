"""Paying in the Stripe emulator (the tools/localstripe package), with the stripe SDK:
only the customer's own cards pay, declines are Stripe's card errors (at attach and at
charge), make run's demo customer has a card that pays and one that is declined (and the
README's quick start reads its file), an invoice paid or void refuses payment, and
finalization applies customer credit in the invoice's currency and carries an amount due
under the currency's minimum charge to the next invoice. Refunds and credit notes:
test_localstripe_credit_notes.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
import stripe

from service.config import default
from tests import emulator_helpers as shared
from tests.emulator_helpers import (
    API_KEY,
    draft_params,
    draft_with_items,
    key,
    open_invoice,
)
from tests.helpers import intents_of
from tools.customers import DECLINED_ON_CHARGE, DEMO_FILE, Demo, customer_with_card, prepare_demo
from tools.localstripe.invoice_lifecycle import MINIMUM_CHARGE

# The shared fixtures (tests/emulator_helpers.py): this module gets an emulator of its own
# (module scope), so that no other module's webhooks reach its receivers.
emulator, client = shared.emulator, shared.client


DECLINED = "4000000000000002"  # Stripe's generic decline: refused already when attached


async def test_payment_methods_must_belong_to_the_customer(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    _, strangers = await customer_with_card(client)
    with pytest.raises(stripe.InvalidRequestError) as at_create:
        await client.v1.invoices.create_async(draft_params(customer, strangers), key("invoice"))
    assert at_create.value.param == "default_payment_method"
    invoice_id = await open_invoice(client, customer, method)
    with pytest.raises(stripe.InvalidRequestError) as at_pay:
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": strangers}, key("pay"))
    assert at_pay.value.param == "payment_method"
    paid = await client.v1.invoices.pay_async(invoice_id, options=key("pay"))  # the invoice's default_payment_method
    assert (paid.status, paid.amount_paid) == ("paid", 4000)


async def test_a_declined_charge_is_a_card_error_and_the_invoice_stays_open(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client, DECLINED_ON_CHARGE)
    invoice_id = await open_invoice(client, customer, method)
    pay = key("pay")
    with pytest.raises(stripe.CardError) as declined:
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, pay)
    assert (declined.value.http_status, declined.value.code) == (402, "card_declined")
    body = declined.value.json_body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "card_error"
    assert body["error"]["decline_code"] == "generic_decline"
    assert body["error"]["message"] == "Your card was declined."
    assert body["error"]["charge"].startswith("ch_")

    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.status, invoice.amount_paid, invoice.amount_due, invoice.attempt_count) == ("open", 0, 4000, 1)

    with pytest.raises(stripe.CardError) as replayed:  # the same key: the same answer, no second charge
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, pay)
    assert replayed.value.json_body == body
    assert (await client.v1.invoices.retrieve_async(invoice_id)).attempt_count == 1


async def test_the_demo_customer_of_make_run_pays_with_one_card_and_is_declined_with_the_other(
    emulator: str, client: stripe.StripeClient, tmp_path: Path
) -> None:
    """What the README's quick start relies on: make run's demo file names a customer whose
    `card` pays and whose `declining_card` leaves the invoice open."""
    demo = await asyncio.to_thread(prepare_demo, emulator, API_KEY, tmp_path)
    assert json.loads((tmp_path / DEMO_FILE).read_text()) == dataclasses.asdict(demo)
    invoice_id = await open_invoice(client, demo.customer, demo.declining_card)
    with pytest.raises(stripe.CardError):
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": demo.declining_card}, key("pay"))
    assert (await client.v1.invoices.retrieve_async(invoice_id)).status == "open"
    paid = await client.v1.invoices.pay_async(invoice_id, {"payment_method": demo.card}, key("pay"))
    assert (paid.status, paid.amount_paid) == ("paid", 4000)


def test_the_readmes_quick_start_reads_every_id_make_run_writes() -> None:
    """The quick start is typed as printed: it must name the file make run writes, and each
    field of it (a renamed field would leave a shell variable empty and the Create a 400)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    demo_file = re.escape(f"{default('data_dir')}/{DEMO_FILE}")
    read = re.findall(r"jq -r \.(\w+) " + demo_file, readme)
    assert sorted(read) == sorted(f.name for f in dataclasses.fields(Demo))


async def test_the_generic_decline_card_is_refused_like_on_stripe(client: stripe.StripeClient) -> None:
    """Stripe refuses to attach 4000000000000002 to a customer (a card check), and an
    invoice can only be paid with the customer's own cards: the decline comes at attach."""
    customer = await client.v1.customers.create_async({"name": "Declined"})
    card: Any = {"number": DECLINED, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    method = await client.v1.payment_methods.create_async({"type": "card", "card": card})
    assert customer.id is not None and method.id is not None
    with pytest.raises(stripe.CardError) as declined:
        await client.v1.payment_methods.attach_async(method.id, {"customer": customer.id})
    assert (declined.value.http_status, declined.value.code) == (402, "card_declined")
    body = declined.value.json_body
    assert isinstance(body, dict) and body["error"]["decline_code"] == "generic_decline"
    assert body["error"]["type"] == "card_error"


async def balance_of(client: stripe.StripeClient, customer: str) -> int | None:
    return (await client.v1.customers.retrieve_async(customer)).balance


async def test_customer_credit_is_applied_when_finalizing(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    assert (await client.v1.customers.update_async(customer, {"balance": -1000})).balance == -1000
    invoice_id = await draft_with_items(client, customer, method)  # 4000
    draft = await client.v1.invoices.retrieve_async(invoice_id)
    assert (draft.total, draft.starting_balance, draft.amount_due, draft.ending_balance) == (4000, -1000, 3000, None)

    finalized = await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, key("finalize"))
    assert (finalized.status, finalized.total, finalized.starting_balance) == ("open", 4000, -1000)
    assert (finalized.amount_due, finalized.ending_balance, await balance_of(client, customer)) == (3000, 0, 0)
    paid = await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, key("pay"))
    assert (paid.status, paid.amount_paid, paid.amount_remaining) == ("paid", 3000, 0)

    # More credit than the invoice: paid when finalized, nothing charged, the rest kept.
    await client.v1.customers.update_async(customer, {"balance": -5000})
    covered_id = await draft_with_items(client, customer, method)
    covered = await client.v1.invoices.finalize_invoice_async(covered_id, {"auto_advance": False}, key("finalize"))
    assert (covered.status, covered.total, covered.amount_due, covered.amount_paid, covered.amount_remaining) == (
        "paid",
        4000,
        0,
        0,
        0,
    )
    assert (covered.starting_balance, covered.ending_balance) == (-5000, -1000)
    assert await intents_of(client, covered.id) == []
    assert await balance_of(client, customer) == -1000

    created = await client.v1.customers.create_async({"name": "In credit", "balance": -700})
    assert created.balance == -700
    with pytest.raises(stripe.InvalidRequestError) as bad:
        await client.v1.customers.update_async(customer, cast(Any, {"balance": "lots"}))
    assert (bad.value.http_status, bad.value.param) == (400, "balance")


async def test_an_amount_due_below_the_minimum_charge_is_carried_to_the_next_invoice(
    client: stripe.StripeClient,
) -> None:
    customer, method = await customer_with_card(client)
    small_id = await draft_with_items(client, customer, method, [("Tiny", MINIMUM_CHARGE["eur"] - 20)])
    small = await client.v1.invoices.finalize_invoice_async(small_id, {"auto_advance": False}, key("finalize"))
    assert (small.status, small.total, small.amount_due, small.amount_paid, small.amount_remaining) == (
        "paid",
        30,
        0,
        0,
        0,
    )
    assert (small.starting_balance, small.ending_balance, await intents_of(client, small_id)) == (0, 30, [])
    assert await balance_of(client, customer) == 30

    next_id = await draft_with_items(client, customer, method, [("Next", 100)])
    assert (await client.v1.invoices.retrieve_async(next_id)).amount_due == 130
    paid = await client.v1.invoices.pay_async(next_id, {"payment_method": method}, key("pay"))  # finalizes
    assert (paid.status, paid.total, paid.starting_balance, paid.amount_due, paid.amount_paid) == (
        "paid",
        100,
        30,
        130,
        130,
    )
    assert (paid.ending_balance, await balance_of(client, customer)) == (0, 0)

    # /pay of a draft finalizes it the same way: no charge for 0.49 EUR.
    tiny_id = await draft_with_items(client, customer, method, [("Tiny", 49)])
    tiny = await client.v1.invoices.pay_async(tiny_id, {"payment_method": method}, key("pay"))
    assert (tiny.status, tiny.amount_due, tiny.amount_paid, await intents_of(client, tiny_id)) == ("paid", 0, 0, [])
    assert await balance_of(client, customer) == 49


async def test_a_balance_applies_only_to_invoices_in_its_currency(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    await client.v1.customers.update_async(customer, {"balance": -1000})
    first = await draft_with_items(client, customer, method)  # eur, 4000: fixes the customer's currency
    await client.v1.invoices.finalize_invoice_async(first, {"auto_advance": False}, key("finalize"))
    assert (await client.v1.customers.retrieve_async(customer)).currency == "eur"
    await client.v1.customers.update_async(customer, {"balance": -1000})  # eur credit again

    dollars = await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), key("invoice"))
    assert dollars.id is not None
    await client.v1.invoices.add_lines_async(dollars.id, {"lines": [{"amount": 4000}]}, key("add_lines"))
    assert (await client.v1.invoices.retrieve_async(dollars.id)).amount_due == 4000
    paid = await client.v1.invoices.pay_async(dollars.id, {"payment_method": method}, key("pay"))
    assert (paid.status, paid.starting_balance, paid.amount_due, paid.amount_paid) == ("paid", 0, 4000, 4000)
    assert (paid.ending_balance, await balance_of(client, customer)) == (0, -1000)

    # An amount under the minimum charge is carried in its own currency, for its invoices.
    tiny = await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), key("invoice"))
    assert tiny.id is not None
    await client.v1.invoices.add_lines_async(tiny.id, {"lines": [{"amount": 30}]}, key("add_lines"))
    carried = await client.v1.invoices.finalize_invoice_async(tiny.id, {"auto_advance": False}, key("finalize"))
    assert (carried.status, carried.ending_balance, await balance_of(client, customer)) == ("paid", 30, -1000)
    euros = await draft_with_items(client, customer, method)
    assert (await client.v1.invoices.retrieve_async(euros)).amount_due == 3000  # eur credit only
    more = await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), key("invoice"))
    assert more.id is not None
    await client.v1.invoices.add_lines_async(more.id, {"lines": [{"amount": 100}]}, key("add_lines"))
    assert (await client.v1.invoices.retrieve_async(more.id)).amount_due == 130  # usd 0.30 carried


@pytest.mark.parametrize(
    ("currency", "amount", "status"),
    [("gbp", 40, "open"), ("gbp", 29, "paid"), ("jpy", 49, "paid"), ("jpy", 50, "open"), ("xts", 49, "paid")],
)
async def test_the_minimum_charge_is_the_currencys(
    client: stripe.StripeClient, currency: str, amount: int, status: str
) -> None:
    customer, method = await customer_with_card(client)
    draft = await client.v1.invoices.create_async(draft_params(customer, method, currency=currency), key("invoice"))
    assert draft.id is not None
    await client.v1.invoices.add_lines_async(draft.id, {"lines": [{"amount": amount}]}, key("add_lines"))
    finalized = await client.v1.invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, key("finalize"))
    assert (finalized.currency, finalized.status) == (currency, status)
    assert finalized.amount_due == (amount if status == "open" else 0)


async def test_paying_a_paid_or_void_invoice_is_stripes_400(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    paid_id = await open_invoice(client, customer, method)
    await client.v1.invoices.pay_async(paid_id, {"payment_method": method}, key("pay"))
    void_id = await open_invoice(client, customer, method)
    await client.v1.invoices.void_invoice_async(void_id, options=key("void"))
    for invoice_id, message in ((paid_id, "Invoice is already paid"), (void_id, "Voided invoices cannot be paid.")):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, key("pay"))
        body = refused.value.json_body
        assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
        # Stripe's error codes have none for these: its answers carry only the message.
        assert (refused.value.http_status, refused.value.code, refused.value.user_message) == (400, None, message)
    assert (await client.v1.invoices.retrieve_async(paid_id)).attempt_count == 1
