"""Security properties that are easy to lose: no secret in any log line, and Envoy's
admin interface (which can stop Envoy) bound to loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import grpc
import httpx
import psutil

from gateway.render import render
from service.config import Settings
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import event, sign, stack_env
from tools.stack import free_port, start_envoy, start_service, start_webhooks

ADMIN_KEY = "admin-key-0f6b2c9e41d7"
STRIPE_KEY = "sk_test_secret_8d1c55aa90e2"
WEBHOOK_SECRET = "whsec_secret_41b7e02c93fd"
CALLER_GUESS = "guessed-key-7a2e91c0"


def test_envoy_admin_listens_on_loopback_only(tmp_path: Path) -> None:
    """Checked on the listening sockets themselves, without sending traffic anywhere."""
    config = render(Settings(), gateway_port=0, admin_port=0, grpc_port=free_port())
    envoy, gateway_port, admin_port = start_envoy(config, tmp_path)
    try:
        listening = [c for c in psutil.Process(envoy.process.pid).net_connections("inet") if c.status == "LISTEN"]
        by_port = {c.laddr.port: c.laddr.ip for c in listening}
        assert by_port[admin_port] == "127.0.0.1"
        assert by_port[gateway_port] == "0.0.0.0"  # noqa: S104 - the gateway is the public edge
    finally:
        envoy.stop()


async def _exercise(grpc_port: int, webhook_port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        await stub.ListInvoices(pb.ListInvoicesRequest(), metadata=(("api-key", ADMIN_KEY),))
        for key in (CALLER_GUESS, ADMIN_KEY):
            create = pb.CreateInvoiceRequest(
                items=[pb.InvoiceItem(name="x", amount=1)], customer="cus_1", payment_method="pm_1"
            )
            # A wrong key, then Stripe unreachable: both fail, and both are logged.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CreateInvoice(create, metadata=(("api-key", key), ("idempotency-key", "k-1")))
    payload = event("in_secrets0001", "invoice.paid", "paid", int(time.time()))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{webhook_port}") as http:
        await http.post(
            "/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload, WEBHOOK_SECRET)}
        )
        await http.post("/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload, "whsec_other")})


def test_no_secret_reaches_the_logs(database: str, tmp_path: Path) -> None:
    env = stack_env(database, tmp_path, f"http://127.0.0.1:{free_port()}")
    env |= {"ADMIN_API_KEYS": f"{ADMIN_KEY},second-{ADMIN_KEY}", "STRIPE_API_KEY": STRIPE_KEY}
    env |= {"STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET, "LOG_LEVEL": "DEBUG", "STRIPE_MAX_RETRIES": "0"}
    log_path = tmp_path / "all.log"
    with log_path.open("w") as log:
        service, grpc_port = start_service(env, log=log)
        webhooks, webhook_port = start_webhooks(env, log=log)
        try:
            asyncio.run(_exercise(grpc_port, webhook_port))
        finally:
            webhooks.stop()
            service.stop()
    text = log_path.read_text()
    did = ('"message": "webhook"', '"outcome": "applied"', "stripe call failed", '"message": "rpc"')
    assert all(part in text for part in did), "the run logged what it did"
    for secret in (ADMIN_KEY, STRIPE_KEY, WEBHOOK_SECRET, CALLER_GUESS):
        assert secret not in text
    for line in text.splitlines():
        if line.startswith("{"):
            json.loads(line)  # every structured line is whole JSON
