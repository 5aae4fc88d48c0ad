"""The Stripe emulator (the tools/localstripe package), driven with the stripe SDK the way
the service drives real Stripe: a draft invoice, its items attached by id, finalize, pay,
every call with an idempotency key. Checks what the package adds to localstripe: exact
lines, replays, Stripe-shaped declines, the new routes, and signed webhooks."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import re
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import stripe
from aiohttp import web

from service.config import default
from tests.helpers import intents_of
from tools.customers import DECLINED_ON_CHARGE, DEMO_FILE, Demo, customer_with_card, prepare_demo
from tools.localstripe import app, version
from tools.localstripe.invoice_items import MAX_LINES_PER_INVOICE
from tools.localstripe.invoice_lifecycle import MINIMUM_CHARGE
from tools.localstripe.invoices import MAX_LINES_PER_ADD
from tools.stack import free_port, start_localstripe

API_KEY = "sk_test_launcher"
WEBHOOK_SECRET = "whsec_launcher_tests"
DECLINED = "4000000000000002"  # Stripe's generic decline: refused already when attached
ITEMS = [("All resources", 3300), ("Support", 700)]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The launcher as its own process, the way tools/stack.py starts it; separate from
    the session's emulator so that no other test's webhooks reach these receivers."""
    port = free_port()
    with (tmp_path_factory.mktemp("localstripe") / "launcher.log").open("w") as log:
        part = start_localstripe(port, fresh=True, log=log)
        yield f"http://127.0.0.1:{port}"
        part.stop()


@pytest.fixture
async def client(emulator: str) -> AsyncIterator[stripe.StripeClient]:
    """A client per test: its httpx pool belongs to the test's event loop."""
    http = stripe.HTTPXClient(timeout=10)
    yield stripe.StripeClient(API_KEY, base_addresses={"api": emulator}, http_client=http, max_network_retries=0)
    close: Callable[[], Awaitable[None]] = http.close_async  # untyped in the SDK
    await close()


def key(label: str = "") -> stripe.RequestOptions:
    return {"idempotency_key": f"{uuid.uuid4().hex}:{label}"}


def draft_params(customer: str, method: str, **extra: Any) -> Any:
    """Step 1 of the service's create: exactly what it sends to real Stripe."""
    return {
        "customer": customer,
        "currency": "eur",
        "collection_method": "charge_automatically",
        "auto_advance": False,
        "default_payment_method": method,
        "pending_invoice_items_behavior": "exclude",
        "description": "Launcher test",
        "metadata": {"invoice_service_user_id": "u-42", "invoice_service_user_name": "Ada"},
        **extra,
    }


async def draft_with_items(
    client: stripe.StripeClient, customer: str, method: str, items: list[tuple[str, int]] = ITEMS
) -> str:
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    for name, amount in items:
        await client.v1.invoice_items.create_async(
            {"customer": customer, "invoice": draft.id, "amount": amount, "currency": "eur", "description": name},
            key("item"),
        )
    return draft.id


async def open_invoice(client: stripe.StripeClient, customer: str, method: str) -> str:
    invoice_id = await draft_with_items(client, customer, method)
    await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, key("finalize"))
    return invoice_id


def lines(invoice: stripe.Invoice) -> list[tuple[str | None, int]]:
    return [(line.description, line.amount) for line in invoice.lines.data]


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


async def test_a_retried_step_replays_its_response_and_creates_nothing(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    create, item, finalize, pay = key("invoice"), key("item"), key("finalize"), key("pay")
    first = await client.v1.invoices.create_async(draft_params(customer, method), create)
    again = await client.v1.invoices.create_async(draft_params(customer, method), create)
    assert first.id is not None and again.id == first.id
    assert again.last_response is not None and again.last_response.headers.get("Idempotent-Replayed") == "true"

    params: Any = {"customer": customer, "invoice": first.id, "amount": 1234, "currency": "eur", "description": "x"}
    item_ids = {(await client.v1.invoice_items.create_async(params, item)).id for _ in range(3)}
    assert len(item_ids) == 1

    finalized = [await client.v1.invoices.finalize_invoice_async(first.id, {"auto_advance": False}, finalize)]
    finalized.append(await client.v1.invoices.finalize_invoice_async(first.id, {"auto_advance": False}, finalize))
    assert [f.status for f in finalized] == ["open", "open"]  # not "already finalized"

    paid = [await client.v1.invoices.pay_async(first.id, {"payment_method": method}, pay) for _ in range(2)]
    assert [p.status for p in paid] == ["paid", "paid"]  # not "already paid"
    assert len(await intents_of(client, first.id)) == 1  # one charge

    invoice = await client.v1.invoices.retrieve_async(first.id)
    assert (lines(invoice), invoice.total, invoice.attempt_count) == ([("x", 1234)], 1234, 1)
    listed = await client.v1.invoices.list_async({"customer": customer})
    assert [i.id for i in listed.data] == [first.id]


async def test_a_key_reused_with_other_parameters_is_an_idempotency_error(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    options = key("invoice")
    await client.v1.invoices.create_async(draft_params(customer, method), options)
    with pytest.raises(stripe.IdempotencyError) as other_params:
        await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), options)
    assert other_params.value.http_status == 400
    assert "same parameters" in str(other_params.value.user_message)
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.customers.create_async({"name": "Other"}, options)
    assert len((await client.v1.invoices.list_async({"customer": customer})).data) == 1


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


async def test_payment_methods_must_belong_to_the_customer(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    _, strangers = await customer_with_card(client)
    with pytest.raises(stripe.InvalidRequestError) as at_create:
        await client.v1.invoices.create_async(draft_params(customer, strangers), key("invoice"))
    assert at_create.value.param == "default_payment_method"
    invoice_id = await open_invoice(client, customer, method)
    with pytest.raises(stripe.InvalidRequestError) as at_pay:
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": strangers}, key("pay"))
    assert at_pay.value.param == "payment_method"
    paid = await client.v1.invoices.pay_async(invoice_id, options=key("pay"))  # the invoice's default_payment_method
    assert (paid.status, paid.amount_paid) == ("paid", 4000)


async def test_finalizing_a_zero_total_invoice_settles_it(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    empty = await draft_with_items(client, customer, method, [])
    finalized = await client.v1.invoices.finalize_invoice_async(empty, {"auto_advance": False}, key("finalize"))
    assert (finalized.status, finalized.total, finalized.amount_paid) == ("paid", 0, 0)
    with pytest.raises(stripe.InvalidRequestError, match="already paid"):
        await client.v1.invoices.pay_async(empty, {"payment_method": method}, key("pay"))


async def test_a_declined_charge_is_a_card_error_and_the_invoice_stays_open(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client, DECLINED_ON_CHARGE)
    invoice_id = await open_invoice(client, customer, method)
    pay = key("pay")
    with pytest.raises(stripe.CardError) as declined:
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, pay)
    assert (declined.value.http_status, declined.value.code) == (402, "card_declined")
    body = declined.value.json_body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "card_error"
    assert body["error"]["decline_code"] == "generic_decline"
    assert body["error"]["message"] == "Your card was declined."
    assert body["error"]["charge"].startswith("ch_")

    invoice = await client.v1.invoices.retrieve_async(invoice_id)
    assert (invoice.status, invoice.amount_paid, invoice.amount_due, invoice.attempt_count) == ("open", 0, 4000, 1)

    with pytest.raises(stripe.CardError) as replayed:  # the same key: the same answer, no second charge
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, pay)
    assert replayed.value.json_body == body
    assert (await client.v1.invoices.retrieve_async(invoice_id)).attempt_count == 1


async def test_the_demo_customer_of_make_run_pays_with_one_card_and_is_declined_with_the_other(
    emulator: str, client: stripe.StripeClient, tmp_path: Path
) -> None:
    """What the README's quick start relies on: make run's demo file names a customer whose
    `card` pays and whose `declining_card` leaves the invoice open."""
    demo = await asyncio.to_thread(prepare_demo, emulator, API_KEY, tmp_path)
    assert json.loads((tmp_path / DEMO_FILE).read_text()) == dataclasses.asdict(demo)
    invoice_id = await open_invoice(client, demo.customer, demo.declining_card)
    with pytest.raises(stripe.CardError):
        await client.v1.invoices.pay_async(invoice_id, {"payment_method": demo.declining_card}, key("pay"))
    assert (await client.v1.invoices.retrieve_async(invoice_id)).status == "open"
    paid = await client.v1.invoices.pay_async(invoice_id, {"payment_method": demo.card}, key("pay"))
    assert (paid.status, paid.amount_paid) == ("paid", 4000)


def test_the_readmes_quick_start_reads_every_id_make_run_writes() -> None:
    """The quick start is typed as printed: it must name the file make run writes, and each
    field of it (a renamed field would leave a shell variable empty and the Create a 400)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    demo_file = re.escape(f"{default('data_dir')}/{DEMO_FILE}")
    read = re.findall(r"jq -r \.(\w+) " + demo_file, readme)
    assert sorted(read) == sorted(f.name for f in dataclasses.fields(Demo))


async def test_the_generic_decline_card_is_refused_like_on_stripe(client: stripe.StripeClient) -> None:
    """Stripe refuses to attach 4000000000000002 to a customer (a card check), and an
    invoice can only be paid with the customer's own cards: the decline comes at attach."""
    customer = await client.v1.customers.create_async({"name": "Declined"})
    card: Any = {"number": DECLINED, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    method = await client.v1.payment_methods.create_async({"type": "card", "card": card})
    assert customer.id is not None and method.id is not None
    with pytest.raises(stripe.CardError) as declined:
        await client.v1.payment_methods.attach_async(method.id, {"customer": customer.id})
    assert (declined.value.http_status, declined.value.code) == (402, "card_declined")
    body = declined.value.json_body
    assert isinstance(body, dict) and body["error"]["decline_code"] == "generic_decline"
    assert body["error"]["type"] == "card_error"


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


class Receiver:
    """A webhook endpoint, as the service's sidecar would be."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[bytes, str]] = []
        self.hold: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if self.hold is not None:
            await self.hold.wait()
        self.deliveries.append((await request.read(), request.headers.get("Stripe-Signature", "")))
        return web.Response()

    def events(self, invoice_id: str) -> list[dict[str, Any]]:
        """Every delivery about `invoice_id`, each checked against the signing secret."""
        events = [
            stripe.Webhook.construct_event(payload.decode(), signature, WEBHOOK_SECRET).to_dict()
            for payload, signature in self.deliveries
        ]
        return [e for e in events if e["data"]["object"].get("id") == invoice_id]

    async def wait_for(self, invoice_id: str, done: Callable[[set[str]], bool]) -> dict[str, dict[str, Any]]:
        """The invoice as each event type carried it, once `done` accepts the types seen."""
        deadline = time.monotonic() + 15
        while True:
            events = self.events(invoice_id)
            if done({e["type"] for e in events}):
                for event in events:
                    assert event["object"] == "event" and event["id"].startswith("evt_")
                    assert isinstance(event["created"], int) and event["api_version"]
                    assert event["data"]["object"]["object"] == "invoice"
                assert len(events) == len({e["type"] for e in events}), "an event type arrived twice"
                return {e["type"]: e["data"]["object"] for e in events}
            if time.monotonic() > deadline:
                raise AssertionError(f"{invoice_id}: only {[e['type'] for e in events]}")
            await asyncio.sleep(0.1)


@pytest.fixture
async def receiver(emulator: str) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/webhooks/stripe", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/stripe"
    async with httpx.AsyncClient() as http:
        # One endpoint id for every test: registering again replaces the previous receiver.
        reply = await http.post(
            f"{emulator}/_config/webhooks/launcher-tests", data={"url": url, "secret": WEBHOOK_SECRET}
        )
        reply.raise_for_status()
    yield receiver
    if receiver.hold is not None:
        receiver.hold.set()  # a held delivery would keep the cleanup waiting forever
    await runner.cleanup()


async def test_webhooks_are_signed_stripe_events(client: stripe.StripeClient, receiver: Receiver) -> None:
    customer, method = await customer_with_card(client)
    paid_id = await open_invoice(client, customer, method)
    await client.v1.invoices.pay_async(paid_id, {"payment_method": method}, key("pay"))
    expected = {"invoice.created", "invoice.finalized", "invoice.payment_succeeded", "invoice.paid"}
    by_type = await receiver.wait_for(paid_id, lambda types: expected <= types)
    await asyncio.sleep(1.5)  # a stray or duplicate event would have arrived by now
    assert set(await receiver.wait_for(paid_id, lambda types: True)) == expected
    assert by_type["invoice.created"]["status"] == "draft"
    assert by_type["invoice.created"]["currency"] == "eur"
    assert by_type["invoice.created"]["metadata"]["invoice_service_user_id"] == "u-42"
    assert (by_type["invoice.finalized"]["status"], by_type["invoice.finalized"]["total"]) == ("open", 4000)
    assert by_type["invoice.finalized"]["invoice_pdf"]
    assert by_type["invoice.payment_succeeded"]["status"] == by_type["invoice.paid"]["status"] == "paid"

    bad_customer, bad_method = await customer_with_card(client, DECLINED_ON_CHARGE)
    failed_id = await open_invoice(client, bad_customer, bad_method)
    with pytest.raises(stripe.CardError):
        await client.v1.invoices.pay_async(failed_id, {"payment_method": bad_method}, key("pay"))
    await client.v1.invoices.mark_uncollectible_async(failed_id, options=key("uncollectible"))
    await client.v1.invoices.void_invoice_async(failed_id, options=key("void"))
    wanted = {"invoice.payment_failed", "invoice.marked_uncollectible", "invoice.voided"}
    by_type = await receiver.wait_for(failed_id, lambda types: wanted <= types)
    assert "invoice.paid" not in by_type and "invoice.payment_succeeded" not in by_type
    assert by_type["invoice.payment_failed"]["status"] == "open"
    assert by_type["invoice.marked_uncollectible"]["status"] == "uncollectible"
    assert by_type["invoice.voided"]["status"] == "void"


# --- add_lines ---------------------------------------------------------------------------


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


# --- customer balance and minimum charge at finalization -------------------------------


async def balance_of(client: stripe.StripeClient, customer: str) -> int | None:
    return (await client.v1.customers.retrieve_async(customer)).balance


async def test_customer_credit_is_applied_when_finalizing(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    assert (await client.v1.customers.update_async(customer, {"balance": -1000})).balance == -1000
    invoice_id = await draft_with_items(client, customer, method)  # 4000
    draft = await client.v1.invoices.retrieve_async(invoice_id)
    assert (draft.total, draft.starting_balance, draft.amount_due, draft.ending_balance) == (4000, -1000, 3000, None)

    finalized = await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, key("finalize"))
    assert (finalized.status, finalized.total, finalized.starting_balance) == ("open", 4000, -1000)
    assert (finalized.amount_due, finalized.ending_balance, await balance_of(client, customer)) == (3000, 0, 0)
    paid = await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, key("pay"))
    assert (paid.status, paid.amount_paid, paid.amount_remaining) == ("paid", 3000, 0)

    # More credit than the invoice: paid when finalized, nothing charged, the rest kept.
    await client.v1.customers.update_async(customer, {"balance": -5000})
    covered_id = await draft_with_items(client, customer, method)
    covered = await client.v1.invoices.finalize_invoice_async(covered_id, {"auto_advance": False}, key("finalize"))
    assert (covered.status, covered.total, covered.amount_due, covered.amount_paid, covered.amount_remaining) == (
        "paid",
        4000,
        0,
        0,
        0,
    )
    assert (covered.starting_balance, covered.ending_balance) == (-5000, -1000)
    assert await intents_of(client, covered.id) == []
    assert await balance_of(client, customer) == -1000

    created = await client.v1.customers.create_async({"name": "In credit", "balance": -700})
    assert created.balance == -700
    with pytest.raises(stripe.InvalidRequestError) as bad:
        await client.v1.customers.update_async(customer, cast(Any, {"balance": "lots"}))
    assert (bad.value.http_status, bad.value.param) == (400, "balance")


async def test_an_amount_due_below_the_minimum_charge_is_carried_to_the_next_invoice(
    client: stripe.StripeClient,
) -> None:
    customer, method = await customer_with_card(client)
    small_id = await draft_with_items(client, customer, method, [("Tiny", MINIMUM_CHARGE["eur"] - 20)])
    small = await client.v1.invoices.finalize_invoice_async(small_id, {"auto_advance": False}, key("finalize"))
    assert (small.status, small.total, small.amount_due, small.amount_paid, small.amount_remaining) == (
        "paid",
        30,
        0,
        0,
        0,
    )
    assert (small.starting_balance, small.ending_balance, await intents_of(client, small_id)) == (0, 30, [])
    assert await balance_of(client, customer) == 30

    next_id = await draft_with_items(client, customer, method, [("Next", 100)])
    assert (await client.v1.invoices.retrieve_async(next_id)).amount_due == 130
    paid = await client.v1.invoices.pay_async(next_id, {"payment_method": method}, key("pay"))  # finalizes
    assert (paid.status, paid.total, paid.starting_balance, paid.amount_due, paid.amount_paid) == (
        "paid",
        100,
        30,
        130,
        130,
    )
    assert (paid.ending_balance, await balance_of(client, customer)) == (0, 0)

    # /pay of a draft finalizes it the same way: no charge for 0.49 EUR.
    tiny_id = await draft_with_items(client, customer, method, [("Tiny", 49)])
    tiny = await client.v1.invoices.pay_async(tiny_id, {"payment_method": method}, key("pay"))
    assert (tiny.status, tiny.amount_due, tiny.amount_paid, await intents_of(client, tiny_id)) == ("paid", 0, 0, [])
    assert await balance_of(client, customer) == 49


async def test_a_balance_applies_only_to_invoices_in_its_currency(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    await client.v1.customers.update_async(customer, {"balance": -1000})
    first = await draft_with_items(client, customer, method)  # eur, 4000: fixes the customer's currency
    await client.v1.invoices.finalize_invoice_async(first, {"auto_advance": False}, key("finalize"))
    assert (await client.v1.customers.retrieve_async(customer)).currency == "eur"
    await client.v1.customers.update_async(customer, {"balance": -1000})  # eur credit again

    dollars = await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), key("invoice"))
    assert dollars.id is not None
    await client.v1.invoices.add_lines_async(dollars.id, {"lines": [{"amount": 4000}]}, key("add_lines"))
    assert (await client.v1.invoices.retrieve_async(dollars.id)).amount_due == 4000
    paid = await client.v1.invoices.pay_async(dollars.id, {"payment_method": method}, key("pay"))
    assert (paid.status, paid.starting_balance, paid.amount_due, paid.amount_paid) == ("paid", 0, 4000, 4000)
    assert (paid.ending_balance, await balance_of(client, customer)) == (0, -1000)

    # An amount under the minimum charge is carried in its own currency, for its invoices.
    tiny = await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), key("invoice"))
    assert tiny.id is not None
    await client.v1.invoices.add_lines_async(tiny.id, {"lines": [{"amount": 30}]}, key("add_lines"))
    carried = await client.v1.invoices.finalize_invoice_async(tiny.id, {"auto_advance": False}, key("finalize"))
    assert (carried.status, carried.ending_balance, await balance_of(client, customer)) == ("paid", 30, -1000)
    euros = await draft_with_items(client, customer, method)
    assert (await client.v1.invoices.retrieve_async(euros)).amount_due == 3000  # eur credit only
    more = await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), key("invoice"))
    assert more.id is not None
    await client.v1.invoices.add_lines_async(more.id, {"lines": [{"amount": 100}]}, key("add_lines"))
    assert (await client.v1.invoices.retrieve_async(more.id)).amount_due == 130  # usd 0.30 carried


@pytest.mark.parametrize(
    ("currency", "amount", "status"),
    [("gbp", 40, "open"), ("gbp", 29, "paid"), ("jpy", 49, "paid"), ("jpy", 50, "open"), ("xts", 49, "paid")],
)
async def test_the_minimum_charge_is_the_currencys(
    client: stripe.StripeClient, currency: str, amount: int, status: str
) -> None:
    customer, method = await customer_with_card(client)
    draft = await client.v1.invoices.create_async(draft_params(customer, method, currency=currency), key("invoice"))
    assert draft.id is not None
    await client.v1.invoices.add_lines_async(draft.id, {"lines": [{"amount": amount}]}, key("add_lines"))
    finalized = await client.v1.invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, key("finalize"))
    assert (finalized.currency, finalized.status) == (currency, status)
    assert finalized.amount_due == (amount if status == "open" else 0)


async def test_paying_a_paid_or_void_invoice_is_stripes_400(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    paid_id = await open_invoice(client, customer, method)
    await client.v1.invoices.pay_async(paid_id, {"payment_method": method}, key("pay"))
    void_id = await open_invoice(client, customer, method)
    await client.v1.invoices.void_invoice_async(void_id, options=key("void"))
    for invoice_id, message in ((paid_id, "Invoice is already paid"), (void_id, "Voided invoices cannot be paid.")):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await client.v1.invoices.pay_async(invoice_id, {"payment_method": method}, key("pay"))
        body = refused.value.json_body
        assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
        # Stripe's error codes have none for these: its answers carry only the message.
        assert (refused.value.http_status, refused.value.code, refused.value.user_message) == (400, None, message)
    assert (await client.v1.invoices.retrieve_async(paid_id)).attempt_count == 1


# --- idempotency as Stripe keeps it, and the test hooks ---------------------------------


@pytest.fixture
async def config(emulator: str) -> AsyncIterator[httpx.AsyncClient]:
    """The emulator's /_config/ test hooks; faults left set are cleared after the test."""
    async with httpx.AsyncClient(base_url=f"{emulator}/_config") as http:
        yield http
        (await http.delete("/faults")).raise_for_status()


def replayed(error: stripe.StripeError) -> bool:
    return {name.lower(): value for name, value in (error.headers or {}).items()}.get("idempotent-replayed") == "true"


async def test_a_500_before_running_is_saved_under_its_key(
    client: stripe.StripeClient, config: httpx.AsyncClient
) -> None:
    customer, method = await customer_with_card(client)
    fault = {"path": "^/v1/invoices$", "method": "POST", "count": 1, "when": "before"}
    reply = await config.post("/faults", json=fault)
    assert (reply.status_code, reply.json()) == (200, {"faults": [fault]})
    options = key("invoice")
    with pytest.raises(stripe.APIError) as failed:
        await client.v1.invoices.create_async(draft_params(customer, method), options)
    body = failed.value.json_body
    assert failed.value.http_status == 500 and isinstance(body, dict) and body["error"]["type"] == "api_error"
    assert not replayed(failed.value)
    with pytest.raises(stripe.APIError) as again:  # the fault is used up: this is Stripe's replay
        await client.v1.invoices.create_async(draft_params(customer, method), options)
    assert replayed(again.value) and again.value.json_body == body
    assert (await client.v1.invoices.list_async({"customer": customer})).data == []

    created = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert [i.id for i in (await client.v1.invoices.list_async({"customer": customer})).data] == [created.id]


async def test_a_500_after_running_is_saved_and_forgetting_keys_runs_the_call_again(
    client: stripe.StripeClient, config: httpx.AsyncClient
) -> None:
    customer, method = await customer_with_card(client)
    invoice_id = await draft_with_items(client, customer, method)
    fault = {"path": r"^/v1/invoices/in_\w+/finalize$", "when": "after"}  # any method, once
    assert (await config.post("/faults", json=fault)).json() == {
        "faults": [{"path": fault["path"], "method": None, "count": 1, "when": "after"}]
    }
    options = key("finalize")
    for attempt in range(2):
        with pytest.raises(stripe.APIError) as failed:
            await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, options)
        assert failed.value.http_status == 500 and replayed(failed.value) == (attempt == 1)
    assert (await client.v1.invoices.retrieve_async(invoice_id)).status == "open"  # it did run

    forgotten = (await config.post("/idempotency/forget")).json()
    assert isinstance(forgotten["forgotten"], int) and forgotten["forgotten"] >= 1
    with pytest.raises(stripe.InvalidRequestError, match="already finalized"):  # runs anew
        await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, options)
    assert (await config.post("/idempotency/forget")).json() == {"forgotten": 1}  # that refusal: it ran, and is saved


async def test_validation_errors_are_not_saved_under_their_key(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    options = key("invoice")
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.invoices.create_async(draft_params(customer, method, days_until_due=3), options)
    created = await client.v1.invoices.create_async(draft_params(customer, method), options)
    assert created.status == "draft"
    assert created.last_response is not None and created.last_response.headers.get("Idempotent-Replayed") is None


async def test_a_refusal_of_a_request_that_ran_is_saved_and_replayed(client: stripe.StripeClient) -> None:
    """Stripe saves the answer of every request whose execution began, its refusals too:
    once the cause is fixed, the same key still answers the refusal, for 24 hours."""
    customer, _ = await customer_with_card(client)
    card: Any = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    loose = await client.v1.payment_methods.create_async({"type": "card", "card": card})  # not attached
    assert loose.id is not None
    options, params = key("invoice"), draft_params(customer, loose.id)
    for attempt in range(2):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await client.v1.invoices.create_async(params, options)
        assert (refused.value.param, replayed(refused.value)) == ("default_payment_method", attempt == 1)
    await client.v1.payment_methods.attach_async(loose.id, {"customer": customer})
    with pytest.raises(stripe.InvalidRequestError) as stale:
        await client.v1.invoices.create_async(params, options)
    assert replayed(stale.value)
    with pytest.raises(stripe.InvalidRequestError) as missing:  # a missing object: it ran, and is saved
        await client.v1.invoices.pay_async("in_doesnotexist", {}, options := key("pay"))
    assert missing.value.http_status == 404 and not replayed(missing.value)
    with pytest.raises(stripe.InvalidRequestError) as again:
        await client.v1.invoices.pay_async("in_doesnotexist", {}, options)
    assert replayed(again.value)
    assert (await client.v1.invoices.list_async({"customer": customer})).data == []
    assert (await client.v1.invoices.create_async(params, key("invoice"))).status == "draft"


async def test_faults_are_cleared_and_checked(client: stripe.StripeClient, config: httpx.AsyncClient) -> None:
    bad_faults: list[Any] = [{"path": "("}, {"path": "^/v1/", "when": "during"}, {"path": "^/v1/", "count": 0}, []]
    for bad in bad_faults:
        reply = await config.post("/faults", json=bad)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    await config.post("/faults", json={"path": "^/v1/customers$", "count": 5})
    assert (await config.delete("/faults")).json() == {"cleared": 1}
    assert (await client.v1.customers.create_async({"name": "No fault"})).id


async def test_calls_are_counted_by_route(
    client: stripe.StripeClient, config: httpx.AsyncClient, emulator: str
) -> None:
    customer, method = await customer_with_card(client)
    assert (await config.delete("/calls")).json() == {"calls": {}}
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    await client.v1.invoices.add_lines_async(draft.id, {"lines": [{"amount": 100}]}, key("add_lines"))
    finalize = key("finalize")
    for _ in range(2):  # the second is a replay
        await client.v1.invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, finalize)
    await client.v1.invoices.retrieve_async(draft.id)
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.invoices.retrieve_async("in_doesnotexist")
    async with httpx.AsyncClient() as http:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        assert (await http.get(f"{emulator}/v1/nothing_here/cus_123", headers=headers)).status_code == 404
    assert (await config.get("/calls")).json() == {
        "calls": {
            "GET /v1/invoices/{id}": 2,
            "GET /v1/nothing_here/{id}": 1,
            "POST /v1/invoices": 1,
            "POST /v1/invoices/{id}/add_lines": 1,
            "POST /v1/invoices/{id}/finalize": 2,
        }
    }
    await config.delete("/calls")
    assert (await config.get("/calls")).json() == {"calls": {}}


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


async def test_deliveries_are_counted_until_every_receiver_answered(
    client: stripe.StripeClient, config: httpx.AsyncClient, receiver: Receiver
) -> None:
    customer, method = await customer_with_card(client)
    await until_no_delivery(config)
    receiver.hold = asyncio.Event()  # the receiver answers nothing until released
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    assert (await config.get("/deliveries")).json()["in_flight"] >= 1, "counted before the call answers"
    await asyncio.sleep(1.5)  # past localstripe's one-second delay: now at the held receiver
    assert (await config.get("/deliveries")).json()["in_flight"] >= 1
    receiver.hold.set()
    await until_no_delivery(config)
    assert "invoice.created" in {e["type"] for e in receiver.events(draft.id)}


async def until_no_delivery(config: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 15
    while (await config.get("/deliveries")).json()["in_flight"]:
        assert time.monotonic() < deadline, "deliveries never done"
        await asyncio.sleep(0.1)


async def test_add_lines_and_a_settled_finalization_send_stripes_webhooks(
    client: stripe.StripeClient, receiver: Receiver
) -> None:
    customer, method = await customer_with_card(client)
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    await client.v1.invoices.add_lines_async(
        draft.id, {"lines": [{"amount": 20, "description": "Tiny"}]}, key("add_lines")
    )
    updated = await receiver.wait_for(draft.id, lambda types: "invoice.updated" in types)
    assert [line["description"] for line in updated["invoice.updated"]["lines"]["data"]] == ["Tiny"]

    await client.v1.invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, key("finalize"))
    expected = {"invoice.created", "invoice.updated", "invoice.finalized", "invoice.payment_succeeded", "invoice.paid"}
    by_type = await receiver.wait_for(draft.id, lambda types: expected <= types)
    assert (by_type["invoice.paid"]["status"], by_type["invoice.paid"]["amount_paid"]) == ("paid", 0)
    assert by_type["invoice.paid"]["ending_balance"] == 20


async def test_a_crash_is_stripes_500_and_saved_under_its_key(client: stripe.StripeClient, emulator: str) -> None:
    customer, _ = await customer_with_card(client)
    # Stock localstripe crashes on this (AttributeError): the emulator answers as Stripe
    # does when it fails internally, and replays that answer for the key.
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": key("crash")["idempotency_key"] or ""}
    async with httpx.AsyncClient() as http:
        answers = [
            await http.post(f"{emulator}/v1/customers/{customer}", data={"invoice_settings": "x"}, headers=headers)
            for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [500, 500]
    assert answers[0].json()["error"]["type"] == "api_error"
    assert [a.headers.get("Idempotent-Replayed") for a in answers] == [None, "true"]


def test_the_pinned_version_is_the_one_pyproject_installs() -> None:
    with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as file:
        dev = tomllib.load(file)["project"]["optional-dependencies"]["dev"]
    assert [d for d in dev if d.startswith("localstripe")] == [f"localstripe=={version.PINNED}"]
    version.check()  # and it is the one installed


@pytest.mark.parametrize("installed", ["1.15.11", "1.16.0", "2.0.0"])
def test_the_guard_refuses_any_other_localstripe_naming_both_versions(
    monkeypatch: pytest.MonkeyPatch, installed: str
) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed if name == "localstripe" else real(name))
    for guarded in (version.check, app.install):
        with pytest.raises(RuntimeError) as refused:
            guarded()
        assert f"localstripe {version.PINNED}" in str(refused.value)
        assert f"localstripe {installed} is installed" in str(refused.value)


def test_the_guard_refuses_a_missing_localstripe_naming_the_pinned_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(RuntimeError, match=rf"localstripe {version.PINNED}, which is not installed"):
        version.check()
