"""Credit notes and refunds in the Stripe emulator (tools/localstripe/credit_notes.py,
refunds.py), driven with the stripe SDK as the service will drive real Stripe to give
money back: a credit note on a paid invoice refunding its payment, partial notes adding
up to the invoice and no further, credit to the customer's balance, credit outside of
Stripe, voiding, the notes' effect on an open invoice, their signed events, replays under
an idempotency key, and Stripe's refusals. Objects are checked key for key against the
shapes Stripe publishes (its fixtures, API 2026-10-28)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import stripe

from tests import emulator_helpers as shared
from tests.emulator_helpers import Receiver, draft_with_items, key, open_invoice, replayed
from tests.helpers import intents_of
from tools.customers import customer_with_card

# The shared fixtures (tests/emulator_helpers.py): this module gets an emulator of its own
# (module scope), and the same per-test client and webhook receiver.
emulator, client, receiver = shared.emulator, shared.client, shared.receiver

# Every key of these objects in Stripe's published fixtures (API 2026-10-28).
CREDIT_NOTE_KEYS = {
    *("amount", "amount_shipping", "created", "currency", "customer", "customer_account"),
    *("customer_balance_transaction", "discount_amount", "discount_amounts", "effective_at", "id"),
    *("invoice", "lines", "livemode", "memo", "metadata", "number", "object", "out_of_band_amount", "pdf"),
    *("post_payment_amount", "pre_payment_amount", "pretax_credit_amounts", "reason", "refunds"),
    *("shipping_cost", "status", "subtotal", "subtotal_excluding_tax", "total", "total_excluding_tax"),
    *("total_taxes", "type", "voided_at"),
}
LINE_KEYS = {
    *("amount", "description", "discount_amount", "discount_amounts", "id", "invoice_line_item", "livemode"),
    *("metadata", "object", "pretax_credit_amounts", "quantity", "tax_rates", "taxes", "type", "unit_amount"),
    "unit_amount_decimal",
}
REFUND_KEYS = {
    *("amount", "balance_transaction", "charge", "created", "currency", "customer", "customer_account"),
    *("destination_details", "id", "metadata", "object", "payment_intent", "payment_method", "reason"),
    *("receipt_number", "source_transfer_reversal", "status", "transfer_reversal"),
}
TOTAL = 4000  # emulator_helpers' ITEMS: 3300 + 700, in eur


async def paid_invoice(client: stripe.StripeClient) -> tuple[str, str]:
    """(customer, invoice) of an invoice of TOTAL paid by card."""
    customer, method = await customer_with_card(client)
    invoice_id = await open_invoice(client, customer, method)
    paid = await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, key("pay"))
    assert (paid.status, paid.amount_paid) == ("paid", TOTAL)
    return customer, invoice_id


async def charge_of(client: stripe.StripeClient, invoice_id: str) -> Any:
    (paid_by,) = await intents_of(client, invoice_id)
    intent = await client.v1.payment_intents.retrieve_async(paid_by)
    return await client.v1.charges.retrieve_async(str(intent["latest_charge"]["id"]))


def changed(params: Any, **changes: Any) -> Any:
    return {**params, **changes}


async def note(client: stripe.StripeClient, params: Any, label: str = "note") -> stripe.CreditNote:
    return await client.v1.credit_notes.create_async(params, key(label))


async def refused(client: stripe.StripeClient, params: Any) -> stripe.InvalidRequestError:
    with pytest.raises(stripe.InvalidRequestError) as error:
        await note(client, params)
    assert error.value.http_status == 400
    return error.value


async def test_a_full_credit_note_refunds_a_paid_invoice(client: stripe.StripeClient) -> None:
    customer, invoice_id = await paid_invoice(client)
    params: Any = {"invoice": invoice_id, "amount": TOTAL, "refund_amount": TOTAL, "reason": "duplicate"}
    made = await note(client, changed(params, memo="Charged twice", metadata={"ticket": "T-1"}))
    assert set(made.to_dict()) == CREDIT_NOTE_KEYS
    assert made.id is not None and made.id.startswith("cn_")
    assert (made.status, made.type, made.invoice, made.customer, made.currency) == (
        "issued",
        "post_payment",
        invoice_id,
        customer,
        "eur",
    )
    assert (made.amount, made.total, made.pre_payment_amount, made.post_payment_amount) == (TOTAL, TOTAL, 0, TOTAL)
    assert (made.reason, made.memo, made.metadata and made.metadata.to_dict()) == (
        "duplicate",
        "Charged twice",
        {"ticket": "T-1"},
    )
    assert made.out_of_band_amount is None and made.customer_balance_transaction is None
    assert [(r.amount_refunded, r.type) for r in made.refunds] == [(TOTAL, "refund")]

    refund = await client.v1.refunds.retrieve_async(str(made.refunds[0].refund))
    assert set(refund.to_dict()) == REFUND_KEYS
    charge = await charge_of(client, invoice_id)
    assert (refund.amount, refund.status, refund.currency, refund.charge) == (TOTAL, "succeeded", "eur", charge.id)
    assert (refund.payment_intent, refund.customer) == (charge.payment_intent, customer)
    assert (charge.amount_refunded, charge.refunded) == (TOTAL, True)
    by_charge = await client.v1.refunds.list_async({"charge": str(charge.id)})
    by_intent = await client.v1.refunds.list_async({"payment_intent": str(charge.payment_intent)})
    assert [r.id for r in by_charge.data] == [r.id for r in by_intent.data] == [refund.id]

    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.status, invoice.amount_paid, invoice.amount_remaining) == ("paid", TOTAL, 0)
    assert (invoice.post_payment_credit_notes_amount, invoice.pre_payment_credit_notes_amount) == (TOTAL, 0)
    assert (await client.v1.credit_notes.retrieve_async(made.id)).to_dict() == made.to_dict()
    assert [n.id for n in (await client.v1.credit_notes.list_async({"invoice": invoice_id})).data] == [made.id]


async def test_partial_notes_add_up_to_the_invoice_and_no_further(client: stripe.StripeClient) -> None:
    _, invoice_id = await paid_invoice(client)
    line = (await client.v1.invoices.retrieve_async(invoice_id)).lines.data[0]
    assert (line.description, line.amount) == ("All resources", 3300)
    first = await note(
        client,
        {
            "invoice": invoice_id,
            "lines": [{"type": "invoice_line_item", "invoice_line_item": line.id, "amount": 3000}],
            "refund_amount": 3000,
        },
    )
    assert [(li.type, li.invoice_line_item, li.amount, li.description) for li in first.lines.data] == [
        ("invoice_line_item", line.id, 3000, "All resources")
    ]
    assert set(first.lines.data[0].to_dict()) == LINE_KEYS
    listed_lines = await client.v1.credit_notes.line_items.list_async(str(first.id))
    assert [li.id for li in listed_lines.data] == [first.lines.data[0].id]
    over_line = await refused(
        client,
        {
            "invoice": invoice_id,
            "lines": [{"type": "invoice_line_item", "invoice_line_item": line.id, "amount": 301}],
            "refund_amount": 301,
        },
    )
    assert over_line.param == "lines[0][amount]" and "(€3.00)" in str(over_line.user_message)
    second = await note(client, {"invoice": invoice_id, "amount": 1000, "refund_amount": 1000})
    assert second.number != first.number

    beyond = await refused(client, {"invoice": invoice_id, "amount": 100, "refund_amount": 100})
    assert beyond.param == "amount"
    assert "(€1.00) is greater than the amount that can still be credited" in str(beyond.user_message)
    assert "(€0.00)" in str(beyond.user_message)
    listed = await client.v1.credit_notes.list_async({"invoice": invoice_id})
    assert [n.id for n in listed.data] == [second.id, first.id]  # newest first
    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.status, invoice.post_payment_credit_notes_amount) == ("paid", TOTAL)
    charge = await charge_of(client, invoice_id)
    assert (charge.amount_refunded, charge.refunded) == (TOTAL, True)
    assert len((await client.v1.refunds.list_async({"charge": str(charge.id)})).data) == 2


async def test_a_refund_beyond_what_the_payment_still_holds_is_refused_in_stripes_words(
    client: stripe.StripeClient,
) -> None:
    _, invoice_id = await paid_invoice(client)
    charge = await charge_of(client, invoice_id)
    outside = await client.v1.refunds.create_async({"charge": str(charge.id), "amount": 3500}, key("refund"))
    assert (outside.amount, outside.status) == (3500, "succeeded")
    error = await refused(client, {"invoice": invoice_id, "amount": 1000, "refund_amount": 1000})
    assert error.param == "refund_amount"
    assert error.user_message == "Refund amount (€10.00) is greater than unrefunded amount on charge (€5.00)"
    with pytest.raises(stripe.InvalidRequestError, match="greater than unrefunded amount"):
        await client.v1.refunds.create_async({"charge": str(charge.id), "amount": 501}, key("refund"))
    # The refund made outside of a credit note can be linked to one.
    linked = await note(client, {"invoice": invoice_id, "amount": 3500, "refunds": [{"refund": str(outside.id)}]})
    assert [(r.refund, r.amount_refunded) for r in linked.refunds] == [(outside.id, 3500)]
    again = await refused(client, {"invoice": invoice_id, "amount": 1, "refunds": [{"refund": str(outside.id)}]})
    assert again.param == "refunds[0][refund]"
    assert (await charge_of(client, invoice_id)).amount_refunded == 3500


async def test_credit_to_the_balance_is_spent_on_the_next_invoice(client: stripe.StripeClient) -> None:
    customer, invoice_id = await paid_invoice(client)
    made = await note(client, {"invoice": invoice_id, "amount": 1500, "credit_amount": 1500, "reason": "order_change"})
    assert made.refunds == [] and made.out_of_band_amount is None
    assert (made.post_payment_amount, made.reason) == (1500, "order_change")
    expanded = await client.v1.credit_notes.retrieve_async(str(made.id), {"expand": ["customer_balance_transaction"]})
    transaction: Any = expanded.customer_balance_transaction
    assert (transaction["amount"], transaction["ending_balance"], transaction["type"]) == (-1500, -1500, "credit_note")
    assert (transaction["credit_note"], transaction["customer"], transaction["currency"]) == (made.id, customer, "eur")
    assert transaction["id"] == made.customer_balance_transaction
    assert (await client.v1.customers.retrieve_async(customer)).balance == -1500
    assert (await charge_of(client, invoice_id)).amount_refunded == 0

    method = (await client.v1.invoices.retrieve_async(invoice_id)).default_payment_method
    next_id = await draft_with_items(client, customer, str(method), [("Next month", 2000)])
    finalized = await client.v1.invoices.finalize_invoice_async(next_id, {"auto_advance": False}, key("finalize"))
    assert (finalized.starting_balance, finalized.amount_due, finalized.ending_balance) == (-1500, 500, 0)


async def test_credit_outside_of_stripe_moves_no_money(client: stripe.StripeClient) -> None:
    customer, invoice_id = await paid_invoice(client)
    made = await note(client, {"invoice": invoice_id, "amount": 700, "out_of_band_amount": 700})
    assert (made.out_of_band_amount, made.refunds, made.customer_balance_transaction) == (700, [], None)
    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.post_payment_credit_notes_amount, invoice.status) == (700, "paid")
    assert (await client.v1.customers.retrieve_async(customer)).balance == 0
    assert (await charge_of(client, invoice_id)).amount_refunded == 0


async def test_voiding_undoes_a_note_unless_it_refunded(client: stripe.StripeClient) -> None:
    customer, invoice_id = await paid_invoice(client)
    credited = await note(
        client, {"invoice": invoice_id, "amount": 1000, "credit_amount": 600, "out_of_band_amount": 400}
    )
    assert (await client.v1.customers.retrieve_async(customer)).balance == -600
    void = key("void")
    voided = await client.v1.credit_notes.void_credit_note_async(str(credited.id), options=void)
    assert (voided.status, voided.amount) == ("void", 1000)
    replay = await client.v1.credit_notes.void_credit_note_async(str(credited.id), options=void)
    assert replay.last_response is not None and replay.last_response.headers.get("Idempotent-Replayed") == "true"
    assert replay.status == "void"  # the first answer again, not "already void"
    assert voided.voided_at is not None and voided.voided_at >= voided.created
    assert (await client.v1.customers.retrieve_async(customer)).balance == 0
    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.post_payment_credit_notes_amount, invoice.status) == (0, "paid")
    with pytest.raises(stripe.InvalidRequestError, match="already void"):
        await client.v1.credit_notes.void_credit_note_async(str(credited.id), options=key("void"))

    # A voided note no longer counts: the whole invoice can be refunded again.
    refunding = await note(client, {"invoice": invoice_id, "amount": TOTAL, "refund_amount": TOTAL})
    with pytest.raises(stripe.InvalidRequestError, match="cannot be voided"):
        await client.v1.credit_notes.void_credit_note_async(str(refunding.id), options=key("void"))
    assert (await client.v1.credit_notes.retrieve_async(str(refunding.id))).status == "issued"
    statuses = [n.status for n in (await client.v1.credit_notes.list_async({"invoice": invoice_id})).data]
    assert statuses == ["issued", "void"]


async def test_a_note_on_an_open_invoice_reduces_what_it_owes(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    invoice_id = await open_invoice(client, customer, method)
    made = await note(client, {"invoice": invoice_id, "amount": 1000})
    assert (made.type, made.pre_payment_amount, made.post_payment_amount) == ("pre_payment", 1000, 0)
    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.status, invoice.total, invoice.amount_due, invoice.amount_remaining) == ("open", TOTAL, 3000, 3000)
    assert invoice.pre_payment_credit_notes_amount == 1000
    beyond = await refused(client, {"invoice": invoice_id, "amount": 3500})
    assert "can still be credited on invoice" in str(beyond.user_message) and "(€30.00)" in str(beyond.user_message)
    voided = await client.v1.credit_notes.void_credit_note_async(str(made.id), options=key("void"))
    assert voided.status == "void"
    assert (await client.v1.invoices.retrieve_async(invoice_id)).amount_due == TOTAL

    settled = await note(client, {"invoice": invoice_id, "amount": TOTAL})
    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.status, invoice.amount_due, invoice.amount_paid, invoice.amount_remaining) == ("paid", 0, 0, 0)
    with pytest.raises(stripe.InvalidRequestError, match="only be voided while the invoice is open"):
        await client.v1.credit_notes.void_credit_note_async(str(settled.id), options=key("void"))


async def test_a_preview_changes_nothing(client: stripe.StripeClient) -> None:
    _, invoice_id = await paid_invoice(client)
    line = (await client.v1.invoices.retrieve_async(invoice_id)).lines.data[1]
    params: Any = {
        "invoice": invoice_id,
        "lines": [{"type": "invoice_line_item", "invoice_line_item": line.id, "quantity": 1}],
        "credit_amount": 700,
    }
    preview = await client.v1.credit_notes.preview_async(params)
    assert (preview.amount, preview.post_payment_amount, [li.amount for li in preview.lines.data]) == (700, 700, [700])
    assert set(preview.to_dict()) == CREDIT_NOTE_KEYS
    assert (await client.v1.credit_notes.list_async({"invoice": invoice_id})).data == []
    assert (await client.v1.invoices.retrieve_async(invoice_id)).post_payment_credit_notes_amount == 0


async def events_of(receiver: Receiver, ids: set[str], types: set[str]) -> list[dict[str, Any]]:
    """The signed events about `ids` (each checked against the secret), once `types` arrived."""
    deadline = time.monotonic() + 15
    while True:
        events = [event for id_ in ids for event in receiver.events(id_)]
        if types <= {event["type"] for event in events}:
            return events
        assert time.monotonic() < deadline, f"only {sorted(e['type'] for e in events)}"
        await asyncio.sleep(0.1)


async def test_stripes_events_are_sent_signed(client: stripe.StripeClient, receiver: Receiver) -> None:
    _, invoice_id = await paid_invoice(client)
    refunding = await note(client, {"invoice": invoice_id, "amount": 1000, "refund_amount": 1000})
    crediting = await note(client, {"invoice": invoice_id, "amount": 500, "credit_amount": 500})
    await client.v1.credit_notes.update_async(str(crediting.id), {"memo": "Goodwill"}, key("update"))
    await client.v1.credit_notes.void_credit_note_async(str(crediting.id), options=key("void"))
    refund_id, charge = str(refunding.refunds[0].refund), await charge_of(client, invoice_id)
    wanted = {"credit_note.created", "credit_note.updated", "credit_note.voided", "refund.created"}
    wanted |= {"charge.refunded", "invoice.updated"}
    ids = {str(refunding.id), str(crediting.id), refund_id, str(charge.id), invoice_id}
    events = await events_of(receiver, ids, wanted)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        assert event["object"] == "event" and event["id"].startswith("evt_") and event["api_version"]
        by_type.setdefault(event["type"], []).append(event["data"])
    assert sorted(d["object"]["id"] for d in by_type["credit_note.created"]) == sorted([refunding.id, crediting.id])
    assert all(set(d["object"]) == CREDIT_NOTE_KEYS for d in by_type["credit_note.created"])
    [updated] = by_type["credit_note.updated"]
    assert (updated["object"]["memo"], updated["previous_attributes"]) == ("Goodwill", {"memo": None})
    assert [d["object"]["status"] for d in by_type["credit_note.voided"]] == ["void"]
    [refund] = by_type["refund.created"]
    assert (refund["object"]["id"], refund["object"]["amount"]) == (refund_id, 1000)
    assert [d["object"]["amount_refunded"] for d in by_type["charge.refunded"]] == [1000]
    changes = sorted(
        (d["previous_attributes"]["post_payment_credit_notes_amount"], d["object"]["post_payment_credit_notes_amount"])
        for d in by_type["invoice.updated"]
        if "post_payment_credit_notes_amount" in d.get("previous_attributes", {})
    )
    assert changes == [(0, 1000), (1000, 1500), (1500, 1000)]  # each note, then the void


async def test_a_replayed_create_makes_no_second_note_or_refund(client: stripe.StripeClient) -> None:
    _, invoice_id = await paid_invoice(client)
    params: Any = {"invoice": invoice_id, "amount": 1200, "refund_amount": 1200}
    options = key("note")
    first = await client.v1.credit_notes.create_async(params, options)
    again = await client.v1.credit_notes.create_async(params, options)
    assert again.id == first.id and again.refunds[0].refund == first.refunds[0].refund
    assert again.last_response is not None and again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert len((await client.v1.credit_notes.list_async({"invoice": invoice_id})).data) == 1
    charge = await charge_of(client, invoice_id)
    assert charge.amount_refunded == 1200
    assert len((await client.v1.refunds.list_async({"charge": str(charge.id)})).data) == 1
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.credit_notes.create_async(changed(params, amount=1300, refund_amount=1300), options)

    # A refusal of a note that ran is replayed; a failed validation is not saved.
    beyond, bad = key("beyond"), key("bad")
    for _ in range(2):
        with pytest.raises(stripe.InvalidRequestError) as error:
            await client.v1.credit_notes.create_async(changed(params, amount=TOTAL, refund_amount=TOTAL), beyond)
    assert replayed(error.value)
    with pytest.raises(stripe.InvalidRequestError, match="Invalid reason"):
        await client.v1.credit_notes.create_async(changed(params, reason="changed_mind"), bad)
    assert (await client.v1.credit_notes.create_async(changed(params, amount=100, refund_amount=100), bad)).id


async def test_stripes_refusals(client: stripe.StripeClient) -> None:
    customer, invoice_id = await paid_invoice(client)

    async def refusal(params: Any) -> tuple[str | None, str | None, str | None]:
        error = await refused(client, params)
        return error.param, error.code, error.user_message

    assert await refusal({"amount": 100}) == ("invoice", "parameter_missing", "Missing required param: invoice.")
    reason = await refusal({"invoice": invoice_id, "amount": 100, "refund_amount": 100, "reason": "goodwill"})
    message = "Invalid reason: must be one of duplicate, fraudulent, order_change, or product_unsatisfactory"
    assert reason == ("reason", None, message)
    assert (await refusal({"invoice": invoice_id, "amount": "ten"}))[:2] == ("amount", "parameter_invalid_integer")
    assert (await refusal({"invoice": invoice_id, "refund_amount": 100}))[0] == "amount"  # nor amount nor lines
    split = await refusal({"invoice": invoice_id, "amount": 1000, "refund_amount": 600, "credit_amount": 300})
    assert split[2] is not None and "(€9.00) must equal the credit note's post_payment_amount (€10.00)" in split[2]
    assert (await refusal({"invoice": invoice_id, "lines": [{"amount": 5}]}))[:2] == (
        "lines[0][type]",
        "parameter_missing",
    )
    unknown_line = await refusal(
        {"invoice": invoice_id, "lines": [{"type": "invoice_line_item", "invoice_line_item": "il_x", "amount": 5}]}
    )
    assert unknown_line[0] == "lines[0][invoice_line_item]"
    with pytest.raises(stripe.InvalidRequestError, match="No such invoice: 'in_missing'") as missing:
        await note(client, {"invoice": "in_missing", "amount": 100})
    assert missing.value.http_status == 404

    method = (await client.v1.invoices.retrieve_async(invoice_id)).default_payment_method
    draft_id = await draft_with_items(client, customer, str(method))
    draft = await refusal({"invoice": draft_id, "amount": 100})
    assert draft[0] == "invoice" and draft[2] is not None and "is draft" in draft[2]
    tiny_id = await draft_with_items(client, customer, str(method), [("Tiny", 20)])  # below eur's minimum charge
    tiny = await client.v1.invoices.finalize_invoice_async(tiny_id, {"auto_advance": False}, key("finalize"))
    assert (tiny.status, tiny.amount_paid) == ("paid", 0)
    nothing = await refusal({"invoice": tiny_id, "amount": 20, "refund_amount": 20})
    assert nothing[:1] == ("refund_amount",) and nothing[2] == f"Invoice {tiny_id} has no payment to refund."
    assert (await client.v1.credit_notes.list_async({"customer": customer})).data == []
