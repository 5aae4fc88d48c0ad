"""A Create bills once, whatever fails in between: the service's own InvoiceCreator and
StripePayments against the Stripe emulator, which behaves as Stripe does where it matters
here (it replays a saved 500 for a key, forgets its keys after 24 hours on request, and
settles at finalization an invoice under the currency's minimum charge). Every test
counts what Stripe holds for its own customer afterwards. Here: the four Stripe calls, a
step cut off or failed and retried under its key, duplicates at once, declines. A key's
claim and its audit: test_create_claims.py; without a key: test_create_keyless.py; rows
of earlier releases: test_create_upgrade.py; overlapping attempts: test_create_races.py."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import stripe

from service import validation
from service.domain import (
    CreateInProgress,
    FailedPrecondition,
    Unavailable,
)
from service.storage import Storage
from tests.create_helpers import Interrupted, Payments, creator, emulator, request, stripe_invoices
from tools.customers import DECLINED_ON_CHARGE, customer_with_card


@pytest.mark.parametrize("count", [1, 10, 100])
async def test_four_stripe_calls_whatever_the_item_count(
    store: Storage, stripe_client: stripe.StripeClient, count: int
) -> None:
    customer, method = await customer_with_card(stripe_client)
    stripe_payments = Payments(stripe_client)
    answer = await creator(store, stripe_payments).create(
        request(customer, method, [100 + i for i in range(count)]), uuid.uuid4().hex
    )
    assert stripe_payments.calls == ["invoices.create", "invoices.add_lines", "invoices.finalize", "invoices.pay"]
    assert (answer["status"], answer["total"]) == ("paid", sum(100 + i for i in range(count)))
    listed = await stripe_client.v1.invoices.line_items.list_async(answer["id"], {"limit": 100})
    assert [(line.description, line.amount) for line in listed.data] == [(f"item {i}", 100 + i) for i in range(count)]


async def test_lines_beyond_one_call_go_in_batches_in_order(store: Storage, stripe_client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(stripe_client)
    stripe_payments = Payments(stripe_client, lines_per_call=3)
    answer = await creator(store, stripe_payments).create(request(customer, method, list(range(1, 11))), "batches")
    assert stripe_payments.calls.count("invoices.add_lines") == 4
    listed = await stripe_client.v1.invoices.line_items.list_async(answer["id"], {"limit": 100})
    assert [line.amount for line in listed.data] == list(range(1, 11))
    assert answer["total"] == 55


async def test_an_invoice_under_the_minimum_charge_is_answered_paid(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """The seed's own example bills one cent: Stripe settles it at finalization (and
    refuses `pay` afterwards); the Create answers the paid invoice, it does not fail."""
    customer, method = await customer_with_card(stripe_client)
    stripe_payments = Payments(stripe_client)
    answer = await creator(store, stripe_payments).create(request(customer, method, [1]), uuid.uuid4().hex)
    assert answer["status"] == "paid"
    assert "invoices.pay" not in stripe_payments.calls
    assert [i.status for i in await stripe_invoices(stripe_client, customer)] == ["paid"]


async def test_a_create_in_another_currency_than_the_customers_credit_is_charged_in_full(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """Stripe applies a customer's balance only to invoices in its currency: a customer
    with euro credit is charged the whole of a dollar invoice, and keeps the credit."""
    customer, method = await customer_with_card(stripe_client)
    await stripe_client.v1.customers.update_async(customer, {"balance": -1000})
    euros = await creator(store, Payments(stripe_client)).create(request(customer, method), uuid.uuid4().hex)
    assert (euros["currency"], euros["total"], euros["amount_paid"]) == ("eur", 4000, 3000)  # the credit applied
    await stripe_client.v1.customers.update_async(customer, {"balance": -1000})  # euro credit again
    items = [("item 0", 3300), ("item 1", 700)]
    dollars = validation.new_invoice(items, customer, method, currency="usd")
    answer = await creator(store, Payments(stripe_client)).create(dollars, uuid.uuid4().hex)
    assert (answer["status"], answer["currency"], answer["total"]) == ("paid", "usd", 4000)
    assert (answer["starting_balance"], answer["amount_due"], answer["amount_paid"]) == (0, 4000, 4000)
    assert (await stripe_client.v1.customers.retrieve_async(customer)).balance == -1000


@pytest.mark.parametrize("step", ["draft", "lines", "finalize", "pay"])
async def test_a_create_cut_off_after_each_step_and_retried_after_stripe_forgot_its_keys_bills_once(
    store: Storage, stripe_client: stripe.StripeClient, localstripe: str, step: str
) -> None:
    customer, method = await customer_with_card(stripe_client)
    key = uuid.uuid4().hex
    with pytest.raises(Interrupted):
        await creator(store, Payments(stripe_client, cut_after=step)).create(request(customer, method), key)
    await emulator(localstripe, "POST", "/_config/idempotency/forget")  # more than 24 h later

    answer = await creator(store, Payments(stripe_client)).create(request(customer, method), key)
    invoices = await stripe_invoices(stripe_client, customer)
    assert [i.id for i in invoices] == [answer["id"]]
    assert (invoices[0].status, invoices[0].amount_paid, invoices[0].total) == ("paid", 4000, 4000)
    listed = await stripe_client.v1.invoices.line_items.list_async(answer["id"])
    assert [line.amount for line in listed.data] == [3300, 700]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(
    ("step", "path"),
    [
        ("invoices.create", "^/v1/invoices$"),
        ("invoices.add_lines", "^/v1/invoices/[^/]+/add_lines$"),
        ("invoices.finalize", "^/v1/invoices/[^/]+/finalize$"),
        ("invoices.pay", "^/v1/invoices/[^/]+/pay$"),
    ],
)
async def test_a_stripe_500_on_a_step_then_the_callers_retry_bills_once(
    store: Storage, stripe_client: stripe.StripeClient, localstripe: str, step: str, path: str, when: str
) -> None:
    """Stripe saves a 500 under its idempotency key and replays it for a day: the retry
    must find out what exists and go on with keys of its own, not resend the old ones."""
    customer, method = await customer_with_card(stripe_client)
    key = uuid.uuid4().hex
    await emulator(localstripe, "POST", "/_config/faults", {"path": path, "method": "POST", "count": 1, "when": when})
    try:
        with pytest.raises(Unavailable):
            await creator(store, Payments(stripe_client)).create(request(customer, method), key)
    finally:
        await emulator(localstripe, "DELETE", "/_config/faults")
    retry = Payments(stripe_client)
    answer = await creator(store, retry).create(request(customer, method), key)
    invoices = await stripe_invoices(stripe_client, customer)
    assert [i.id for i in invoices] == [answer["id"]]
    assert (invoices[0].status, invoices[0].amount_paid) == ("paid", 4000)
    assert "invoices.create" not in retry.calls or (step, when) == ("invoices.create", "before")


async def test_a_finished_create_is_answered_again_without_calling_stripe(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    first = await creator(store, Payments(stripe_client)).create(request(customer, method), "replayed")
    again = Payments(stripe_client)
    assert await creator(store, again).create(request(customer, method), "replayed") == first
    assert again.calls == []


async def test_two_creates_with_one_key_in_flight_at_once_make_one_invoice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client), wait_s=0)
    answers = await asyncio.gather(
        *(one.create(request(customer, method), "in-flight") for _ in range(2)), return_exceptions=True
    )
    invoices = await stripe_invoices(stripe_client, customer)
    assert len(invoices) == 1
    for answer in answers:
        assert isinstance(answer, CreateInProgress) or (isinstance(answer, dict) and answer["id"] == invoices[0].id)
    assert any(isinstance(answer, dict) for answer in answers)


async def test_a_duplicate_waits_for_the_attempt_in_progress_and_answers_its_invoice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client))
    first, second = await asyncio.gather(*(one.create(request(customer, method), "waits") for _ in range(2)))
    assert first["id"] == second["id"]
    assert len(await stripe_invoices(stripe_client, customer)) == 1


async def test_a_declined_create_can_be_paid_with_another_card(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    one = creator(store, Payments(stripe_client))
    open_invoice = await one.create(request(customer, declining), uuid.uuid4().hex)
    assert open_invoice["status"] == "open"
    card: Any = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    good = await stripe_client.v1.payment_methods.create_async({"type": "card", "card": card})
    assert good.id is not None
    await stripe_client.v1.payment_methods.attach_async(good.id, {"customer": customer})
    record = await one.pay(open_invoice["id"], good.id, None)
    assert (record.stripe_invoice_id, record.status, record.amount) == (open_invoice["id"], "paid", 4000)
    assert (await store.get_invoice(open_invoice["id"])).status == "paid"
    assert [i.status for i in await stripe_invoices(stripe_client, customer)] == ["paid"]


async def test_an_admin_pay_with_a_declined_card_is_failed_precondition(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    one = creator(store, Payments(stripe_client))
    open_invoice = await one.create(request(customer, declining), uuid.uuid4().hex)
    with pytest.raises(FailedPrecondition, match="declined"):
        await one.pay(open_invoice["id"], None, None)
    assert (await stripe_client.v1.invoices.retrieve_async(open_invoice["id"])).status == "open"
