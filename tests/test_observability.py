"""What an operator sees, read from the running stack: Prometheus series on the server's
METRICS_PORT and on the sidecar, moved by real calls through Envoy; one log line per RPC
and per webhook carrying the x-request-id the REST caller got back; liveness endpoints."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import httpx
import pytest
import stripe
from prometheus_client.parser import text_string_to_metric_families

from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import AUTH, Stack, deliver, event, sign, until_delivered
from tools.customers import customer_with_card

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    reply = httpx.get(url, timeout=5)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _log_lines(stack: Stack, **match: str) -> list[dict[str, object]]:
    """The stack's JSON log lines whose fields equal `match` (waits briefly: the line
    is written after the reply)."""
    for _ in range(50):
        found = []
        for raw in stack.log.read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and all(line.get(k) == v for k, v in match.items()):
                found.append(line)
        if found:
            return found
        time.sleep(0.1)
    return []


async def test_rpc_calls_are_counted_and_timed_by_method_and_code(stack: Stack, http: httpx.AsyncClient) -> None:
    server = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    before = scrape(server)
    assert (await http.get("/admin/api/invoices?page=1&limit=5")).status_code == 200
    assert (await http.get("/admin/api/invoices/in_metrics404")).status_code == 404
    assert (await http.get("/admin/api/invoices", headers={"Api-Key": "wrong"})).status_code == 401
    after = scrape(server)

    # Counted by the caller's name too (the first, bare key of the list is `key1`; `-`: no key).
    for method, code, caller in (
        ("ListInvoices", "OK", "key1"),
        ("GetInvoice", "NOT_FOUND", "key1"),
        ("ListInvoices", "UNAUTHENTICATED", "-"),
    ):
        calls = value(after, "invoice_rpc_calls_total", method=method, code=code, caller=caller)
        assert calls - value(before, "invoice_rpc_calls_total", method=method, code=code, caller=caller) == 1
        timed = value(after, "invoice_rpc_duration_seconds_count", method=method, code=code)
        assert timed - value(before, "invoice_rpc_duration_seconds_count", method=method, code=code) == 1
    assert value(after, "invoice_rpc_duration_seconds_bucket", method="ListInvoices", code="OK", le="+Inf") >= 1
    # The pool, read at scrape time.
    assert value(after, "invoice_db_pool_connections") >= 1
    assert value(after, "invoice_db_pool_max") == 10
    assert value(after, "invoice_db_pool_acquire_seconds_count") > value(
        before, "invoice_db_pool_acquire_seconds_count"
    )


async def test_stripe_calls_are_counted_by_operation_and_outcome(
    stack: Stack, http: httpx.AsyncClient, stripe_client: stripe.StripeClient
) -> None:
    server = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    before = scrape(server)
    customer, method = await customer_with_card(stripe_client)
    request = {"items": [{"name": "Metered", "amount": 1200}], "customer": customer, "paymentMethod": method}
    assert (await http.post("/admin/api/invoices", json=request)).status_code == 200
    unknown = {**request, "customer": "cus_nosuchcustomer"}
    assert (await http.post("/admin/api/invoices", json=unknown)).status_code == 400
    after = scrape(server)

    def delta(operation: str, outcome: str) -> float:
        name = "invoice_stripe_calls_total"
        return value(after, name, operation=operation, outcome=outcome) - value(
            before, name, operation=operation, outcome=outcome
        )

    assert delta("invoices.create", "ok") == 1
    assert delta("invoices.add_lines", "ok") == 1
    assert delta("invoices.finalize", "ok") == 1
    assert delta("invoices.pay", "ok") == 1
    assert delta("invoices.create", "invalidrequest") == 1
    assert value(after, "invoice_stripe_call_duration_seconds_count", operation="invoices.pay") >= 1


async def test_webhook_outcomes_are_counted(stack: Stack, http: httpx.AsyncClient, localstripe: str) -> None:
    sidecar = f"http://127.0.0.1:{stack.webhook_port}/metrics"
    # The emulator's events of an earlier test's invoices (an invoice.paid among them) would
    # count in this window: it failed so once on a fresh clone.
    await until_delivered(localstripe)
    before = scrape(sidecar)
    now = int(time.time())
    paid = event(f"in_metrics{uuid.uuid4().hex[:8]}", "invoice.paid", "paid", now)
    assert (await deliver(http, paid)).status_code == 200
    assert (await deliver(http, paid)).status_code == 200  # the same event again
    assert (await deliver(http, paid, sign(paid, "whsec_someone_else"))).status_code == 400
    # A type the emulator never sends itself: its own customer.created, for a customer an
    # earlier test made, may land in this window (it did once on a fresh clone).
    kind = "radar.early_fraud_warning.created"
    other = json.dumps({"id": "evt_metrics_other", "object": "event", "type": kind, "created": now})
    assert (await deliver(http, other)).status_code == 200
    after = scrape(sidecar)

    def delta(type_: str, outcome: str) -> float:
        name = "invoice_webhook_events_total"
        return value(after, name, type=type_, outcome=outcome) - value(before, name, type=type_, outcome=outcome)

    assert delta("invoice.paid", "applied") == 1
    assert delta("invoice.paid", "duplicate") == 1
    # A delivery that fails verification is not trusted to name its type.
    assert delta("unknown", "invalid") == 1
    assert delta(kind, "ignored") == 1


async def test_a_rest_calls_request_id_is_echoed_and_in_the_servers_log_line(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    mine = f"admin-tool-{uuid.uuid4().hex}"
    reply = await http.get("/admin/api/invoices/in_reqid404", headers={"X-Request-Id": mine})
    assert reply.status_code == 404
    assert reply.headers.get_list("x-request-id") == [mine]
    [line] = _log_lines(stack, message="rpc", request_id=mine)
    assert (line["method"], line["code"]) == ("GetInvoice", "NOT_FOUND")
    assert isinstance(line["duration_ms"], float)

    # Without one, Envoy makes one, and it is the one the server logged.
    reply = await http.get("/admin/api/invoices?page=1&limit=1")
    [generated] = reply.headers.get_list("x-request-id")
    assert _log_lines(stack, message="rpc", request_id=generated, method="ListInvoices", code="OK")


async def test_a_webhook_log_line_carries_its_request_id(stack: Stack, http: httpx.AsyncClient) -> None:
    payload = event(f"in_reqid{uuid.uuid4().hex[:8]}", "invoice.finalized", "open", int(time.time()))
    headers = {"Stripe-Signature": sign(payload), "X-Request-Id": f"hook-{uuid.uuid4().hex}"}
    reply = await http.post("/webhooks/stripe", content=payload, headers=headers)
    assert reply.status_code == 200
    [line] = _log_lines(stack, message="webhook", request_id=headers["X-Request-Id"])
    assert (line["type"], line["outcome"], line["status"]) == ("invoice.finalized", "applied", 200)


def test_a_direct_grpc_caller_gets_a_request_id_back_in_the_trailers(stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        _, call = stub.ListInvoices.with_call(pb.ListInvoicesRequest(limit=1), metadata=AUTH, timeout=5)
        ids = [str(v) for k, v in call.trailing_metadata() if k == "x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 32
    assert _log_lines(stack, message="rpc", request_id=ids[0])


def test_liveness_answers_on_both_processes(stack: Stack) -> None:
    for port in (stack.metrics_port, stack.webhook_port):
        reply = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5)
        assert (reply.status_code, reply.json()) == (200, {"status": "ALIVE"})


def test_error_replies_carry_the_request_id_and_a_malformed_one_is_replaced(stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetInvoice(
                pb.GetInvoiceRequest(id="in_trailers404"), metadata=(*AUTH, ("x-request-id", "mine-42")), timeout=5
            )
        error = info.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        trailers = dict(error.trailing_metadata() or ())
        assert trailers["x-request-id"] == "mine-42"
        assert "grpc-status-details-bin" in trailers  # the rich status survived too

        forged = "x" * 200 + " {injected}"
        _, call = stub.ListInvoices.with_call(
            pb.ListInvoicesRequest(limit=1), metadata=(*AUTH, ("x-request-id", forged)), timeout=5
        )
        [given] = [str(v) for k, v in call.trailing_metadata() if k == "x-request-id"]
    assert given != forged and len(given) == 32
    assert _log_lines(stack, message="rpc", request_id=given)
