"""Money given back without a credit note, reaching the record through the webhook: a refund
made on an invoice's payment in Stripe's Dashboard, by its API or by support names only its
payment intent (refund.created, .updated, .failed); an invoice payment
(invoice_payment.paid, since 2025-03-31.basil) or, before, the invoice itself
(`payment_intent`) says whose that is. Either may arrive first, events arrive in any order
and twice, a refund a credit note made or linked counts once, a failed one not at all.
Objects are shaped as Stripe's fixtures at the current API version; events are signed and
delivered through the real Envoy, sidecar and Postgres, or made at the real emulator."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Any

import httpx
import pytest
import stripe

from service.credit_notes import InvoicePayment
from service.domain import InvalidArgument
from service.storage import Storage
from service.stripe_objects import credit_note_from_stripe, invoice_from_stripe, refund_from_stripe
from tests.helpers import deliver, event, intents_of, poll_until
from tests.test_credit_notes import note_event, note_object
from tests.test_refunds import FAILED_PRECONDITION, TOTAL, at_stripe, paid_invoice, refund


def refund_object(refund_id: str, intent: str | None, amount: int, status: str = "succeeded") -> dict[str, Any]:
    """A refund in the shape of Stripe's fixture (`refund`) at the current API version."""
    return {
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": None,
        "charge": f"ch_{refund_id[3:]}",
        "created": int(time.time()),
        "currency": "eur",
        "customer": "cus_webhooktest",
        "destination_details": {"card": {"type": "refund"}, "type": "card"},
        "metadata": {},
        "payment_intent": intent,
        "payment_method": None,
        "reason": "requested_by_customer",
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": status,
        "transfer_reversal": None,
    }


def payment_object(intent: str, invoice_id: str, amount: int) -> dict[str, Any]:
    """An invoice payment in the shape of Stripe's fixture (`invoice_payment`)."""
    return {
        "id": f"inpay_{intent[3:]}",
        "object": "invoice_payment",
        "amount_paid": amount,
        "amount_requested": amount,
        "created": int(time.time()),
        "currency": "eur",
        "invoice": invoice_id,
        "is_default": True,
        "livemode": False,
        "payment": {"type": "payment_intent", "payment_intent": intent},
        "status": "paid",
        "status_transitions": {"canceled_at": None, "paid_at": int(time.time())},
    }


def signed(obj: dict[str, Any], kind: str, created: int) -> str:
    return note_event(obj, kind, created)


async def outcome(http: httpx.AsyncClient, payload: str) -> str:
    reply = await deliver(http, payload)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["outcome"])


async def given_back(http: httpx.AsyncClient, invoice_id: str) -> tuple[int, int]:
    reply = await http.get(f"/admin/api/invoices/{invoice_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()["amountRefunded"], reply.json()["amountCredited"]


async def test_refunds_without_a_note_count_once_whatever_order_they_and_their_payment_arrive_in(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    """Three orders of one invoice's story, each with its events delivered twice: 2,000
    refunded outside a note (pending, then succeeded), 1,000 refunded and then failed, and a
    note of 1,500 whose refund also arrives as a refund event. 3,500 refunded, 1,500
    credited, whether the payment came last (each refund waits for it), first, or in
    reverse order with the rest (a failure before its refund's creation)."""
    for order in ("payment last", "as it happened", "reversed"):
        run = uuid.uuid4().hex[:10]
        invoice_id, intent, t = f"in_gb{run}", f"pi_gb{run}", int(time.time()) - 100
        note = note_object(f"cn_gb{run}", invoice_id, amount=1500, refunded=1500)
        linked = note["refunds"][0]["refund"]
        story = [
            signed(payment_object(intent, invoice_id, 9000), "invoice_payment.paid", t + 1),
            signed(refund_object(f"re_a{run}", intent, 2000, "pending"), "refund.created", t + 2),
            signed(refund_object(f"re_a{run}", intent, 2000), "refund.updated", t + 3),
            signed(refund_object(f"re_b{run}", intent, 1000), "refund.created", t + 4),
            signed(refund_object(f"re_b{run}", intent, 1000, "failed"), "refund.failed", t + 5),
            signed(refund_object(linked, intent, 1500), "refund.created", t + 6),
            note_event(note, "credit_note.created", t + 6),
        ]
        if order == "payment last":
            story = story[1:] + story[:1]
        elif order == "reversed":
            story.reverse()
        assert await outcome(http, event(invoice_id, "invoice.paid", "paid", t, total=9000)) == "created"
        outcomes = [await outcome(http, payload) for payload in story + story]
        assert outcomes[len(story) :] == ["duplicate"] * len(story), outcomes
        assert await given_back(http, invoice_id) == (2000 + 1500, 1500), (order, outcomes)


async def test_an_older_api_versions_invoice_names_its_payment_and_a_refund_of_no_invoice_is_ignored(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    invoice_id, intent, t = f"in_old{uuid.uuid4().hex[:10]}", f"pi_old{uuid.uuid4().hex[:10]}", int(time.time()) - 50
    assert await outcome(http, signed(refund_object("re_old1", intent, 700), "refund.created", t + 1)) == "created"
    old: dict[str, Any] = json.loads(event(invoice_id, "invoice.paid", "paid", t, total=4000))
    old["data"]["object"] |= {"payment_intent": intent, "charge": "ch_old1", "paid": True}  # the 2023 shape
    old["api_version"] = "2023-10-16"
    assert await outcome(http, json.dumps(old)) == "created"
    assert await given_back(http, invoice_id) == (700, 0)
    # A refund of a charge made without a payment intent pays back no invoice: taken, ignored.
    reply = await deliver(http, signed(refund_object("re_nopi1", None, 100), "refund.created", t + 2))
    assert (reply.status_code, reply.json()["outcome"]) == (200, "ignored")


async def test_a_refund_made_at_stripe_without_a_note_reaches_the_record_by_webhook(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    invoice = await paid_invoice(http, stripe_client)
    (paid_by,) = await intents_of(stripe_client, invoice["id"])
    await stripe_client.v1.refunds.create_async({"payment_intent": paid_by, "amount": 900})

    async def refunded() -> tuple[int, int] | None:
        totals = await given_back(http, invoice["id"])
        return totals if totals[0] else None

    assert await poll_until(refunded, "the dashboard's refund without a note") == (900, 0)


async def test_a_refund_without_a_note_takes_from_what_refund_invoice_has_left(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    """Stripe refuses a note's refund beyond what the payment has left, so RefundInvoice
    counts a refund made without a note: the rest of the payment, not all of it."""
    invoice = await paid_invoice(http, stripe_client)
    (paid_by,) = await intents_of(stripe_client, invoice["id"])
    await stripe_client.v1.refunds.create_async({"payment_intent": paid_by, "amount": 1500})
    beyond = await refund(http, invoice["id"], amount=TOTAL - 1500 + 1)
    assert beyond.status_code == 400 and beyond.json()["code"] == FAILED_PRECONDITION, beyond.text
    assert f"{TOTAL - 1500} eur (minor units) left to refund" in beyond.json()["message"]
    rest = await refund(http, invoice["id"])
    assert rest.status_code == 200, rest.text
    assert (rest.json()["amountRefunded"], rest.json()["amountCredited"]) == (TOTAL, TOTAL - 1500)
    notes, refunded = await at_stripe(stripe_client, invoice["id"])
    assert [n.amount for n in notes] == [TOTAL - 1500] and refunded == TOTAL
    nothing = await refund(http, invoice["id"])
    assert nothing.status_code == 400 and "nothing left to refund" in nothing.json()["message"], nothing.text


async def test_a_refund_a_note_links_in_part_counts_its_rest_outside_the_note(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    """A note may link only part of an existing refund (`refunds[].amount_refunded`): the
    note counts that part, and the rest of the refund still went back to the payment."""
    run = uuid.uuid4().hex[:10]
    invoice_id, intent, t = f"in_pl{run}", f"pi_pl{run}", int(time.time()) - 60
    note = note_object(f"cn_pl{run}", invoice_id, amount=300, refunded=300)
    note["refunds"][0]["refund"] = f"re_pl{run}"
    assert await outcome(http, event(invoice_id, "invoice.paid", "paid", t, total=5000)) == "created"
    assert await outcome(http, signed(payment_object(intent, invoice_id, 5000), "invoice_payment.paid", t + 1)) == (
        "created"
    )
    assert await outcome(http, signed(refund_object(f"re_pl{run}", intent, 500), "refund.created", t + 2)) == "created"
    assert await outcome(http, note_event(note, "credit_note.created", t + 3)) == "created"
    assert await given_back(http, invoice_id) == (500, 300)


async def test_a_note_kept_before_its_refunds_were_is_not_counted_twice(stack_store: Storage) -> None:
    """A note recorded before migration 0012 (or by the previous version in a rollout) has
    unknown links: its refund, arriving later as a refund event, is not counted beside it;
    a refund beyond what it refunded still is, and its description from Stripe fills them."""
    run = uuid.uuid4().hex[:10]
    invoice_id, intent, t = f"in_ul{run}", f"pi_ul{run}", int(time.time()) - 60
    paid = json.loads(event(invoice_id, "invoice.paid", "paid", t, total=5000))["data"]["object"]
    await stack_store.apply_stripe_invoice(invoice_from_stripe(paid), stripe_time=t)
    stripe_note = credit_note_from_stripe(note_object(f"cn_ul{run}", invoice_id, amount=1000, refunded=1000))
    await stack_store.record_stripe_credit_note(replace(stripe_note, refund_links=None), stripe_time=t + 1)
    await stack_store.apply_stripe_invoice_payment(InvoicePayment(intent, invoice_id))
    refund_of_the_note = refund_from_stripe(refund_object(f"re_ul{run}", intent, 1000))  # the note's, by its id
    assert refund_of_the_note is not None and stripe_note.refund_links == ((refund_of_the_note.id, 1000),)
    await stack_store.apply_stripe_refund(refund_of_the_note, stripe_time=t + 2)
    assert await totals(stack_store, invoice_id) == (1000, 1000)
    direct = refund_from_stripe(refund_object(f"re_dl{run}", intent, 400))
    assert direct is not None
    await stack_store.apply_stripe_refund(direct, stripe_time=t + 3)
    assert await totals(stack_store, invoice_id) == (1400, 1000)
    # Stripe's description of the note, however old, says which refund it made.
    await stack_store.record_stripe_credit_note(stripe_note, stripe_time=t)
    assert await totals(stack_store, invoice_id) == (1400, 1000)
    (kept,) = await stack_store.credit_notes_of(invoice_id)
    assert kept.refund_links == stripe_note.refund_links


async def totals(store: Storage, invoice_id: str) -> tuple[int, int]:
    record = await store.get_invoice(invoice_id)
    return record.amount_refunded, record.amount_credited


def test_a_refund_is_read_with_either_id_and_never_without_its_amount() -> None:
    """Card refunds are `re_`, refunds of bank debits and transfers `pyr_` (Stripe's ids);
    a refund of no amount would count as 0 given back, so it is refused instead."""
    assert refund_from_stripe(refund_object("pyr_bank1", "pi_bank1", 700)) == replace(
        refund_from_stripe(refund_object("re_bank1", "pi_bank1", 700)),  # type: ignore[type-var]
        id="pyr_bank1",
    )
    with pytest.raises(InvalidArgument, match="amount"):
        refund_from_stripe({k: v for k, v in refund_object("re_noamount", "pi_x", 1).items() if k != "amount"})
    with pytest.raises(InvalidArgument, match="amount"):
        refund_from_stripe(refund_object("re_nullamount", "pi_x", 1) | {"amount": None})
    with pytest.raises(InvalidArgument, match="refund id"):
        refund_from_stripe(refund_object("ch_notarefund", "pi_x", 1))
