"""The admin's verbs after an invoice exists, through the real Envoy, server, sidecar and
Stripe emulator: `:pay` and `:void` over REST and PayInvoice/VoidInvoice over gRPC, the
seed's own Create payload, and the Envoy routes that must never retry a POST (by their own retry
policy or their virtual host's)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
import stripe
import yaml

from gateway.render import render
from service import pagetoken
from service.config import Settings
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import AUTH, CONSOLE, CONSOLE_KEY, READ_KEY, REQUEST, Stack, poll_until, wait_for_status
from tools.customers import DECLINED_ON_CHARGE, customer_with_card

FIXTURES = Path(__file__).parent / "fixtures"


async def create(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    reply = await http.post("/admin/api/invoices", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


async def event_outcome(stack: Stack, invoice_id: str, event_type: str) -> str:
    """The outcome the sidecar recorded for the emulator's event, once it has arrived."""
    conn = await asyncpg.connect(stack.database)
    try:
        query = "SELECT outcome FROM stripe_events WHERE stripe_invoice_id = $1 AND type = $2"

        async def arrived() -> str | None:
            outcome = await conn.fetchval(query, invoice_id, event_type)
            return None if outcome is None else str(outcome)

        return await poll_until(arrived, f"{event_type} of {invoice_id}")
    finally:
        await conn.close()


async def good_card(client: stripe.StripeClient, customer: str) -> str:
    card: Any = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    method = await client.v1.payment_methods.create_async({"type": "card", "card": card})
    assert method.id is not None
    await client.v1.payment_methods.attach_async(method.id, {"customer": customer})
    return method.id


async def test_the_seeds_own_payload_answers_a_paid_invoice(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    """One item of 1 cent, in eur: under Stripe's minimum charge, settled at finalization."""
    seed = json.loads((FIXTURES / "create-invoice.request.json").read_text())
    customer, method = await customer_with_card(stripe_client)
    answer = await create(http, {**seed, "customer": customer, "paymentMethod": method})
    assert (answer["status"], answer["total"], answer["currency"]) == ("paid", 1, "eur")
    await wait_for_status(http, answer["id"], "paid")


async def test_a_declined_create_is_paid_with_another_card_through_rest(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    invoice = await create(http, {**REQUEST, "customer": customer, "paymentMethod": declining})
    assert invoice["status"] == "open"
    declined = await http.post(f"/admin/api/invoices/{invoice['id']}:pay")  # the same card again
    assert declined.status_code == 400, declined.text
    assert declined.json()["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "declined" in declined.json()["message"]
    method = await good_card(stripe_client, customer)
    reply = await http.post(f"/admin/api/invoices/{invoice['id']}:pay", json={"paymentMethod": method})
    assert reply.status_code == 200, reply.text
    record = reply.json()
    assert (record["invoiceId"], record["status"], record["amount"]) == (invoice["id"], "paid", 4000)
    assert (await http.get(f"/admin/api/invoices/{record['_id']}")).json()["status"] == "paid"
    listed = await stripe_client.v1.invoices.list_async({"customer": customer})
    assert [(i.id, i.status) for i in listed.data] == [(invoice["id"], "paid")]
    again = await http.post(f"/admin/api/invoices/{record['_id']}:pay")
    assert (again.status_code, again.json()["status"]) == (200, "paid")


async def test_voiding_an_open_invoice_twice_answers_void_both_times(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    invoice = await create(http, {**REQUEST, "customer": customer, "paymentMethod": declining})
    replies = [await http.post(f"/admin/api/invoices/{invoice['id']}:void") for _ in range(2)]
    assert [(r.status_code, r.json()["status"]) for r in replies] == [(200, "void"), (200, "void")]
    assert (await http.get(f"/admin/api/invoices/{invoice['id']}")).json()["status"] == "void"
    assert (await stripe_client.v1.invoices.retrieve_async(invoice["id"])).status == "void"
    # The answer was already the record: Stripe's webhook that follows finds nothing to do.
    assert await event_outcome(stack, invoice["id"], "invoice.voided") == "unchanged"
    paying = await http.post(f"/admin/api/invoices/{invoice['id']}:pay", json={})
    assert paying.status_code == 400, paying.text
    assert paying.json()["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "void" in paying.json()["message"]


async def test_voiding_a_paid_invoice_is_refused_naming_paid(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    invoice = await create(http, {**REQUEST, "customer": customer, "paymentMethod": method})
    reply = await http.post(f"/admin/api/invoices/{invoice['id']}:void", headers={"Idempotency-Key": "void-paid"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "is paid" in reply.json()["message"]
    assert (await stripe_client.v1.invoices.retrieve_async(invoice["id"])).status == "paid"


async def test_a_replayed_create_makes_no_stripe_call(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    body, key = {**REQUEST, "customer": customer, "paymentMethod": method}, {"Idempotency-Key": uuid.uuid4().hex}
    first = await http.post("/admin/api/invoices", json=body, headers=key)
    assert first.status_code == 200, first.text
    async with httpx.AsyncClient(base_url=stack.localstripe) as emulator:
        await emulator.delete("/_config/calls")
        again = await http.post("/admin/api/invoices", json=body, headers=key)
        calls = (await emulator.get("/_config/calls")).json()["calls"]
    assert (again.status_code, again.json()) == (200, first.json())
    assert {route: n for route, n in calls.items() if " /v1/" in route} == {}


async def test_pay_and_void_of_an_unknown_invoice_are_404(http: httpx.AsyncClient) -> None:
    for verb in ("pay", "void"):
        reply = await http.post(f"/admin/api/invoices/in_doesnotexist:{verb}")
        assert reply.status_code == 404, reply.text
        assert reply.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
        reply = await http.post(f"/admin/api/invoices/{'0' * 24}:{verb}")
        assert reply.status_code == 404, reply.text


async def test_a_key_used_to_void_is_refused_for_a_pay_409(
    http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    invoice = await create(http, {**REQUEST, "customer": customer, "paymentMethod": declining})
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await http.post(f"/admin/api/invoices/{invoice['id']}:void", headers=key)
    assert first.status_code == 200, first.text
    other = await http.post(f"/admin/api/invoices/{invoice['id']}:pay", headers=key)
    assert other.status_code == 409, other.text


async def test_pay_and_void_over_grpc(
    stack: Stack, stripe_client: stripe.StripeClient, http: httpx.AsyncClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    invoice = await create(http, {**REQUEST, "customer": customer, "paymentMethod": declining})
    method = await good_card(stripe_client, customer)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        paid = await stub.PayInvoice(pb.PayInvoiceRequest(id=invoice["id"], payment_method=method), metadata=AUTH)
        assert (paid.invoice_id, paid.status, paid.amount) == (invoice["id"], "paid", 4000)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.VoidInvoice(pb.VoidInvoiceRequest(id=paid.id), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "paid" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PayInvoice(pb.PayInvoiceRequest(id=paid.id, payment_method="card_x"), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.VoidInvoice(pb.VoidInvoiceRequest(id=paid.id))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_audit_trail_names_who_created_paid_and_voided_in_order(
    http: httpx.AsyncClient, stack: Stack, stripe_client: stripe.StripeClient
) -> None:
    customer, declining = await customer_with_card(stripe_client, number=DECLINED_ON_CHARGE)
    created = await create(http, {**REQUEST, "customer": customer, "paymentMethod": declining})  # key1
    assert created["status"] == "open"
    method = await good_card(stripe_client, customer)
    console = {"Api-Key": CONSOLE_KEY, "Idempotency-Key": "audit-pay-1", "X-Request-Id": "audit-pay-request"}
    paid = await http.post(f"/admin/api/invoices/{created['id']}:pay", json={"paymentMethod": method}, headers=console)
    assert paid.status_code == 200, paid.text
    refused = await http.post(f"/admin/api/invoices/{created['id']}:void")  # key1 again: a paid invoice
    assert refused.status_code == 400, refused.text

    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        trail = await stub.ListInvoiceAudit(pb.ListInvoiceAuditRequest(id=created["id"]), metadata=AUTH)
        by_record_id = await stub.ListInvoiceAudit(pb.ListInvoiceAuditRequest(id=paid.json()["_id"]), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListInvoiceAudit(pb.ListInvoiceAuditRequest(id=created["id"]), metadata=(("api-key", READ_KEY),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListInvoiceAudit(pb.ListInvoiceAuditRequest(id="in_neverheardof"), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert [(e.action, e.caller, e.outcome) for e in trail.entries] == [
        ("create", "key1", "ok"),
        ("pay", CONSOLE, "ok"),
        ("void", "key1", "FailedPrecondition"),
    ]
    assert by_record_id == trail
    create_entry, pay_entry, void_entry = trail.entries
    assert {e.invoice_id for e in trail.entries} == {created["id"]}
    assert (pay_entry.idempotency_key, pay_entry.request_id, pay_entry.attempt) == (
        "audit-pay-1",
        "audit-pay-request",
        1,
    )
    assert create_entry.idempotency_key and not void_entry.idempotency_key
    assert "paid" in void_entry.detail and not create_entry.detail
    times = [e.time.ToDatetime() for e in trail.entries]
    assert times == sorted(times)

    # Over REST, for a write key; a read key is refused.
    rest = await http.get(f"/admin/api/invoices/{created['id']}/audit")
    assert rest.status_code == 200, rest.text
    assert [e["caller"] for e in rest.json()["entries"]] == ["key1", CONSOLE, "key1"]
    denied = await http.get(f"/admin/api/invoices/{created['id']}/audit", headers={"Api-Key": READ_KEY})
    assert denied.status_code == 403 and denied.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]

    # Paged by token, as ListInvoices is: the pages join into the whole trail.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        first = await stub.ListInvoiceAudit(pb.ListInvoiceAuditRequest(id=created["id"], limit=2), metadata=AUTH)
        assert len(first.entries) == 2 and first.HasField("next_page_token")
        request = pb.ListInvoiceAuditRequest(id=paid.json()["_id"], limit=2, page_token=first.next_page_token)
        last = await stub.ListInvoiceAudit(request, metadata=AUTH)
        assert [*first.entries, *last.entries] == list(trail.entries) and not last.HasField("next_page_token")
        for bad in (
            pb.ListInvoiceAuditRequest(id=created["id"], limit=0),
            pb.ListInvoiceAuditRequest(id=created["id"], page_token="not-a-token"),
            pb.ListInvoiceAuditRequest(id=created["id"], page_token=pagetoken.encode_audit("in_another", 1)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListInvoiceAudit(bad, metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    path = f"/admin/api/invoices/{created['id']}/audit"
    rest_first = await http.get(path, params={"limit": 1})
    assert rest_first.status_code == 200, rest_first.text
    rest_rest = await http.get(path, params={"limit": 5, "pageToken": rest_first.json()["nextPageToken"]})
    joined = rest_first.json()["entries"] + rest_rest.json()["entries"]
    assert [e["action"] for e in joined] == ["create", "pay", "void"]
    assert "nextPageToken" not in rest_rest.json()
    forged = await http.get(path, params={"pageToken": pagetoken.encode_audit("in_another", 1)})
    assert forged.status_code == 400 and "another invoice" in forged.json()["message"], forged.text
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "abc"}, {"pageToken": "garbage"}):
        refused = await http.get(path, params=params)
        assert refused.status_code == 400 and refused.json()["message"], (params, refused.text)


def _with_retry_policies(config: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Every route in order, with the retry policy Envoy applies to it: its own, else its
    virtual host's (a route's replaces the host's whole)."""
    return [
        (route, route.get("route", {}).get("retry_policy", host.get("retry_policy")))
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        for host in f["typed_config"]["route_config"]["virtual_hosts"]
        for route in host["routes"]
    ]


def _matches(match: dict[str, Any], method: str, path: str) -> bool:
    """Whether Envoy would take the route for this request (the kinds of match the
    gateway uses; any other fails the test rather than being guessed at)."""
    assert set(match) <= {"path", "prefix", "headers"}, match
    assert all(h["name"] == ":method" and set(h["string_match"]) == {"exact"} for h in match.get("headers", [])), match
    if match.get("path", path) != path or not path.startswith(match.get("prefix", "")):
        return False
    return all(h["string_match"]["exact"] == method for h in match.get("headers", []))


def test_envoy_retries_no_post_route() -> None:
    """A retried POST would bill again for a keyless caller, or void and pay twice: only
    routes matching GET alone may carry a retry policy, of their own or their virtual host's."""
    config = yaml.safe_load(render(Settings(), gateway_port=0, admin_port=0, grpc_port=1, webhook_port=2))
    routes = _with_retry_policies(config)
    retrying = [route for route, policy in routes if "route" in route and policy]
    assert retrying, "the GET routes are expected to retry"
    for route in retrying:
        methods = [h for h in route["match"].get("headers", []) if h["name"] == ":method"]
        webhook = route["match"].get("path") == "/webhooks/stripe"
        assert webhook or methods == [{"name": ":method", "string_match": {"exact": "GET"}}], route
    for verb in ("pay", "void", "markUncollectible", "refund", ""):
        path = f"/admin/api/invoices/in_x:{verb}" if verb else "/admin/api/invoices"
        taken = next((route, policy) for route, policy in routes if _matches(route["match"], "POST", path))
        assert taken[0]["route"]["cluster"] == "invoice_grpc" and taken[1] is None, (path, taken)
