"""Records that match Stripe, through the real Envoy and sidecar: every invoice Stripe can
produce (credits, large totals, zero-decimal currencies) recorded exactly with its
currency and Stripe's own creation time; events of both the seed's 2023 shape and today's;
the other mode ignored; a signed event the service cannot record taken as `rejected`, never
a 5xx; same-second events ordered by the invoice's progress; and the seed's Get and deep
numbered pages."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from pydantic import SecretStr, ValidationError

from service import stripe_objects
from service.app import webhook_secrets
from service.config import Settings
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.reconcile import reconcile_from
from service.storage import Storage
from tests.helpers import AUTH, Stack, deliver, poll_until

FIXTURES = Path(__file__).parent / "fixtures"


def invoice_object(invoice_id: str, *, status: str = "paid", total: int = 5000, **fields: Any) -> dict[str, Any]:
    """A Stripe invoice in today's shape (API 2026-10-28, as Stripe's published fixtures
    show it: no `paid`, `charge` or `payment_intent`, lines under a list object, a `parent`)."""
    created = fields.pop("created", int(time.time()) - 30)
    obj: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "DE",
        "amount_due": max(total, 0),
        "amount_overpaid": 0,
        "amount_paid": max(total, 0) if status == "paid" else 0,
        "amount_remaining": 0 if status == "paid" else max(total, 0),
        "attempt_count": 1 if status == "paid" else 0,
        "auto_advance": False,
        "billing_reason": "manual",
        "collection_method": "charge_automatically",
        "created": created,
        "currency": "eur",
        "customer": "cus_QXg1o8vcGmoR32",
        "customer_name": "Grace",
        "hosted_invoice_url": None if status == "draft" else f"https://invoice.stripe.com/i/{invoice_id}",
        "invoice_pdf": None if status == "draft" else f"https://pay.stripe.com/invoice/{invoice_id}/pdf",
        "lines": {"data": [], "has_more": False, "object": "list", "url": f"/v1/invoices/{invoice_id}/lines"},
        "livemode": False,
        "metadata": {},
        "parent": None,
        "status": status,
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "subtotal": total,
        "total": total,
        "total_taxes": [],
    }
    return {**obj, **fields}


def event_of(obj: dict[str, Any], kind: str = "invoice.paid", created: int | None = None, **fields: Any) -> str:
    body = {
        "id": f"evt_{uuid.uuid4().hex[:20]}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
        "livemode": obj.get("livemode", False),
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }
    return json.dumps({**body, **fields})


async def test_credit_and_large_invoices_are_recorded_exactly(
    stack: Stack, http: httpx.AsyncClient, stack_store: Storage
) -> None:
    for invoice_id, total in (("in_credit0001", -1500), ("in_large00001", 3_000_000_000), ("in_zero000001", 0)):
        reply = await deliver(http, event_of(invoice_object(invoice_id, total=total)))
        assert (reply.status_code, reply.json()["outcome"]) == (200, "created"), reply.text
        record = (await http.get(f"/admin/api/invoices/{invoice_id}")).json()
        assert record["amount"] == total and isinstance(record["amount"], int), record
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        large = await pb_grpc.InvoiceServiceStub(channel).GetInvoice(
            pb.GetInvoiceRequest(id="in_large00001"), metadata=AUTH
        )
    assert (large.amount, large.amount_int32) == (3_000_000_000, 0)
    listed = (await http.get("/admin/api/invoices", params={"page": 1, "limit": 10})).json()
    assert sorted(i["amount"] for i in listed["invoices"]) == [-1500, 0, 3_000_000_000]


async def test_the_currency_is_on_the_record(http: httpx.AsyncClient, stack_store: Storage) -> None:
    await deliver(http, event_of(invoice_object("in_yen0000001", total=3300, currency="jpy")))
    await deliver(http, event_of(invoice_object("in_euro000001", total=3300)))
    listed = (await http.get("/admin/api/invoices", params={"page": 1, "limit": 10})).json()
    assert {(i["invoiceId"], i["amount"], i["currency"]) for i in listed["invoices"]} == {
        ("in_yen0000001", 3300, "jpy"),
        ("in_euro000001", 3300, "eur"),
    }


async def test_created_at_is_when_stripe_created_the_invoice(http: httpx.AsyncClient, stack_store: Storage) -> None:
    """An invoice heard of a week late (reconcile, a webhook retried for days) lists by
    Stripe's `created`, and the time filters catch it where it belongs."""
    week_ago = int((datetime.now(UTC) - timedelta(days=7)).timestamp())
    await deliver(http, event_of(invoice_object("in_weekold001", created=week_ago)))
    await deliver(http, event_of(invoice_object("in_fresh00001")))
    record = (await http.get("/admin/api/invoices/in_weekold001")).json()
    assert record["createdAt"] == datetime.fromtimestamp(week_ago, UTC).strftime("%Y-%m-%dT%H:%M:%S.001Z")
    listed = (await http.get("/admin/api/invoices", params={"page": 1, "limit": 10})).json()
    assert [i["invoiceId"] for i in listed["invoices"]] == ["in_fresh00001", "in_weekold001"]
    before = datetime.fromtimestamp(week_ago + 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = (await http.get("/admin/api/invoices", params={"createdBefore": before})).json()
    assert [i["invoiceId"] for i in old["invoices"]] == ["in_weekold001"]


async def test_events_of_the_seeds_2023_shape_and_of_todays_are_both_recorded(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    sample = json.loads((FIXTURES / "create-invoice.response.json").read_text())
    old = await deliver(http, event_of(sample, "invoice.created", api_version="2023-10-16"))
    assert (old.status_code, old.json()["outcome"]) == (200, "created"), old.text
    record = (await http.get(f"/admin/api/invoices/{sample['id']}")).json()
    assert (record["status"], record["amount"], record["currency"]) == ("draft", 0, "eur")
    assert record["createdAt"].startswith(datetime.fromtimestamp(sample["created"], UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    today = await deliver(http, event_of(invoice_object("in_1Pgc6tB7WZ01zgkWu9fdqL6I", total=1000, currency="usd")))
    assert (today.status_code, today.json()["outcome"]) == (200, "created"), today.text


async def test_events_of_the_other_mode_are_ignored(
    stack: Stack, http: httpx.AsyncClient, stack_store: Storage
) -> None:
    """The stack runs with a test-mode key: a live-mode event is acknowledged, not recorded."""
    reply = await deliver(http, event_of(invoice_object("in_livemode01", livemode=True)))
    assert (reply.status_code, reply.json()["outcome"]) == (200, "ignored")
    assert (await http.get("/admin/api/invoices/in_livemode01")).status_code == 404


@pytest.mark.parametrize("status", ["refunded", "partially_paid"])
async def test_a_signed_event_that_can_never_be_recorded_is_taken_as_rejected(
    stack: Stack, http: httpx.AsyncClient, stack_store: Storage, status: str
) -> None:
    """Stripe retries anything but a 2xx for three days; an invoice the service cannot
    read would fail every time, so it is taken (200 `rejected`) and logged at ERROR: this
    delivery's own line, found by its event id (other tests log rejected events too)."""
    payload = event_of(invoice_object("in_unknown001", status=status))
    event_id = json.loads(payload)["id"]
    reply = await deliver(http, payload)
    assert (reply.status_code, reply.json()["outcome"]) == (200, "rejected"), reply.text
    assert "status" in reply.json()["reason"]
    assert (await http.get("/admin/api/invoices/in_unknown001")).status_code == 404

    async def logged() -> list[dict[str, Any]] | None:
        lines = [json.loads(line) for line in stack.log.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event") == event_id] or None

    (line,) = await poll_until(logged, f"the sidecar's line for {event_id}", timeout_s=5)
    assert (line["level"], line["outcome"], line["status"]) == ("ERROR", "rejected", 200)
    assert "status" in line["reason"]


async def test_a_non_ascii_signature_is_400_json(http: httpx.AsyncClient) -> None:
    payload = event_of(invoice_object("in_nonascii01"))
    header = f"t={int(time.time())},v1=éé"
    # As bytes: httpx itself refuses a non-ASCII str header; a hostile sender does not.
    signature = {b"Stripe-Signature": header.encode()}
    reply = await http.post("/webhooks/stripe", content=payload.encode(), headers=signature)
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3
    assert "ASCII" in reply.json()["message"]


@pytest.mark.parametrize("total", [4000, -1500])
@pytest.mark.parametrize("order", ["created first", "updated first"])
async def test_within_one_second_a_drafts_total_only_grows(
    http: httpx.AsyncClient, stack_store: Storage, order: str, total: int
) -> None:
    """A draft's invoice.created (total 0) and the invoice.updated that carried its lines
    (a credit's are negative) often share Stripe's second; arrival order must not decide."""
    at = int(time.time()) - 5
    created = event_of(invoice_object("in_samesec001", status="draft", total=0), "invoice.created", at)
    updated = event_of(invoice_object("in_samesec001", status="draft", total=total), "invoice.updated", at)
    for payload in (created, updated) if order == "created first" else (updated, created):
        assert (await deliver(http, payload)).status_code == 200
    assert (await stack_store.get_invoice("in_samesec001")).amount == total


async def test_an_object_without_currency_or_created_keeps_the_records(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    at = int(time.time()) - 60
    first = invoice_object("in_partial001", status="open", currency="jpy", created=at - 3600)
    await deliver(http, event_of(first, "invoice.finalized", at))
    partial = {k: v for k, v in invoice_object("in_partial001").items() if k not in ("currency", "created")}
    assert (await deliver(http, event_of(partial, "invoice.paid", at + 5))).json()["outcome"] == "updated"
    record = (await http.get("/admin/api/invoices/in_partial001")).json()
    assert (record["status"], record["currency"]) == ("paid", "jpy")
    assert record["createdAt"].startswith(datetime.fromtimestamp(at - 3600, UTC).strftime("%Y-%m-%dT%H:%M:%S"))


@pytest.mark.parametrize(
    ("case", "fields"),
    [
        ("created past year 9999", {"created": 10**12}),
        ("created past any datetime", {"created": 10**20}),
        ("created of 2^62", {"created": 2**62}),
        ("no customer", {"customer": None}),
        ("a float total", {"total": 12.5}),
        ("metadata not a map", {"metadata": "x"}),
    ],
)
async def test_signed_events_stripe_never_sends_are_taken_as_rejected_not_a_5xx(
    http: httpx.AsyncClient, stack_store: Storage, case: str, fields: dict[str, Any]
) -> None:
    reply = await deliver(http, event_of(invoice_object("in_odd0000001", **fields)))
    assert (reply.status_code, reply.json()["outcome"]) == (200, "rejected"), (case, reply.text)


@pytest.mark.parametrize("case", ["nested 100,000 deep", "an event id of 600 KB"])
async def test_bodies_no_one_can_record_are_400_json(http: httpx.AsyncClient, case: str) -> None:
    if case.startswith("nested"):
        payload = "[" * 100_000 + "]" * 100_000
    else:
        payload = event_of(invoice_object("in_longid0001"), id="evt_" + "a" * 600_000)
    reply = await deliver(http, payload)
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == 3


async def test_an_amount_change_within_one_status_follows_stripes_time(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    at = int(time.time()) - 60
    draft = invoice_object("in_amounts001", status="draft", total=1000)
    await deliver(http, event_of(draft, "invoice.updated", at))
    newer = await deliver(http, event_of({**draft, "total": 2500, "subtotal": 2500}, "invoice.updated", at + 5))
    assert newer.json()["outcome"] == "updated"
    older = await deliver(http, event_of({**draft, "total": 9999, "subtotal": 9999}, "invoice.updated", at + 2))
    assert older.json()["outcome"] == "stale"
    assert (await stack_store.get_invoice("in_amounts001")).amount == 2500


async def test_the_seeds_get_with_page_and_limit_answers_the_record(
    http: httpx.AsyncClient, stack_store: Storage
) -> None:
    await deliver(http, event_of(invoice_object("in_seedsget01")))
    reply = await http.get("/admin/api/invoices/in_seedsget01", params={"page": 1, "limit": 5})
    assert (reply.status_code, reply.json()["invoiceId"]) == (200, "in_seedsget01")
    other = await http.get("/admin/api/invoices/in_seedsget01", params={"pages": 1})
    assert other.status_code == 400
    assert other.json()["code"] == 3


async def test_a_deep_numbered_page_is_refused_at_once_with_advice(http: httpx.AsyncClient) -> None:
    reply = await http.get("/admin/api/invoices", params={"page": 20_000, "limit": 20})
    assert reply.status_code == 400, reply.text  # a scan would have answered 200, an empty page
    assert reply.json()["message"].startswith("page:")
    assert "pageToken" in reply.json()["message"]
    assert (await http.get("/admin/api/invoices", params={"page": 501, "limit": 20})).status_code == 200


async def test_a_create_whose_total_stripe_would_refuse_is_invalid_argument(http: httpx.AsyncClient) -> None:
    items = [{"name": f"item {i}", "amount": 99_999_999} for i in range(2)]
    reply = await http.post("/admin/api/invoices", json={"items": items, "customer": "cus_x", "paymentMethod": "pm_x"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["message"].startswith("items:")


def test_a_live_key_and_a_test_mode_setting_are_refused_together() -> None:
    assert Settings(stripe_api_key=SecretStr("sk_live_x")).stripe_livemode is True
    assert Settings(stripe_mode="live").stripe_livemode is True
    assert Settings().stripe_livemode is False
    with pytest.raises(ValidationError, match="STRIPE_MODE"):
        Settings(stripe_api_key=SecretStr("sk_live_x"), stripe_mode="test")


def test_the_sidecar_refuses_to_guess_its_mode() -> None:
    """Without a key or STRIPE_MODE it would take live events for the other mode and drop
    them with a 200, which Stripe never retries."""
    secrets = (SecretStr("whsec_x"),)
    with pytest.raises(SystemExit, match="STRIPE_MODE"):
        webhook_secrets(Settings(stripe_webhook_secrets=secrets))
    assert webhook_secrets(Settings(stripe_webhook_secrets=secrets, stripe_mode="live")) == ["whsec_x"]


async def listed(*objects: tuple[dict[str, Any], int]) -> AsyncIterator[tuple[dict[str, Any], int]]:
    """A Stripe listing, as StripePayments.invoices_since yields it: objects with the time
    their page was asked for."""
    for obj, asked_at in objects:
        yield obj, asked_at


async def test_reconcile_carries_on_past_an_invoice_it_cannot_read(store: Storage) -> None:
    at = int(time.time()) - 1
    outcomes = await reconcile_from(
        listed(
            (invoice_object("in_newest0001"), at),
            (invoice_object("in_unknown002", status="refunded"), at),
            (invoice_object("in_oldest0001", total=-200), at),
        ),
        store,
    )
    assert outcomes == {"created": 2, "rejected": 1}
    assert (await store.get_invoice("in_oldest0001")).amount == -200


async def test_reconcile_moves_a_stale_record_forward(store: Storage) -> None:
    at = int(time.time()) - 600
    await store.apply_stripe_invoice(
        stripe_objects.invoice_from_stripe(invoice_object("in_stale00001", status="open")), stripe_time=at
    )
    outcomes = await reconcile_from(listed((invoice_object("in_stale00001"), at + 300)), store)
    assert outcomes == {"updated": 1}
    assert (await store.get_invoice("in_stale00001")).status == "paid"


async def test_a_webhook_between_stripes_list_answer_and_its_application_wins(store: Storage) -> None:
    """Reconcile listed the draft; before it is applied, the webhook of the lines (newer
    than the list's answer) lands. The listing's older state must not undo it."""
    asked_at = int(time.time()) - 10
    draft = invoice_object("in_between001", status="draft", total=0)
    lines_added = {**draft, "total": 4000, "subtotal": 4000}

    async def listing() -> AsyncIterator[tuple[dict[str, Any], int]]:
        await store.apply_stripe_invoice(
            stripe_objects.invoice_from_stripe(lines_added),
            stripe_time=asked_at + 3,
            event_id="evt_between",
            event_type="x",
        )
        yield draft, asked_at

    assert await reconcile_from(listing(), store) == {"stale": 1}
    assert (await store.get_invoice("in_between001")).amount == 4000


@pytest.mark.parametrize(
    ("command", "settings", "says"),
    [
        ("serve", {"database_url": SecretStr("postgresql://u@h/db")}, "ADMIN_API_KEYS"),
        ("webhooks", {}, "STRIPE_WEBHOOK_SECRETS"),
        ("reconcile", {}, "STRIPE_API_KEY"),
    ],
)
def test_each_command_names_what_it_cannot_run_without(command: Any, settings: dict[str, Any], says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        Settings(**settings).require(command)
    Settings(
        admin_api_keys=(SecretStr("k"),),
        stripe_webhook_secrets=(SecretStr("whsec_x"),),
        stripe_api_key=SecretStr("sk_test_x"),
        **settings,
    ).require(command)


def test_a_migration_dsn_without_the_service_dsn_is_refused() -> None:
    with pytest.raises(ValidationError, match="MIGRATION_DATABASE_URL"):
        Settings(migration_database_url=SecretStr("postgresql://owner@h/db"))
