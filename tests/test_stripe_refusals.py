"""Stripe's refusals as Stripe gives them, against the emulator: a refusal is saved under
its idempotency key and replayed for a day, so a retry after its cause was fixed must get
a fresh try (service/attempts.py); and an invoice paid or voided at Stripe between the
service's read and its call is FAILED_PRECONDITION naming its status, and recorded
(the emulator's /_config/races hook makes that happen). Each test counts the charges
Stripe holds for its own customer afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe

from chaos.creates import charged_twice
from service.domain import FailedPrecondition, InvalidArgument
from service.storage import Storage
from tests.create_helpers import Payments, creator, emulator, request, stripe_invoices
from tools.customers import DECLINED_ON_CHARGE, customer_with_card

GOOD_CARD: Any = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}


async def new_card(client: stripe.StripeClient, customer: str | None = None) -> str:
    """A good card's payment method, attached to `customer` if one is named."""
    method = await client.v1.payment_methods.create_async({"type": "card", "card": GOOD_CARD})
    assert method.id is not None
    if customer is not None:
        await client.v1.payment_methods.attach_async(method.id, {"customer": customer})
    return method.id


async def succeeded_charges(client: stripe.StripeClient, customer: str) -> list[Any]:
    """The customer's charges that took money (the emulator lists every customer's)."""
    charges: list[Any] = []
    params: Any = {"limit": 100}
    while True:
        page = await client.v1.charges.list_async(params)
        charges += [c for c in page.data if c.customer == customer and c.status == "succeeded"]
        if not page.has_more or not page.data:
            return charges
        params = {"limit": 100, "starting_after": page.data[-1].id}


async def billed_once(client: stripe.StripeClient, customer: str, invoice_id: str, amount: int) -> None:
    """Stripe holds exactly one invoice for the customer, paid once, with one charge."""
    invoices = await stripe_invoices(client, customer)
    assert charged_twice({customer: [i.to_dict() for i in invoices]}) == []
    assert [(i.id, i.status, i.amount_paid) for i in invoices] == [(invoice_id, "paid", amount)]
    assert [c.amount for c in await succeeded_charges(client, customer)] == [amount]


async def open_invoice(store: Storage, client: stripe.StripeClient) -> tuple[str, dict[str, Any]]:
    """A customer whose card declines every charge, and the open invoice a Create left."""
    customer, declining = await customer_with_card(client, number=DECLINED_ON_CHARGE)
    invoice = await creator(store, Payments(client)).create(request(customer, declining), uuid.uuid4().hex)
    assert invoice["status"] == "open"
    return customer, invoice


# --- refusals replayed, and a fresh try once their cause is fixed ------------------------


async def test_a_declined_pay_retried_with_its_key_after_the_card_is_replaced_charges_once(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, invoice = await open_invoice(store, stripe_client)
    key = uuid.uuid4().hex
    with pytest.raises(FailedPrecondition, match="declined"):
        await creator(store, Payments(stripe_client)).pay(invoice["id"], None, key)
    # The admin replaces the invoice's card at Stripe (its dashboard), then retries.
    good = await new_card(stripe_client, customer)
    await stripe_client.v1.invoices.update_async(invoice["id"], {"default_payment_method": good})
    retry = Payments(stripe_client)
    record = await creator(store, retry).pay(invoice["id"], None, key)
    assert (record.stripe_invoice_id, record.status, record.amount) == (invoice["id"], "paid", 4000)
    assert retry.calls.count("invoices.pay") == 2  # the decline Stripe replayed, then a fresh try
    again = Payments(stripe_client)
    assert (await creator(store, again).pay(invoice["id"], None, key)).status == "paid"
    assert again.calls == []  # a finished key answers its record
    other = Payments(stripe_client)  # another key: the invoice is paid, nothing to charge
    assert (await creator(store, other).pay(invoice["id"], None, uuid.uuid4().hex)).status == "paid"
    assert "invoices.pay" not in other.calls
    await billed_once(stripe_client, customer, invoice["id"], 4000)


async def test_a_create_refused_for_a_card_not_attached_retried_after_attaching_it_makes_one_invoice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, _ = await customer_with_card(stripe_client)
    loose = await new_card(stripe_client)  # not attached to the customer
    key = uuid.uuid4().hex
    with pytest.raises(InvalidArgument) as refused:
        await creator(store, Payments(stripe_client)).create(request(customer, loose), key)
    assert refused.value.field == "default_payment_method"
    assert await stripe_invoices(stripe_client, customer) == []
    await stripe_client.v1.payment_methods.attach_async(loose, {"customer": customer})
    retry = Payments(stripe_client)
    answer = await creator(store, retry).create(request(customer, loose), key)
    assert (answer["status"], answer["total"], answer["amount_paid"]) == ("paid", 4000, 4000)
    assert retry.calls.count("invoices.create") == 2  # the refusal Stripe replayed, then a fresh one
    again = Payments(stripe_client)
    assert await creator(store, again).create(request(customer, loose), key) == answer
    assert again.calls == []
    await billed_once(stripe_client, customer, answer["id"], 4000)


async def test_a_refusal_never_fixed_is_answered_again_and_bills_nothing(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """A fresh try per retry, each refused as the first: no invoice, no charge."""
    customer, _ = await customer_with_card(stripe_client)
    loose, key = await new_card(stripe_client), uuid.uuid4().hex
    for _ in range(3):
        with pytest.raises(InvalidArgument):
            await creator(store, Payments(stripe_client)).create(request(customer, loose), key)
    assert await stripe_invoices(stripe_client, customer) == []
    assert await succeeded_charges(stripe_client, customer) == []


# --- the invoice changes at Stripe between the service's read and its call ---------------


@pytest.fixture
async def races(localstripe: str) -> AsyncIterator[str]:
    yield localstripe
    await emulator(localstripe, "DELETE", "/_config/races")


async def race(localstripe: str, call: str, invoice_id: str, then: str, params: dict[str, str]) -> None:
    """Before the service's next `call` on the invoice, Stripe's dashboard does `then`."""
    spec = {
        "path": f"^/v1/invoices/{invoice_id}/{call}$",
        "method": "POST",
        "then": {"method": "POST", "path": f"/v1/invoices/{invoice_id}/{then}", "params": params},
    }
    await emulator(localstripe, "POST", "/_config/races", spec)


async def raced(localstripe: str) -> list[Any]:
    """What each race's own request answered (they ran, and did what they say)."""
    answer = await emulator(localstripe, "GET", "/_config/races")
    assert answer["races"] == [], answer
    return [(ran["status"], ran["answer"].get("status")) for ran in answer["ran"]]


@pytest.mark.parametrize(
    ("call", "then", "status", "charged"),
    [("void", "pay", "paid", [4000]), ("pay", "void", "void", []), ("mark_uncollectible", "pay", "paid", [4000])],
    ids=["void-after-paid", "pay-after-voided", "mark-after-paid"],
)
async def test_a_call_on_an_invoice_changed_at_stripe_meanwhile_names_its_status_and_records_it(
    store: Storage,
    stripe_client: stripe.StripeClient,
    races: str,
    call: str,
    then: str,
    status: str,
    charged: list[int],
) -> None:
    """Stripe refuses the call (400); the service reads the invoice again, records what
    Stripe shows, and answers FAILED_PRECONDITION naming it (not "Stripe refused")."""
    customer, invoice = await open_invoice(store, stripe_client)
    good = await new_card(stripe_client, customer)
    await race(races, call, invoice["id"], then, {"payment_method": good} if then == "pay" else {})
    one = creator(store, Payments(stripe_client))
    with pytest.raises(FailedPrecondition, match=f"invoice {invoice['id']} is {status}; only open"):
        if call == "void":
            await one.void(invoice["id"], uuid.uuid4().hex)
        elif call == "mark_uncollectible":
            await one.mark_uncollectible(invoice["id"], uuid.uuid4().hex)
        else:
            await one.pay(invoice["id"], good, uuid.uuid4().hex)
    assert await raced(races) == [(200, status)]
    assert (await store.get_invoice(invoice["id"])).status == status
    invoices = await stripe_invoices(stripe_client, customer)
    assert [(i.status, i.amount_paid) for i in invoices] == [(status, sum(charged))]
    assert [c.amount for c in await succeeded_charges(stripe_client, customer)] == charged


async def test_a_pay_of_an_invoice_paid_at_stripe_meanwhile_answers_it_paid_once(
    store: Storage, stripe_client: stripe.StripeClient, races: str
) -> None:
    customer, invoice = await open_invoice(store, stripe_client)
    good = await new_card(stripe_client, customer)
    await race(races, "pay", invoice["id"], "pay", {"payment_method": good})
    record = await creator(store, Payments(stripe_client)).pay(invoice["id"], good, uuid.uuid4().hex)
    assert await raced(races) == [(200, "paid")]
    assert (record.status, (await store.get_invoice(invoice["id"])).status) == ("paid", "paid")
    await billed_once(stripe_client, customer, invoice["id"], 4000)


async def test_a_mark_of_an_invoice_marked_at_stripe_meanwhile_answers_it_uncollectible(
    store: Storage, stripe_client: stripe.StripeClient, races: str
) -> None:
    """Stripe refuses the second mark (the invoice is no longer open); the read after it
    shows the goal reached, so the call answers the record instead of an error."""
    _, invoice = await open_invoice(store, stripe_client)
    await race(races, "mark_uncollectible", invoice["id"], "mark_uncollectible", {})
    record = await creator(store, Payments(stripe_client)).mark_uncollectible(invoice["id"], uuid.uuid4().hex)
    assert await raced(races) == [(200, "uncollectible")]
    assert (record.status, (await store.get_invoice(invoice["id"])).status) == ("uncollectible", "uncollectible")


async def test_a_refusal_that_is_not_about_the_status_stays_the_callers_mistake(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """Paying an open invoice with a card the customer does not have: Stripe's 400 is read
    against the invoice, which is still open, so the refusal is the caller's to fix."""
    customer, invoice = await open_invoice(store, stripe_client)
    with pytest.raises(InvalidArgument) as refused:
        await creator(store, Payments(stripe_client)).pay(invoice["id"], await new_card(stripe_client), None)
    assert refused.value.field == "payment_method"
    assert (await stripe_client.v1.invoices.retrieve_async(invoice["id"])).status == "open"
    assert await succeeded_charges(stripe_client, customer) == []
