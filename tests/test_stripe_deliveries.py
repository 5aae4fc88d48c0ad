"""Deliveries as Stripe makes them: the emulator of this module sends its own events late
(up to LATE_S more, so events of one second and of neighbouring ones arrive in any order),
sends a share of them twice, and retries any non-2xx with Stripe's backoff
(tools/localstripe/webhooks.py, Disorder). Lifecycles whose final record depends on event
times within one status (a draft whose total grows line by line, the PDF link that appears
at finalization, an update after paid) and across statuses (paid, uncollectible then void,
a declined charge) are made at the emulator as the dashboard would, and through the
service's Create; once every delivery is done, each record must equal the emulator's
invoice field by field, and every event be recorded and applied once. The emulator, the
database and the stack are this module's own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import stripe

from chaos.records import records_against_stripe
from service import payments, storage
from service.app import SERVICE_ROLE
from tests.helpers import API_KEY, WEBHOOK_SECRET, poll_until, stack_env
from tools.customers import DECLINED_ON_CHARGE, customer_with_card
from tools.stack import LOCALSTRIPE_KEY, backend, free_port, register_webhook, start_localstripe, wait_until_routed

LATE_S = 3.0
DUPLICATES = 0.5


@dataclass
class Disorderly:
    emulator: str
    database: str  # the owner's DSN, for the checks
    base_url: str


@pytest.fixture(scope="module")
def disorderly(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Disorderly]:
    tmp = tmp_path_factory.mktemp("deliveries")
    port = free_port()
    with (tmp / "stack.log").open("w") as log:
        emulator = start_localstripe(port, fresh=True, log=log, webhook_retry_s=60, disorder=(LATE_S, DUPLICATES))
        try:
            database = asyncio.run(storage.fresh_database(postgres, "deliveries", grant_to=SERVICE_ROLE))
            url = f"http://127.0.0.1:{port}"
            with backend(stack_env(database, tmp, url), tmp, log=log) as running:
                base_url = f"http://127.0.0.1:{running.gateway_port}"
                wait_until_routed(base_url, API_KEY)
                register_webhook(port, f"{base_url}/webhooks/stripe", WEBHOOK_SECRET)
                yield Disorderly(url, database, base_url)
        finally:
            emulator.stop()


@pytest.fixture
async def client(disorderly: Disorderly) -> AsyncIterator[stripe.StripeClient]:
    yield payments.client(LOCALSTRIPE_KEY, api_base=disorderly.emulator, timeout_s=10, max_retries=0)


def key() -> Any:
    return {"idempotency_key": uuid.uuid4().hex}


async def _draft(client: stripe.StripeClient, customer: str, method: str) -> str:
    params: Any = {"customer": customer, "default_payment_method": method, "auto_advance": False}
    params |= {
        "collection_method": "charge_automatically",
        "currency": "eur",
        "pending_invoice_items_behavior": "exclude",
    }
    draft = await client.v1.invoices.create_async(params, key())
    assert draft.id is not None
    return draft.id


async def _grown_paid_then_updated(client: stripe.StripeClient) -> None:
    """A draft whose total grows by two lines, finalized (its PDF link appears), paid, and
    updated after paid: four changes of the record within a second or two."""
    customer, method = await customer_with_card(client)
    invoice = await _draft(client, customer, method)
    for amount in (1100, 2200):
        await client.v1.invoices.add_lines_async(invoice, {"lines": [{"amount": amount}]}, key())
    await client.v1.invoices.finalize_invoice_async(invoice, {"auto_advance": False}, key())
    await client.v1.invoices.pay_async(invoice, {"payment_method": method}, key())
    await client.v1.invoices.update_async(invoice, {"metadata": {"note": "after paid"}}, key())


async def _written_off_then_voided(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    invoice = await _draft(client, customer, method)
    await client.v1.invoices.add_lines_async(invoice, {"lines": [{"amount": 700}]}, key())
    await client.v1.invoices.finalize_invoice_async(invoice, {"auto_advance": False}, key())
    await client.v1.invoices.mark_uncollectible_async(invoice, options=key())
    await client.v1.invoices.void_invoice_async(invoice, options=key())


async def _declined(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client, DECLINED_ON_CHARGE)
    invoice = await _draft(client, customer, method)
    await client.v1.invoices.add_lines_async(invoice, {"lines": [{"amount": 900}]}, key())
    await client.v1.invoices.finalize_invoice_async(invoice, {"auto_advance": False}, key())
    with pytest.raises(stripe.CardError):
        await client.v1.invoices.pay_async(invoice, {"payment_method": method}, key())


async def _created_by_the_service(client: stripe.StripeClient, base_url: str) -> None:
    customer, method = await customer_with_card(client)
    async with httpx.AsyncClient(base_url=base_url, headers={"Api-Key": API_KEY}, timeout=30) as http:
        body = {"customer": customer, "paymentMethod": method, "items": [{"name": "Support", "amount": 4200}]}
        reply = await http.post("/admin/api/invoices", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert reply.status_code == 200, reply.text


async def _deliveries(emulator: str) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=emulator, timeout=5) as http:
        reply = await http.get("/_config/deliveries")
        reply.raise_for_status()
        counts: dict[str, int] = reply.json()
        return counts


async def _events(database: str) -> tuple[int, int]:
    """Events recorded, and the applications their applying transactions counted."""
    conn = await asyncpg.connect(database)
    try:
        row = await conn.fetchrow("SELECT count(*) AS n, coalesce(sum(applications), 0) AS applied FROM stripe_events")
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), int(row["applied"])


async def test_late_reordered_and_doubled_events_leave_every_record_equal_to_stripe(
    disorderly: Disorderly, client: stripe.StripeClient
) -> None:
    lifecycles = [_grown_paid_then_updated(client) for _ in range(4)]
    lifecycles += [_written_off_then_voided(client) for _ in range(2)]
    lifecycles += [_declined(client), *(_created_by_the_service(client, disorderly.base_url) for _ in range(3))]
    await asyncio.gather(*lifecycles)

    async def done() -> dict[str, int] | None:
        counts = await _deliveries(disorderly.emulator)
        return counts if counts["in_flight"] == 0 else None

    counts = await poll_until(done, "every delivery done", timeout_s=120)
    # The disorder happened: without it this test would prove nothing about it.
    assert counts["out_of_order"] > 0 and counts["doubled"] > 0, counts
    figures = await records_against_stripe(disorderly.database, disorderly.emulator, within_s=0)
    assert figures["records_compared"] == 10
    assert figures["record_fields_disagreeing_with_stripe"] == {}
    recorded, applied = await _events(disorderly.database)
    assert recorded > 10 * 3 and applied == recorded, "every event applied once, duplicates included"
