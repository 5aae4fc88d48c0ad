"""WatchInvoices through the whole stack: the server process's own reader (LISTEN and
polling), Envoy's transcoder streaming NDJSON, the emulator's webhooks moving a Create
from draft to paid, and the REST edge rules (the key, errors as JSON)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import stripe

from gateway.render import render
from service.config import Settings
from service.domain import StripeInvoice, User
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import start_grpc
from service.storage import Storage
from service.watch import Watches, WatchLimits
from tests.helpers import API_KEY, AUTH, REQUEST, Stack, until_envoy_routes
from tools.customers import customer_with_card
from tools.stack import start_envoy

WATCH = "/admin/api/invoices:watch"


class Lines(asyncio.Queue[dict[str, Any]]):
    """A REST watch's JSON events as they arrive, and whether its body has ended."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = asyncio.Event()


@asynccontextmanager
async def ndjson(http: httpx.AsyncClient, **params: str) -> AsyncIterator[Lines]:
    """A REST watch read line by line, in the background, into a queue of JSON events."""
    lines = Lines()
    opened = asyncio.Event()

    async def read() -> None:
        async with http.stream("GET", WATCH, params=params, timeout=httpx.Timeout(10, read=None)) as reply:
            assert reply.status_code == 200, await reply.aread()
            assert reply.headers["content-type"].startswith("application/json")
            opened.set()
            async for line in reply.aiter_lines():
                if line.strip():
                    await lines.put(json.loads(line))
        lines.ended.set()

    task = asyncio.create_task(read())
    try:
        await asyncio.wait_for(opened.wait(), 10)
        yield lines
    finally:
        task.cancel()


async def _until(lines: Lines, done: Any, timeout_s: float = 20) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while not seen or not done(seen[-1]):
        seen.append(await asyncio.wait_for(lines.get(), timeout_s))
    return seen


async def test_a_rest_watcher_sees_a_create_reach_paid_one_json_line_per_event(
    http: httpx.AsyncClient, stack_store: Storage, stripe_client: stripe.StripeClient
) -> None:
    customer, method = await customer_with_card(stripe_client)
    async with ndjson(http) as lines:
        first = await asyncio.wait_for(lines.get(), 10)
        assert first["kind"] == "KIND_BOOKMARK" and first["resumeToken"] and "invoice" not in first
        request = {**REQUEST, "customer": customer, "paymentMethod": method}
        reply = await http.post("/admin/api/invoices", json=request, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert reply.status_code == 200, reply.text
        stripe_id = reply.json()["id"]

        seen = await _until(lines, lambda e: e.get("invoice", {}).get("status") == "paid")
    changes = [e for e in seen if e["kind"] != "KIND_BOOKMARK"]
    assert {e["invoice"]["invoiceId"] for e in changes} == {stripe_id}
    assert changes[0]["kind"] == "KIND_CREATED"
    # Draft, open, paid, each once and in order (the emulator's events may fold steps).
    statuses = [e["invoice"]["status"] for e in changes]
    order = ["draft", "open", "paid"]
    assert statuses == sorted(statuses, key=order.index) and statuses[-1] == "paid"
    final = changes[-1]["invoice"]
    got = (await http.get(f"/admin/api/invoices/{stripe_id}")).json()
    assert final == got  # the same JSON as a Get
    assert all(e["changeTime"].endswith("Z") for e in changes)


async def test_a_rest_watch_resumes_from_its_token(http: httpx.AsyncClient, stack_store: Storage) -> None:
    async with ndjson(http, status="open") as lines:
        start = (await asyncio.wait_for(lines.get(), 10))["resumeToken"]
    await _deliver_open(stack_store, "in_restresume1")
    await _deliver_open(stack_store, "in_restresume2")
    async with ndjson(http, resumeToken=start, status="open") as lines:
        seen = await _until(lines, lambda e: e.get("invoice", {}).get("invoiceId") == "in_restresume2")
    assert [e["invoice"]["invoiceId"] for e in seen if "invoice" in e] == ["in_restresume1", "in_restresume2"]


async def _deliver_open(store: Storage, stripe_id: str) -> None:
    await store.apply_stripe_invoice(
        StripeInvoice(stripe_id, "open", 100, "", User("u", "U"), "eur", 1_700_000_000), stripe_time=1
    )


async def test_rest_watch_errors_are_json_4xx(http: httpx.AsyncClient, stack: Stack, stack_store: Storage) -> None:
    # Something pruned, so that the oldest possible position is past the retention.
    await _deliver_open(stack_store, "in_restpruned1")
    assert await stack_store.prune_changes(datetime.now(UTC) + timedelta(days=1), 10_000) > 0
    for params, status, code in (
        ({"resumeToken": "eyJ4IjoxLCJzIjoxfQ"}, 400, 11),
        ({"resumeToken": "forged"}, 400, 3),
        ({"resumeToken": "eyJ4Ijo5MDAwMDAwMDAwMDAwLCJzIjoxfQ"}, 400, 3),
        ({"status": "settled"}, 400, 3),
        ({"nope": "1"}, 400, 3),
    ):
        reply = await http.get(WATCH, params=params)
        assert reply.status_code == status, (params, reply.text)
        assert reply.json()["code"] == code, reply.text
        assert reply.json()["message"]
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as anonymous:
        for headers in ({}, {"Api-Key": "wrong"}):
            reply = await anonymous.get(WATCH, headers=headers)
            assert reply.status_code == 401, reply.text
            assert reply.json()["code"] == 16


async def test_a_grpc_watch_of_the_running_server(stack: Stack, stack_store: Storage) -> None:
    """The deployed server (the process, not a test's) with its grpcurl-able stream."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        call = stub.WatchInvoices(pb.WatchInvoicesRequest(invoice_id="in_grpcstack1"), metadata=AUTH)
        first = await call.read()
        assert isinstance(first, pb.InvoiceEvent) and first.kind == pb.InvoiceEvent.KIND_BOOKMARK
        await _deliver_open(stack_store, "in_grpcstack1")
        event = await asyncio.wait_for(call.read(), 10)
        assert isinstance(event, pb.InvoiceEvent)
        assert event.kind == pb.InvoiceEvent.KIND_CREATED and event.invoice.invoice_id == "in_grpcstack1"
        call.cancel()


async def test_a_rest_watch_outlives_the_route_timeout_and_ends_at_the_servers_maximum(
    store: Storage, tmp_path: Path
) -> None:
    """GATEWAY_ROUTE_TIMEOUT_S (here 1 s) cuts ordinary calls, not a watch; the server ends
    a watch after WATCH_MAX_STREAM_S (here 3 s, then the body simply ends, to be resumed)."""
    short = Watches(store, WatchLimits(poll_s=0.05, max_stream_s=3))
    short.start()
    running = await start_grpc(store, [API_KEY], "127.0.0.1:0", watches=short)
    config = render(Settings(gateway_route_timeout_s=1), gateway_port=0, admin_port=0, grpc_port=running.port)
    envoy, port, _ = await asyncio.to_thread(start_envoy, config, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Api-Key": API_KEY}) as http:
            await until_envoy_routes(http, "/admin/api/invoices")
            started = time.monotonic()
            async with ndjson(http) as lines:
                await asyncio.wait_for(lines.get(), 10)  # the first bookmark
                await asyncio.sleep(1.5)  # past the route timeout
                await _deliver_open(store, "in_longwatch1")
                event = await asyncio.wait_for(lines.get(), 10)
                assert event["invoice"]["invoiceId"] == "in_longwatch1"
                assert time.monotonic() - started > 1.5
                ended = await asyncio.wait_for(lines.ended.wait(), 10)
            assert ended and 3 <= time.monotonic() - started < 10
    finally:
        envoy.stop()
        await running.stop(0)
