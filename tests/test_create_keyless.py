"""A Create without an Idempotency-Key: identical requests within the duplicate window
are one Create (one invoice, one charge), kept as long as its attempts go on, so a retry
after a charge whose answer was lost resumes it; an identical request once the window
has passed, or with no window, is another order. Keyed Creates: test_create_billing.py."""

from __future__ import annotations

import asyncio

import pytest
import stripe

from service.domain import (
    NewInvoice,
)
from service.storage import Storage
from tests.create_helpers import Interrupted, Payments, creator, request, stripe_invoices
from tools.customers import customer_with_card


async def test_ten_identical_keyless_creates_at_once_make_one_invoice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client))
    answers = await asyncio.gather(*(one.create(request(customer, method), None) for _ in range(10)))
    invoices = await stripe_invoices(stripe_client, customer)
    assert len(invoices) == 1
    assert {answer["id"] for answer in answers} == {invoices[0].id}
    other = await one.create(request(customer, method, [3300, 701]), None)
    assert other["id"] != invoices[0].id


async def keyless_create_charged_then_cut_off(store: Storage, client: stripe.StripeClient, new: NewInvoice) -> None:
    """A keyless Create that Stripe charged and whose answer never came."""
    with pytest.raises(Interrupted):
        await creator(store, Payments(client, cut_after="pay")).create(new, None)


async def keyless_times(store: Storage, new: NewInvoice, *, first_s: int, last_s: int) -> None:
    """Both times the keyless window reads, moved back: the first request came `first_s`
    seconds ago (its claim of the fingerprint, and its Create's row), and the Create's
    last attempt `last_s` seconds ago."""
    async with store._connection() as conn:
        key = await conn.fetchval(
            "UPDATE keyless_creates SET claimed_at = claimed_at - make_interval(secs => $2)"
            " WHERE fingerprint = $1 RETURNING idempotency_key",
            new.fingerprint(),
            first_s,
        )
        status = await conn.execute(
            "UPDATE create_requests SET created_at = created_at - make_interval(secs => $2),"
            " updated_at = updated_at - make_interval(secs => $3) WHERE idempotency_key = $1 AND response IS NULL",
            key,
            first_s,
            last_s,
        )
    assert status == "UPDATE 1", "no unanswered keyless Create"


async def test_a_keyless_create_retried_past_the_window_after_its_charge_resumes_it(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """Stripe charged, the answer never came; the caller's retries went on past the window
    from the first request (an outage): each retry within the window of the last attempt
    stays the same Create, which finds the paid invoice instead of charging again."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await keyless_create_charged_then_cut_off(store, stripe_client, new)
    await keyless_times(store, new, first_s=240, last_s=60)  # two windows ago; half a window ago
    answer = await creator(store, Payments(stripe_client)).create(new, None)
    invoices = await stripe_invoices(stripe_client, customer)
    assert [i.id for i in invoices] == [answer["id"]] and answer["status"] == "paid"


async def test_a_keyless_create_sent_again_after_its_last_attempt_left_the_window_is_a_new_one(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """The window holds a keyless Create while it is tried; once neither its first request
    nor its last attempt is within it, an identical request is another order."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await keyless_create_charged_then_cut_off(store, stripe_client, new)
    await keyless_times(store, new, first_s=240, last_s=180)
    answer = await creator(store, Payments(stripe_client)).create(new, None)
    invoices = await stripe_invoices(stripe_client, customer)
    assert answer["id"] in [i.id for i in invoices] and len(invoices) == 2


async def test_without_a_duplicate_window_identical_keyless_creates_bill_each(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    one = creator(store, Payments(stripe_client), duplicate_window_s=0)
    for _ in range(2):
        await one.create(request(customer, method), None)
    assert len(await stripe_invoices(stripe_client, customer)) == 2
