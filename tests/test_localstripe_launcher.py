"""The Stripe emulator (tools/localstripe_launcher.py), driven with the stripe SDK the way
the service drives real Stripe: a draft invoice, its items attached by id, finalize, pay,
every call with an idempotency key. Checks what the launcher adds to localstripe: exact
lines, replays, Stripe-shaped declines, the new routes, and signed webhooks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import stripe
from aiohttp import web

from tools.stack import customer_with_card, free_port, start_localstripe

API_KEY = "sk_test_launcher"
WEBHOOK_SECRET = "whsec_launcher_tests"
DECLINED_ON_CHARGE = "4000000000000341"  # attaches, then every charge is declined
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
    assert paid[0]["payment_intent"] == paid[1]["payment_intent"]  # one charge (not in the SDK's newer types)

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

    async def handle(self, request: web.Request) -> web.Response:
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
