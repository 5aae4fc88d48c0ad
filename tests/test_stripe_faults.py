"""What callers see when Stripe or Postgres misbehave: clear statuses, no secrets in
them, and no webhook delivery lost while the database is away."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from aiohttp import web

from service import embedded, payments, storage, webhooks
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import start_grpc
from service.invoices import InvoiceCreator, Timing
from tests.helpers import API_KEY, AUTH, WEBHOOK_SECRET, event, sign
from tools.stack import free_port

CREATE = pb.CreateInvoiceRequest(
    items=[pb.InvoiceItem(name="x", amount=100)], customer="cus_abc", payment_method="pm_abc"
)


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def _stripe_answering(status: int, error: dict[str, Any]) -> web.Application:
    """A stand-in for Stripe that answers every call with one error: isolates the mapping
    of Stripe's error classes, which the emulator cannot produce on demand."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"error": error}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def _create_status(store: storage.Storage, api_base: str, api_key: str = "sk_test_x") -> grpc.aio.AioRpcError:
    client = payments.client(api_key, api_base=api_base, timeout_s=2, max_retries=0)
    creator = InvoiceCreator(store, store, payments.StripePayments(client), Timing(lease_s=40))
    running = await start_grpc(store, [API_KEY], "127.0.0.1:0", creator=creator)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.InvoiceServiceStub(channel).CreateInvoice(CREATE, metadata=AUTH)
            return info.value
    finally:
        await running.server.stop(None)


async def test_stripe_unreachable_is_unavailable(store: storage.Storage) -> None:
    error = await _create_status(store, f"http://127.0.0.1:{free_port()}")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Stripe" in (error.details() or "")


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (500, {"type": "api_error", "message": "boom"}, grpc.StatusCode.UNAVAILABLE),
        (503, {"type": "api_error", "message": "down"}, grpc.StatusCode.UNAVAILABLE),
        (429, {"type": "invalid_request_error", "code": "rate_limit"}, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (404, {"type": "invalid_request_error", "code": "resource_missing", "param": "customer"}, None),
        (401, {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_x"}, None),
    ],
)
async def test_stripe_errors_map_to_clear_statuses(
    store: storage.Storage, status: int, error: dict[str, Any], code: grpc.StatusCode | None
) -> None:
    async for base in _serve(_stripe_answering(status, error)):
        rpc_error = await _create_status(store, base, api_key="sk_test_secret_never_shown")
        expected = code or {404: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.INTERNAL}[status]
        assert rpc_error.code() == expected
        assert "sk_test" not in (rpc_error.details() or "")
        if status == 404:
            assert (rpc_error.details() or "").startswith("customer:")


async def test_a_webhook_while_postgres_is_down_is_503_then_lands(tmp_path: Path) -> None:
    """A real Postgres stopped under the sidecar: Stripe is told to retry (503), and the
    redelivery after the restart is recorded."""
    data = tmp_path / "pg"
    dsn = embedded.start(data, temporary=True)
    await storage.migrate_database(dsn)
    pool = await storage.connect(dsn, max_size=2, command_timeout=2)
    store = storage.Storage(pool)
    payload = event("in_pgdown0001", "invoice.paid", "paid", int(time.time()))
    try:
        async for base in _serve(webhooks.init([WEBHOOK_SECRET], store=store)):
            async with httpx.AsyncClient(base_url=base) as http:
                embedded.stop(data)
                down = await http.post(webhooks.PATH, content=payload, headers={"Stripe-Signature": sign(payload)})
                assert down.status_code == 503
                assert down.json()["code"] == 14
                embedded.restart(data)
                again = await http.post(webhooks.PATH, content=payload, headers={"Stripe-Signature": sign(payload)})
                assert again.status_code == 200, again.text
                assert again.json()["outcome"] == "created"
        assert (await store.get_invoice("in_pgdown0001")).status == "paid"
    finally:
        await pool.close()
