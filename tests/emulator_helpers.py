"""What the emulator's test modules share (tests/test_localstripe_*.py): the launcher
as its own process, a stripe client per test, the draft parameters and steps the service
sends to real Stripe, the emulator's /_config/ test hooks, and a webhook endpoint that
checks each delivery's signature. No tests here: a module binds the fixtures it uses and,
the launcher being module-scoped, gets an emulator of its own."""

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

from tools.stack import free_port, start_localstripe

API_KEY = "sk_test_launcher"


WEBHOOK_SECRET = "whsec_launcher_tests"


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


@pytest.fixture
async def config(emulator: str) -> AsyncIterator[httpx.AsyncClient]:
    """The emulator's /_config/ test hooks; faults left set are cleared after the test."""
    async with httpx.AsyncClient(base_url=f"{emulator}/_config") as http:
        yield http
        (await http.delete("/faults")).raise_for_status()


def replayed(error: stripe.StripeError) -> bool:
    return {name.lower(): value for name, value in (error.headers or {}).items()}.get("idempotent-replayed") == "true"
