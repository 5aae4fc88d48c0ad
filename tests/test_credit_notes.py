"""Money given back, reaching the record from anywhere through the webhook: Stripe's
credit notes (credit_note.created, .updated, .voided), read in the current API version's
shape (a `refunds` list with amounts) and the 2023 one (one `refund` id), applied in any
order and once per event, summed into the record's amountCredited and amountRefunded, which
the REST and gRPC answers and the change feed carry. Events are signed and delivered
through the real Envoy to the real sidecar and Postgres."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from service.credit_notes import NoteStatus
from service.domain import InvalidArgument
from service.storage import Storage
from service.stripe_objects import credit_note_from_stripe
from tests.helpers import Stack, deliver, event


def note_object(
    note_id: str,
    invoice_id: str,
    *,
    amount: int,
    refunded: int = 0,
    out_of_band: int = 0,
    status: str = "issued",
    reason: str | None = "order_change",
) -> dict[str, Any]:
    """A credit note in the shape of Stripe's fixture at the current API version (the keys
    the service reads, and their neighbours), its refund listed with its amount."""
    refunds = [{"amount_refunded": refunded, "refund": f"re_{note_id[3:]}"}] if refunded else []
    return {
        "id": note_id,
        "object": "credit_note",
        "amount": amount,
        "amount_shipping": 0,
        "created": int(time.time()),
        "currency": "eur",
        "customer": "cus_webhooktest",
        "customer_balance_transaction": f"cbtxn_{note_id[3:]}" if amount - refunded - out_of_band else None,
        "invoice": invoice_id,
        "memo": "given back",
        "metadata": {},
        "out_of_band_amount": out_of_band or None,
        "reason": reason,
        "refunds": refunds,
        "status": status,
        "total": amount,
        "type": "post_payment",
        "voided_at": int(time.time()) if status == "void" else None,
    }


def note_event(obj: dict[str, Any], kind: str, created: int) -> str:
    body = {"id": f"evt_{uuid.uuid4().hex[:16]}", "object": "event", "type": kind, "created": created}
    return json.dumps({**body, "api_version": "2026-05-27.dahlia", "data": {"object": obj}})


def test_the_split_is_read_from_each_api_versions_shape() -> None:
    current = credit_note_from_stripe(note_object("cn_a", "in_a", amount=5000, refunded=3000, out_of_band=500))
    assert (current.amount, current.refunded, current.credited, current.out_of_band) == (5000, 3000, 1500, 500)
    assert (current.status, current.reason, current.currency) == (NoteStatus.ISSUED, "order_change", "eur")
    # The 2023 shape names one refund without its amount: with no credit beside it, it is the rest.
    old = {k: v for k, v in note_object("cn_b", "in_b", amount=4000).items() if k != "refunds"}
    old |= {"refund": "re_b", "customer_balance_transaction": None, "out_of_band_amount": 1000}
    assert credit_note_from_stripe(old).refunded == 3000
    old |= {"customer_balance_transaction": "cbtxn_b"}
    with pytest.raises(InvalidArgument, match="does not say how much"):
        credit_note_from_stripe(old)
    with pytest.raises(InvalidArgument, match="exceed the amount"):
        credit_note_from_stripe(note_object("cn_c", "in_c", amount=100, refunded=90, out_of_band=20))
    with pytest.raises(InvalidArgument, match="credit note id"):
        credit_note_from_stripe(note_object("re_d", "in_d", amount=100))
    with pytest.raises(InvalidArgument, match="not a Stripe credit note"):
        credit_note_from_stripe(note_object("cn_e", "in_e", amount=100, status="draft"))


async def _record(http: httpx.AsyncClient, invoice_id: str) -> dict[str, Any]:
    reply = await http.get(f"/admin/api/invoices/{invoice_id}")
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def _outcome(http: httpx.AsyncClient, payload: str) -> str:
    reply = await deliver(http, payload)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["outcome"])


async def test_notes_from_anywhere_sum_into_the_record_in_any_order_once_each(
    http: httpx.AsyncClient, stack_store: Storage, stack: Stack
) -> None:
    invoice_id, t = f"in_cn{uuid.uuid4().hex[:12]}", int(time.time()) - 100
    assert await _outcome(http, event(invoice_id, "invoice.paid", "paid", t, total=9000)) == "created"
    refund = note_object("cn_refund1", invoice_id, amount=3000, refunded=3000)
    created = note_event(refund, "credit_note.created", t + 1)
    assert await _outcome(http, created) == "created"
    assert await _outcome(http, created) == "duplicate"
    balance = note_object("cn_balance1", invoice_id, amount=1500, reason=None)
    assert await _outcome(http, note_event(balance, "credit_note.created", t + 2)) == "created"
    record = await _record(http, invoice_id)
    assert (record["amountCredited"], record["amountRefunded"], record["status"]) == (4500, 3000, "paid")

    # The refund voided; its creation delivered again late, under another event id: stale.
    voided = note_event({**refund, "status": "void"}, "credit_note.voided", t + 3)
    assert await _outcome(http, voided) == "updated"
    assert await _outcome(http, note_event(refund, "credit_note.updated", t + 4)) == "stale"
    record = await _record(http, invoice_id)
    assert (record["amountCredited"], record["amountRefunded"]) == (1500, 0)

    # Each event applied once, by the count its applying transaction keeps.
    conn = await asyncpg.connect(stack.database)
    try:
        counted = await conn.fetch("SELECT applications FROM stripe_events WHERE stripe_invoice_id = $1", invoice_id)
        feed = await conn.fetch(
            "SELECT amount_credited, amount_refunded FROM invoice_changes WHERE stripe_invoice_id = $1 ORDER BY seq",
            invoice_id,
        )
    finally:
        await conn.close()
    assert sorted(r["applications"] for r in counted) == [1] * 5  # the duplicate delivery is no event
    # A watcher hears every change of the totals, as the record went through them.
    assert [tuple(r) for r in feed] == [(0, 0), (3000, 3000), (4500, 3000), (1500, 0)]


async def test_a_note_that_arrives_before_its_invoice_counts_once_the_invoice_does(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    invoice_id, t = f"in_cn{uuid.uuid4().hex[:12]}", int(time.time()) - 100
    early = note_object("cn_early1", invoice_id, amount=2000, refunded=2000)
    assert await _outcome(http, note_event(early, "credit_note.created", t + 5)) == "created"
    assert (await http.get(f"/admin/api/invoices/{invoice_id}")).status_code == 404
    assert await _outcome(http, event(invoice_id, "invoice.paid", "paid", t, total=2000)) == "created"
    record = await _record(http, invoice_id)
    assert (record["amountCredited"], record["amountRefunded"]) == (2000, 2000)


async def test_a_signed_note_the_service_cannot_read_is_taken_and_rejected_never_a_5xx(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    broken = note_object("cn_broken1", "in_broken1", amount=100, refunded=90, out_of_band=20)
    reply = await deliver(http, note_event(broken, "credit_note.created", int(time.time())))
    assert reply.status_code == 200
    assert reply.json()["outcome"] == "rejected" and "exceed" in reply.json()["reason"]
