"""MarkUncollectible through the real Envoy, server, sidecar and Stripe emulator, next to
Pay and Void (tests/test_manage.py): `:markUncollectible` over REST and MarkUncollectible
over gRPC write an open invoice off at Stripe with Void's rules, and the invoice can still
be paid afterwards."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import httpx
import pytest
import stripe

from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import AUTH, READ_KEY, REQUEST, Stack, wait_for_status
from tests.test_manage import create, event_outcome, good_card
from tests.test_watch_gateway import ndjson
from tools.customers import DECLINED_ON_CHARGE, customer_with_card

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


async def open_invoice(http: httpx.AsyncClient, stripe_client: stripe.StripeClient) -> tuple[str, dict[str, Any]]:
    """A customer whose card declines, and the open invoice its Create left, recorded."""
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    invoice = await create(http, {**REQUEST, "customer": customer, "paymentMethod": declining})
    assert invoice["status"] == "open"
    await wait_for_status(http, invoice["id"], "open")  # recorded from its webhooks
    return customer, invoice


async def stripe_calls(emulator: httpx.AsyncClient) -> dict[str, int]:
    """The emulator's /v1 calls since its count was last emptied, by method and route."""
    calls: dict[str, int] = (await emulator.get("/_config/calls")).json()["calls"]
    return {route: n for route, n in calls.items() if " /v1/" in route}


async def test_an_open_invoice_is_written_off_once_and_can_still_be_paid(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, invoice = await open_invoice(http, stripe_client)
    path = f"/admin/api/invoices/{invoice['id']}:markUncollectible"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with ndjson(http, invoiceId=invoice["id"], status="uncollectible") as lines:
        assert (await asyncio.wait_for(lines.get(), 10))["kind"] == "KIND_BOOKMARK"
        first = await http.post(path, headers=key)
        assert first.status_code == 200, first.text
        watched = await asyncio.wait_for(lines.get(), 20)
    record = first.json()
    assert (record["invoiceId"], record["status"], record["amount"]) == (invoice["id"], "uncollectible", 4000)
    assert (watched["kind"], watched["invoice"]["_id"], watched["invoice"]["status"]) == (
        "KIND_UPDATED",
        record["_id"],
        "uncollectible",
    )
    assert (await http.get(f"/admin/api/invoices/{record['_id']}")).json()["status"] == "uncollectible"
    assert (await stripe_client.v1.invoices.retrieve_async(invoice["id"])).status == "uncollectible"
    # The answer was already the record: Stripe's webhook that follows finds nothing to do.
    assert await event_outcome(stack, invoice["id"], "invoice.marked_uncollectible") == "unchanged"

    async with httpx.AsyncClient(base_url=stack.localstripe) as emulator:
        await emulator.delete("/_config/calls")
        again = await http.post(path, headers=key)  # the same key: the stored answer, no Stripe call
        assert await stripe_calls(emulator) == {}
        keyless = await http.post(path)  # an uncollectible invoice is answered as it is
        assert [route for route in await stripe_calls(emulator) if route.startswith("POST")] == []
    assert (again.status_code, again.json()["_id"], again.json()["status"]) == (200, record["_id"], "uncollectible")
    assert (keyless.status_code, keyless.json()["status"]) == (200, "uncollectible"), keyless.text
    other = await http.post(f"/admin/api/invoices/{invoice['id']}:void", headers=key)
    assert other.status_code == 409, other.text

    method = await good_card(stripe_client, customer)
    paid = await http.post(f"/admin/api/invoices/{invoice['id']}:pay", json={"paymentMethod": method})
    assert (paid.status_code, paid.json()["status"]) == (200, "paid"), paid.text
    refused = await http.post(path)
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == FAILED_PRECONDITION
    assert f"invoice {invoice['id']} is paid; only open can be marked uncollectible" == refused.json()["message"]
    assert (await stripe_client.v1.invoices.retrieve_async(invoice["id"])).status == "paid"

    trail = await http.get(f"/admin/api/invoices/{invoice['id']}/audit")
    assert [(e["action"], e["outcome"]) for e in trail.json()["entries"]] == [
        ("create", "ok"),
        ("mark_uncollectible", "ok"),
        ("mark_uncollectible", "ok"),
        ("pay", "ok"),
        ("mark_uncollectible", "FailedPrecondition"),
    ]
    assert trail.json()["entries"][1]["idempotencyKey"] == key["Idempotency-Key"]


async def test_a_draft_or_void_invoice_is_refused_naming_its_status(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    _, invoice = await open_invoice(http, stripe_client)
    assert (await http.post(f"/admin/api/invoices/{invoice['id']}:void")).status_code == 200
    refused = await http.post(f"/admin/api/invoices/{invoice['id']}:markUncollectible")
    assert (refused.status_code, refused.json()["code"]) == (400, FAILED_PRECONDITION), refused.text
    assert "is void" in refused.json()["message"]
    customer, _ = await customer_with_card(stripe_client)
    draft = await stripe_client.v1.invoices.create_async(
        {"customer": customer, "auto_advance": False, "pending_invoice_items_behavior": "exclude"}
    )
    assert draft.id is not None
    refused = await http.post(f"/admin/api/invoices/{draft.id}:markUncollectible")
    assert (refused.status_code, refused.json()["code"]) == (400, FAILED_PRECONDITION), refused.text
    assert "is draft" in refused.json()["message"]
    for unknown in ("in_doesnotexist", "0" * 24):
        missing = await http.post(f"/admin/api/invoices/{unknown}:markUncollectible")
        assert (missing.status_code, missing.json()["code"]) == (404, grpc.StatusCode.NOT_FOUND.value[0])


async def test_a_read_key_is_refused_with_403_json(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    _, invoice = await open_invoice(http, stripe_client)
    path = f"/admin/api/invoices/{invoice['id']}:markUncollectible"
    denied = await http.post(path, headers={"Api-Key": READ_KEY})
    assert denied.status_code == 403, denied.text
    assert denied.headers["content-type"].startswith("application/json")
    assert denied.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "MarkUncollectible" in denied.json()["message"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.MarkUncollectible(
                pb.MarkUncollectibleRequest(id=invoice["id"]), metadata=(("api-key", READ_KEY),)
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await stripe_client.v1.invoices.retrieve_async(invoice["id"])).status == "open"


async def test_mark_uncollectible_over_grpc(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, invoice = await open_invoice(http, stripe_client)
    keyed = (*AUTH, ("idempotency-key", uuid.uuid4().hex))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        marked = await stub.MarkUncollectible(pb.MarkUncollectibleRequest(id=invoice["id"]), metadata=keyed)
        assert (marked.invoice_id, marked.status, marked.amount) == (invoice["id"], "uncollectible", 4000)
        again = await stub.MarkUncollectible(pb.MarkUncollectibleRequest(id=marked.id), metadata=keyed)
        assert (again.id, again.status) == (marked.id, "uncollectible")
        got = await stub.GetInvoice(pb.GetInvoiceRequest(id=marked.id), metadata=AUTH)
        assert got.status == "uncollectible"
        method = await good_card(stripe_client, customer)
        paid = await stub.PayInvoice(pb.PayInvoiceRequest(id=marked.id, payment_method=method), metadata=AUTH)
        assert paid.status == "paid"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.MarkUncollectible(pb.MarkUncollectibleRequest(id=marked.id), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is paid" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.MarkUncollectible(pb.MarkUncollectibleRequest(id="not an id"), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.MarkUncollectible(pb.MarkUncollectibleRequest(id=marked.id))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_server_without_stripe_answers_unavailable(stub: pb_grpc.InvoiceServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.MarkUncollectible(pb.MarkUncollectibleRequest(id="in_anything"), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "STRIPE_API_KEY" in (info.value.details() or "")
