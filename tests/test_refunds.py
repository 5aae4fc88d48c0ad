"""RefundInvoice through the real Envoy, server, sidecar and Stripe emulator: `:refund`
gives money back on a paid invoice as one credit note refunded to its payment, all that is
left by default or the amount asked; partial refunds add up to what was paid and no further;
a key makes one credit note however it is retried or cut off at Stripe; a refund made at
Stripe directly (its dashboard) reaches the record by webhook."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import httpx
import stripe

from tests.helpers import READ_KEY, REQUEST, Stack, poll_until, until_delivered, wait_for_status
from tests.test_manage import create
from tests.test_watch_gateway import ndjson
from tools.customers import customer_with_card

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
TOTAL = 4000  # REQUEST's two items


async def paid_invoice(http: httpx.AsyncClient, stripe_client: stripe.StripeClient) -> dict[str, Any]:
    customer, method = await customer_with_card(stripe_client)
    invoice = await create(http, {**REQUEST, "customer": customer, "paymentMethod": method})
    assert (invoice["status"], invoice["total"]) == ("paid", TOTAL)
    await wait_for_status(http, invoice["id"], "paid")
    return invoice


async def refund(http: httpx.AsyncClient, invoice_id: str, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await http.post(f"/admin/api/invoices/{invoice_id}:refund", json=body, headers=headers)


async def at_stripe(client: stripe.StripeClient, invoice_id: str) -> tuple[list[Any], int]:
    """The invoice's credit notes at Stripe, and what its charge has had refunded."""
    notes = (await client.v1.credit_notes.list_async({"invoice": invoice_id, "limit": 100})).data
    invoice = await client.v1.invoices.retrieve_async(invoice_id, {"expand": ["charge"]})
    charges = (await client.v1.charges.list_async({"customer": str(invoice.customer), "limit": 100})).data
    return list(notes), sum(c.amount_refunded for c in charges)


async def test_a_full_refund_gives_everything_back_once(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient, localstripe: str
) -> None:
    invoice = await paid_invoice(http, stripe_client)
    # The payment's own events (invoice_payment.paid, a late invoice.paid) update the record
    # too: the watch's first change must be the refund's, so they land before it opens.
    await until_delivered(localstripe)
    key = uuid.uuid4().hex
    async with ndjson(http, invoiceId=invoice["id"]) as lines:
        assert (await asyncio.wait_for(lines.get(), 10))["kind"] == "KIND_BOOKMARK"
        first = await refund(http, invoice["id"], key, reason="duplicate", memo="charged twice by mistake")
        assert first.status_code == 200, first.text
        watched = await asyncio.wait_for(lines.get(), 20)
        while watched["kind"] == "KIND_BOOKMARK":  # a quiet watch's periodic position
            watched = await asyncio.wait_for(lines.get(), 20)
    record = first.json()
    # A watcher hears the money given back, as the record now holds it.
    assert watched["kind"] == "KIND_UPDATED"
    assert (watched["invoice"]["amountCredited"], watched["invoice"]["amountRefunded"]) == (TOTAL, TOTAL)
    assert (record["status"], record["amountCredited"], record["amountRefunded"]) == ("paid", TOTAL, TOTAL)
    again = await refund(http, invoice["id"], key, reason="duplicate", memo="charged twice by mistake")
    assert (again.status_code, again.json()["amountRefunded"]) == (200, TOTAL)
    notes, refunded = await at_stripe(stripe_client, invoice["id"])
    assert [(n.amount, n.reason, n.memo, n.status) for n in notes] == [
        (TOTAL, "duplicate", "charged twice by mistake", "issued")
    ]
    assert refunded == TOTAL
    nothing = await refund(http, invoice["id"])
    assert nothing.status_code == 400 and nothing.json()["code"] == FAILED_PRECONDITION
    assert "nothing left to refund" in nothing.json()["message"]
    assert (await http.get(f"/admin/api/invoices/{record['_id']}")).json()["amountRefunded"] == TOTAL


async def test_partial_refunds_add_up_and_one_beyond_what_is_left_is_refused(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    invoice = await paid_invoice(http, stripe_client)
    assert (await refund(http, invoice["id"], amount=1000)).json()["amountRefunded"] == 1000
    assert (await refund(http, invoice["id"], amount=2500)).json()["amountRefunded"] == 3500
    beyond = await refund(http, invoice["id"], amount=501)
    assert beyond.status_code == 400 and beyond.json()["code"] == FAILED_PRECONDITION, beyond.text
    assert "500 eur (minor units) left to refund" in beyond.json()["message"]
    rest = await refund(http, invoice["id"])
    assert (rest.json()["amountCredited"], rest.json()["amountRefunded"]) == (TOTAL, TOTAL)
    notes, refunded = await at_stripe(stripe_client, invoice["id"])
    assert sorted(n.amount for n in notes) == [500, 1000, 2500] and refunded == TOTAL
    # Each note on the record's sub-resource, oldest first, as Stripe gave it back; a read key will do.
    listed = await http.get(f"/admin/api/invoices/{invoice['id']}/creditNotes", headers={"Api-Key": READ_KEY})
    assert listed.status_code == 200, listed.text
    rows = [
        (n["amount"], n["refunded"], n["credited"], n["status"], n["currency"]) for n in listed.json()["creditNotes"]
    ]
    assert sorted(rows) == [(a, a, 0, "issued", "eur") for a in (500, 1000, 2500)]
    assert {n["id"] for n in listed.json()["creditNotes"]} == {n.id for n in notes}
    assert (await http.get("/admin/api/invoices/in_doesnotexist/creditNotes")).status_code == 404


async def test_a_refund_cut_off_at_stripe_and_retried_with_its_key_makes_one_credit_note(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    invoice = await paid_invoice(http, stripe_client)
    async with httpx.AsyncClient(base_url=f"{stack.localstripe}/_config") as emulator:
        keys = []
        for when in ("before", "after"):  # Stripe failed before it ran, or after (the note made)
            fault = {"path": "^/v1/credit_notes$", "method": "POST", "count": 1, "when": when}
            (await emulator.post("/faults", json=fault)).raise_for_status()
            keys.append(key := uuid.uuid4().hex)
            # The SDK's own retries meet the 500 Stripe saved for the key, replayed: the
            # attempt moves on to new Stripe keys, finds the note the key made, if any, by
            # its metadata, and answers 200; or the caller hears 503 and retries.
            cut = await refund(http, invoice["id"], key, amount=700)
            assert cut.status_code in (200, 503), cut.text
            retried = await refund(http, invoice["id"], key, amount=700)
            assert retried.status_code == 200, retried.text
            (await emulator.delete("/faults")).raise_for_status()
    notes, refunded = await at_stripe(stripe_client, invoice["id"])
    made_by = [str((n.metadata.to_dict() if n.metadata else {}).get("invoice_service_key")) for n in notes]
    assert sorted(made_by) == sorted(keys), "one credit note per key"
    assert [n.amount for n in notes] == [700, 700] and refunded == 1400
    assert retried.json()["amountRefunded"] == 1400


async def test_only_a_paid_invoice_with_a_write_key_and_a_sound_request_is_refunded(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    invoice = await paid_invoice(http, stripe_client)
    read_only = await http.post(f"/admin/api/invoices/{invoice['id']}:refund", json={}, headers={"Api-Key": READ_KEY})
    assert read_only.status_code == 403, read_only.text
    for body, field in (
        ({"amount": 0}, "amount"),
        ({"reason": "changed_my_mind"}, "reason"),
        ({"memo": "x" * 5001}, "memo"),
    ):
        bad = await refund(http, invoice["id"], **body)
        assert bad.status_code == 400 and bad.json()["code"] == INVALID_ARGUMENT, bad.text
        assert field in bad.json()["message"]
    assert (await refund(http, "in_doesnotexist")).status_code == 404
    customer, method = await customer_with_card(stripe_client)
    draft = await stripe_client.v1.invoices.create_async(
        {
            "customer": customer,
            "currency": "eur",
            "auto_advance": False,
            "default_payment_method": method,
            "pending_invoice_items_behavior": "exclude",
        }
    )
    await stripe_client.v1.invoices.add_lines_async(str(draft.id), {"lines": [{"amount": 900}]})
    await stripe_client.v1.invoices.finalize_invoice_async(str(draft.id), {"auto_advance": False})
    unpaid = await refund(http, str(draft.id))
    assert unpaid.status_code == 400 and "is open; only paid can be refunded" in unpaid.json()["message"]
    notes, refunded = await at_stripe(stripe_client, invoice["id"])
    assert notes == [] and refunded == 0


async def test_a_refund_made_at_stripe_directly_reaches_the_record_by_webhook(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    invoice = await paid_invoice(http, stripe_client)
    await stripe_client.v1.credit_notes.create_async(
        {"invoice": invoice["id"], "amount": 1200, "refund_amount": 1200, "reason": "order_change"}
    )

    async def refunded() -> dict[str, Any] | None:
        record: dict[str, Any] = (await http.get(f"/admin/api/invoices/{invoice['id']}")).json()
        return record if record["amountRefunded"] == 1200 else None

    record = await poll_until(refunded, "the dashboard's refund on the record")
    assert (record["amountCredited"], record["status"]) == (1200, "paid")
