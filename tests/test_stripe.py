"""The money path against the Stripe emulator: Create through REST puts exactly the
requested items on a Stripe invoice, the emulator's own signed webhooks reach the
sidecar through Envoy, and every delivery is applied once, in the right order."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import stripe
from pydantic import SecretStr

from service import payments, validation
from service.app import reconcile
from service.config import Settings
from service.invoices import InvoiceCreator, Timing
from service.storage import Storage
from tests.helpers import OLD_WEBHOOK_SECRET, REQUEST, deliver, event, intents_of, sign, wait_for_status
from tools.customers import customer_with_card
from tools.stack import LOCALSTRIPE_KEY

FIXTURES = Path(__file__).parent / "fixtures"


async def test_create_pay_and_record_through_rest(http: httpx.AsyncClient, stripe_client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(stripe_client)
    request = {**REQUEST, "customer": customer, "paymentMethod": method, "user": {"_id": "u-42", "name": "Ada"}}
    reply = await http.post("/admin/api/invoices", json=request, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert reply.status_code == 200, reply.text
    invoice = reply.json()
    assert invoice["object"] == "invoice"
    assert invoice["id"].startswith("in_")
    # A top-level JSON object as the original answered; the keys both Stripe objects have
    # carry the same JSON types (the emulator knows fewer of Stripe's keys).
    sample = json.loads((FIXTURES / "create-invoice.response.json").read_text())
    common = [k for k in sample if sample[k] is not None and invoice.get(k) is not None]
    assert len(common) >= 20
    assert {k: type(invoice[k]).__name__ for k in common} == {k: type(sample[k]).__name__ for k in common}
    assert [(line["description"], line["amount"]) for line in invoice["lines"]["data"]] == [
        ("All resources", 3300),
        ("Support", 700),
    ]
    assert invoice["total"] == invoice["amount_due"] == 4000
    assert invoice["currency"] == "eur"
    assert invoice["status"] == "paid"

    stored = await stripe_client.v1.invoices.retrieve_async(invoice["id"])
    assert stored.total == 4000
    assert len(stored.lines.data) == 2

    record = await wait_for_status(http, invoice["id"], "paid")
    assert record["amount"] == 4000
    assert record["invoicePdf"]
    assert record["user"] == {"_id": "u-42", "name": "Ada"}


async def test_without_a_user_the_invoice_belongs_to_the_customer(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    reply = await http.post("/admin/api/invoices", json={**REQUEST, "customer": customer, "paymentMethod": method})
    record = await wait_for_status(http, reply.json()["id"], "paid")
    assert record["user"]["_id"] == customer


async def test_a_retried_create_makes_one_stripe_invoice(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    body = {**REQUEST, "customer": customer, "paymentMethod": method}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first, second = [await http.post("/admin/api/invoices", json=body, headers=key) for _ in range(2)]
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    listed = await stripe_client.v1.invoices.list_async({"customer": customer})
    assert [i.id for i in listed.data] == [first.json()["id"]]

    other = await http.post("/admin/api/invoices", json={**body, "currency": "usd"}, headers=key)
    assert other.status_code == 409
    assert other.json()["code"] == 6
    assert len((await stripe_client.v1.invoices.list_async({"customer": customer})).data) == 1


async def test_a_declined_card_answers_the_open_invoice(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client, number="4000000000000341")
    reply = await http.post("/admin/api/invoices", json={**REQUEST, "customer": customer, "paymentMethod": method})
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "open"
    assert reply.json()["amount_paid"] == 0
    record = await wait_for_status(http, reply.json()["id"], "open")
    assert record["amount"] == 4000


async def test_unknown_customer_is_invalid_argument(http: httpx.AsyncClient) -> None:
    reply = await http.post(
        "/admin/api/invoices", json={**REQUEST, "customer": "cus_doesnotexist", "paymentMethod": "pm_nope"}
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3


async def test_the_same_event_twice_is_applied_once(http: httpx.AsyncClient, stack_store: Storage) -> None:
    payload = event("in_twice0001", "invoice.paid", "paid", int(time.time()))
    first, second = await deliver(http, payload), await deliver(http, payload)
    assert (first.status_code, first.json()["outcome"]) == (200, "created")
    assert (second.status_code, second.json()["outcome"]) == (200, "duplicate")
    record = await stack_store.get_invoice("in_twice0001")
    assert (record.status, record.amount, record.user.id) == ("paid", 5000, "cus_webhooktest")


@pytest.mark.parametrize("seed", range(4))
async def test_shuffled_events_end_in_the_newest_state(
    http: httpx.AsyncClient, stack_store: Storage, seed: int
) -> None:
    now = int(time.time())
    invoice_id = f"in_shuffled{seed:04d}"
    history = [
        ("invoice.created", "draft", 0),
        ("invoice.finalized", "open", 5000),
        ("invoice.payment_failed", "open", 5000),
        ("invoice.updated", "open", 5000),
        ("invoice.payment_succeeded", "paid", 5000),
        ("invoice.paid", "paid", 5000),
    ]
    payloads = [event(invoice_id, kind, status, now - 60 + i, total) for i, (kind, status, total) in enumerate(history)]
    random.Random(seed).shuffle(payloads)  # noqa: S311 - a reproducible order, not a secret
    for payload in payloads:
        assert (await deliver(http, payload)).status_code == 200
    record = await stack_store.get_invoice(invoice_id)
    assert (record.status, record.amount) == ("paid", 5000)


async def test_a_deleted_draft_does_not_come_back(http: httpx.AsyncClient, stack_store: Storage) -> None:
    now = int(time.time())
    await deliver(http, event("in_deleted001", "invoice.deleted", "draft", now))
    late = await deliver(http, event("in_deleted001", "invoice.created", "draft", now - 5))
    assert late.json()["outcome"] == "ignored-deleted"
    assert (await http.get("/admin/api/invoices/in_deleted001")).status_code == 404


async def test_other_event_types_are_acknowledged_and_ignored(http: httpx.AsyncClient) -> None:
    payload = json.dumps({"id": "evt_other", "type": "customer.created", "created": 1, "data": {"object": {}}})
    reply = await deliver(http, payload)
    assert (reply.status_code, reply.json()["outcome"]) == (200, "ignored")


async def test_a_rotated_secret_still_verifies(http: httpx.AsyncClient) -> None:
    """Signed only by the previous secret (beside one the sidecar does not know): the event
    is verified, applied (a new record, `created`) and readable through the API."""
    invoice_id = f"in_rotated{uuid.uuid4().hex[:12]}"
    payload = event(invoice_id, "invoice.paid", "paid", int(time.time()), total=4321)
    at = int(time.time())
    both = f"{sign(payload, 'whsec_unknown', at)},v1={sign(payload, OLD_WEBHOOK_SECRET, at).split('v1=')[1]}"
    reply = await deliver(http, payload, both)
    assert (reply.status_code, reply.json()) == (200, {"received": True, "outcome": "created"})
    record = await http.get(f"/admin/api/invoices/{invoice_id}")
    assert record.status_code == 200, record.text
    assert (record.json()["invoiceId"], record.json()["status"], record.json()["amount"]) == (invoice_id, "paid", 4321)


@pytest.mark.parametrize(
    "case", ["other bytes", "wrong secret", "stale", "future", "no v1", "no header", "malformed json", "not utf-8"]
)
async def test_bad_deliveries_are_400_and_change_nothing(
    http: httpx.AsyncClient, stack_store: Storage, case: str
) -> None:
    payload = event("in_rejected01", "invoice.paid", "paid", int(time.time()))
    body, signature = payload.encode(), sign(payload)
    if case == "other bytes":
        body = payload.replace("5000", "1").encode()
    elif case == "wrong secret":
        signature = sign(payload, "whsec_attacker")
    elif case == "stale":
        signature = sign(payload, at=int(time.time()) - 3600)
    elif case == "future":
        signature = sign(payload, at=int(time.time()) + 3600)
    elif case == "no v1":
        signature = signature.split(",")[0]
    elif case == "no header":
        signature = ""
    elif case == "malformed json":
        body = b'{"id": "evt_x", "type": "invoice.paid",'
        signature = sign(body.decode())
    elif case == "not utf-8":
        body = b"\xff\xfe{}"
    headers = {"content-type": "application/json", **({"Stripe-Signature": signature} if signature else {})}
    reply = await http.post("/webhooks/stripe", content=body, headers=headers)
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3
    assert reply.json()["message"]
    assert (await http.get("/admin/api/invoices/in_rejected01")).status_code == 404


async def test_invoices_since_pages_through_stripe_and_stamps_each_page_when_asked(
    stripe_client: stripe.StripeClient, store: Storage
) -> None:
    """Reconcile judges what a page says as of when it was asked for, not when each invoice
    is applied: an event that arrives in between must still count as newer."""
    since = datetime.now(UTC) - timedelta(seconds=1)
    customer, method = await customer_with_card(stripe_client)
    new = validation.new_invoice([("a", 500)], customer, method, currency="eur")
    stripe = payments.StripePayments(stripe_client)
    creator = InvoiceCreator(store, store, stripe, Timing(lease_s=40))
    created = [(await creator.create(new, uuid.uuid4().hex))["id"] for _ in range(3)]
    asked_before = int(time.time()) - 1  # the stamp is the second before the request
    seen: list[tuple[str, int]] = []
    async for invoice, asked_at in stripe.invoices_since(since, page_size=2):
        seen.append((invoice["id"], asked_at))
        await asyncio.sleep(0.6)  # slow applying: the stamps must not move with it
    ours = [(key, at) for key, at in seen if key in created]
    assert [key for key, _ in ours] == created[::-1]
    first_page = {at for _, at in seen[:2]}
    assert len(first_page) == 1, seen
    assert seen[2][1] > seen[0][1], seen  # the second page was asked for after 1.2 s of applying
    assert asked_before <= min(at for _, at in seen) <= asked_before + 3, seen  # slack for a stalled machine


async def test_reconcile_brings_a_store_that_missed_every_webhook_to_stripes_state(
    database: str, localstripe: str, stripe_client: stripe.StripeClient, store: Storage
) -> None:
    """A database that received no webhook at all: reconcile creates the records, with the
    money given back by a dashboard's credit note and by a refund made without one (whose
    payment intent only Stripe's invoice payments link to the invoice), each once; a
    second run changes nothing."""
    since = datetime.now(UTC) - timedelta(seconds=5)
    creator = InvoiceCreator(store, store, payments.StripePayments(stripe_client), Timing(lease_s=40))
    customer, method = await customer_with_card(stripe_client)
    new = validation.new_invoice([("a", 1200), ("b", 34)], customer, method, currency="eur")
    created = [await creator.create(new, uuid.uuid4().hex) for _ in range(2)]
    refund: Any = {"invoice": created[0]["id"], "amount": 500, "refund_amount": 500}
    await stripe_client.v1.credit_notes.create_async(refund)
    (paid_by,) = await intents_of(stripe_client, created[1]["id"])
    await stripe_client.v1.refunds.create_async({"payment_intent": paid_by, "amount": 300})
    settings = Settings(
        database_url=SecretStr(database), stripe_api_key=SecretStr(LOCALSTRIPE_KEY), stripe_api_base=localstripe
    )

    first = await reconcile(settings, since)
    assert first["created"] >= 2
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1)
    try:
        store = Storage(pool)
        for invoice, given_back in zip(created, ((500, 500), (0, 300)), strict=True):
            record = await store.get_invoice(invoice["id"])
            assert (record.status, record.amount, record.user.id) == ("paid", 1234, customer)
            assert (record.amount_credited, record.amount_refunded) == given_back
    finally:
        await pool.close()
    assert first["notes_created"] >= 1 and first["refunds_created"] >= 2  # the note's refund and the other
    second = await reconcile(settings, since)
    assert set(second) == {"unchanged", "notes_unchanged", "refunds_unchanged"}
    assert sum(second.values()) == sum(first.values())
