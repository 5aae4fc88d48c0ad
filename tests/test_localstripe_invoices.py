"""The Stripe emulator's invoice lifecycle (the tools/localstripe package), driven with
the stripe SDK the way the service drives real Stripe: a draft, its items attached by id
or added with add_lines, finalize, pay, mark uncollectible, void, list. Checks exact lines
and totals, what a step refuses out of order, and Stripe-shaped invalid-request errors.
Paying and credit: test_localstripe_payments.py; replays and faults:
test_localstripe_idempotency.py; events: test_localstripe_webhooks.py."""

from __future__ import annotations

import time
from typing import Any

import pytest
import stripe

from tests import emulator_helpers as shared
from tests.emulator_helpers import (
    ITEMS,
    draft_params,
    draft_with_items,
    key,
    lines,
    open_invoice,
)
from tools.customers import customer_with_card
from tools.localstripe.invoice_items import MAX_LINES_PER_INVOICE
from tools.localstripe.invoices import MAX_LINES_PER_ADD

# The shared fixtures (tests/emulator_helpers.py): this module gets an emulator of its own
# (module scope), so that no other module's webhooks reach its receivers.
emulator, client = shared.emulator, shared.client


async def test_draft_items_finalize_pay_make_exactly_the_requested_invoice(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    assert (draft.status, draft.currency, draft.total, draft.subtotal, draft.amount_due) == ("draft", "eur", 0, 0, 0)
    assert (draft.collection_method, draft.auto_advance, draft.default_payment_method) == (
        "charge_automatically",
        False,
        method,
    )
    assert draft.metadata is not None and draft.metadata.to_dict() == {
        "invoice_service_user_id": "u-42",
        "invoice_service_user_name": "Ada",
    }
    assert draft.lines.data == []
    assert draft.invoice_pdf is None and draft.hosted_invoice_url is None
    assert "invoice_pdf" in draft and "hosted_invoice_url" in draft

    for name, amount in ITEMS:
        item = await client.v1.invoice_items.create_async(
            {"customer": customer, "invoice": draft.id, "amount": amount, "currency": "eur", "description": name},
            key("item"),
        )
        assert item.invoice == draft.id
    with_items = await client.v1.invoices.retrieve_async(draft.id)
    assert lines(with_items) == ITEMS
    assert (with_items.status, with_items.subtotal, with_items.total, with_items.amount_due) == (
        "draft",
        4000,
        4000,
        4000,
    )

    finalized = await client.v1.invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, key("finalize"))
    assert finalized.status == "open"
    assert finalized.status_transitions.finalized_at is not None
    assert finalized.invoice_pdf and finalized.invoice_pdf.startswith("http://127.0.0.1:")
    assert finalized.invoice_pdf.endswith(f"/invoice/{draft.id}/pdf")
    assert finalized.hosted_invoice_url and finalized.hosted_invoice_url.endswith(f"/invoice/{draft.id}")

    paid = await client.v1.invoices.pay_async(draft.id, {"payment_method": method}, key("pay"))
    assert (paid.status, paid.total, paid.amount_due, paid.amount_paid) == ("paid", 4000, 4000, 4000)
    assert lines(paid) == ITEMS
    stored = await client.v1.invoices.retrieve_async(draft.id)
    assert (stored.status, stored.total, lines(stored)) == ("paid", 4000, ITEMS)
    assert stored.status_transitions.paid_at is not None


async def test_exclude_leaves_pending_items_alone_and_include_sweeps_them(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    pending = await client.v1.invoice_items.create_async(
        {"customer": customer, "amount": 500, "currency": "eur", "description": "pending"}
    )
    invoice_id = await draft_with_items(client, customer, method, [("attached", 900)])
    excluded = await client.v1.invoices.retrieve_async(invoice_id)
    assert lines(excluded) == [("attached", 900)]

    included = await client.v1.invoices.create_async(
        {"customer": customer, "pending_invoice_items_behavior": "include"}
    )
    assert lines(included) == [("pending", 500)]
    assert (await client.v1.invoice_items.retrieve_async(str(pending.id))).invoice == included.id
    assert lines(await client.v1.invoices.retrieve_async(invoice_id)) == [("attached", 900)]
    with pytest.raises(stripe.InvalidRequestError, match="Nothing to invoice"):
        await client.v1.invoices.create_async({"customer": customer, "pending_invoice_items_behavior": "include"})


async def test_items_and_finalize_need_a_draft(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    invoice_id = await open_invoice(client, customer, method)
    with pytest.raises(stripe.InvalidRequestError) as late_item:
        await client.v1.invoice_items.create_async(
            {"customer": customer, "invoice": invoice_id, "amount": 1, "currency": "eur"}, key("item")
        )
    assert (late_item.value.http_status, late_item.value.param) == (400, "invoice")
    error = late_item.value.json_body
    assert isinstance(error, dict) and error["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.InvalidRequestError, match="already finalized"):
        await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, key("finalize"))
    assert lines(await client.v1.invoices.retrieve_async(invoice_id)) == ITEMS


async def test_finalizing_a_zero_total_invoice_settles_it(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    empty = await draft_with_items(client, customer, method, [])
    finalized = await client.v1.invoices.finalize_invoice_async(empty, {"auto_advance": False}, key("finalize"))
    assert (finalized.status, finalized.total, finalized.amount_paid) == ("paid", 0, 0)
    with pytest.raises(stripe.InvalidRequestError, match="already paid"):
        await client.v1.invoices.pay_async(empty, {"payment_method": method}, key("pay"))


async def test_mark_uncollectible_then_void(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    invoice_id = await open_invoice(client, customer, method)
    marked = await client.v1.invoices.mark_uncollectible_async(invoice_id, options=key("uncollectible"))
    assert marked.status == "uncollectible"
    assert marked.status_transitions.marked_uncollectible_at is not None
    voided = await client.v1.invoices.void_invoice_async(invoice_id, options=key("void"))
    assert voided.status == "void"
    assert voided.status_transitions.voided_at is not None
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.invoices.mark_uncollectible_async(invoice_id, options=key("uncollectible"))

    draft_id = await draft_with_items(client, customer, method)
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.invoices.void_invoice_async(draft_id, options=key("void"))


async def test_listing_by_creation_date_pages_newest_first(client: stripe.StripeClient) -> None:
    since = int(time.time())
    customer, method = await customer_with_card(client)
    created = [await draft_with_items(client, customer, method, [("x", 100)]) for _ in range(3)]
    page = await client.v1.invoices.list_async({"customer": customer, "created": {"gte": since}, "limit": 2})
    assert page.has_more
    assert [i.id async for i in page.auto_paging_iter()] == created[::-1]
    # The service's reconcile call: every invoice since a date, any customer.
    everyone = await client.v1.invoices.list_async({"created": {"gte": since}, "limit": 100})
    assert set(created) <= {i.id async for i in everyone.auto_paging_iter()}
    later = await client.v1.invoices.list_async({"customer": customer, "created": {"gt": int(time.time()) + 60}})
    assert later.data == []


async def test_unknown_objects_and_parameters_are_invalid_request_errors(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await client.v1.invoices.retrieve_async("in_doesnotexist")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")
    customer, method = await customer_with_card(client)
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await client.v1.invoices.create_async(draft_params(customer, method, days_until_due=3), key("invoice"))
    assert (unknown.value.http_status, unknown.value.param) == (400, "days_until_due")


async def test_add_lines_makes_the_items_of_a_draft_in_order(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    params: Any = {
        "lines": [
            {"amount": 3300, "description": "All resources", "metadata": {"resource": "all"}},
            {"amount": 700, "description": "Support"},
            {"amount": -500, "description": "Goodwill"},
        ],
        "invoice_metadata": {"invoice_service_key": "k1", "invoice_service_user_name": ""},
    }
    options = key("add_lines")
    added = await client.v1.invoices.add_lines_async(draft.id, params, options)
    assert lines(added) == [("All resources", 3300), ("Support", 700), ("Goodwill", -500)]
    assert (added.status, added.currency, added.total, added.amount_due) == ("draft", "eur", 3500, 3500)
    assert [line.currency for line in added.lines.data] == ["eur"] * 3
    assert added.lines.data[0].metadata.to_dict() == {"resource": "all"}
    assert added.metadata is not None  # merged; an empty value unsets its key, as on Stripe
    assert added.metadata.to_dict() == {"invoice_service_user_id": "u-42", "invoice_service_key": "k1"}
    items = [
        await client.v1.invoice_items.retrieve_async(line["parent"]["invoice_item_details"]["invoice_item"])
        for line in added.lines.data
    ]
    assert [(item.invoice, item.amount, item.currency) for item in items] == [
        (draft.id, 3300, "eur"),
        (draft.id, 700, "eur"),
        (draft.id, -500, "eur"),
    ]
    replayed = await client.v1.invoices.add_lines_async(draft.id, params, options)
    assert lines(replayed) == lines(added)
    assert lines(await client.v1.invoices.retrieve_async(draft.id)) == lines(added)


async def test_add_lines_refuses_what_it_cannot_add_and_adds_nothing(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    draft_id = await draft_with_items(client, customer, method, [])

    async def refused(params: Any, invoice_id: str = draft_id) -> stripe.InvalidRequestError:
        with pytest.raises(stripe.InvalidRequestError) as error:
            await client.v1.invoices.add_lines_async(invoice_id, params, key("add_lines"))
        assert error.value.http_status == 400
        return error.value

    unknown = await refused({"lines": [{"amount": 100}, {"amount": 100, "quantity": 2}]})
    assert unknown.param == "lines[1][quantity]"
    assert "Received unknown parameters: lines[1][quantity]" in str(unknown.user_message)
    assert (await refused({"lines": [{"amount": 100}, {"invoice_item": "ii_123"}]})).param == "lines[1][invoice_item]"
    missing = await refused({"lines": [{"description": "no amount"}]})
    assert (missing.param, missing.code) == ("lines[0][amount]", "parameter_missing")
    assert (await refused({"lines": []})).param == "lines"
    assert (await refused({"lines": [{"amount": 1}] * (MAX_LINES_PER_ADD + 1)})).param == "lines"
    assert (await client.v1.invoices.retrieve_async(draft_id)).lines.data == []

    full = await client.v1.invoices.add_lines_async(
        draft_id, {"lines": [{"amount": 1}] * MAX_LINES_PER_INVOICE}, key("add_lines")
    )
    assert (full.to_dict()["lines"]["total_count"], full.total) == (MAX_LINES_PER_INVOICE, MAX_LINES_PER_INVOICE)
    assert (await refused({"lines": [{"amount": 1}]})).param == "lines"  # 251 on the invoice
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.invoice_items.create_async(
            {"customer": customer, "invoice": draft_id, "amount": 1, "currency": "eur"}, key("item")
        )

    open_id = await open_invoice(client, customer, method)
    assert (await refused({"lines": [{"amount": 100}]}, open_id)).code == "invoice_not_editable"
    assert lines(await client.v1.invoices.retrieve_async(open_id)) == ITEMS


async def test_a_customers_list_has_its_drafts_newest_first_with_metadata(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    keyed = draft_params(customer, method, metadata={"invoice_service_key": "k1"})
    first = await client.v1.invoices.create_async(keyed, key("invoice"))
    second = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    listed = await client.v1.invoices.list_async({"customer": customer})
    assert [(i.id, i.status) for i in listed.data] == [(second.id, "draft"), (first.id, "draft")]
    service_keys = [(i.metadata.to_dict() if i.metadata else {}).get("invoice_service_key") for i in listed.data]
    assert service_keys == [None, "k1"]
    page = await client.v1.invoices.list_async({"customer": customer, "limit": 1})
    assert page.has_more and [i.id for i in page.data] == [second.id]
    rest = await client.v1.invoices.list_async({"customer": customer, "limit": 1, "starting_after": str(second.id)})
    assert [i.id for i in rest.data] == [first.id] and not rest.has_more
