"""Security properties that are easy to lose: no secret in any log line, and Envoy's
admin interface (which can stop Envoy) bound to loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
import psutil

from gateway.render import render
from service.config import Settings
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import event, sign, stack_env
from tools.stack import backend, free_port, start_envoy, wait_until_routed

ADMIN_KEY = "admin-key-0f6b2c9e41d7"
READ_ONLY_KEY = "read-key-5d1c83b2a9e0"
STRIPE_KEY = "sk_test_secret_8d1c55aa90e2"
WEBHOOK_SECRET = "whsec_secret_41b7e02c93fd"
CALLER_GUESS = "guessed-key-7a2e91c0"
DB_PASSWORD = "dbpass3c81f0a2d5e7"
OWNER_PASSWORD = "ownerpass9e04b6c1a2f8"


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


def _with_password(dsn: str, password: str) -> str:
    """`dsn` with `password` for its user. The embedded Postgres trusts its unix socket, so
    the password is never asked for; it must not be logged all the same."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:{password}@{host}"))


async def _exercise_gateway(gateway_port: int) -> None:
    """The same through Envoy: REST with the admin key and a guessed one, a Create that
    fails at Stripe, and Stripe deliveries signed with the secret and without."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}", timeout=10) as http:
        await http.get("/admin/api/invoices", headers={"Api-Key": ADMIN_KEY})
        body = {"items": [{"name": "x", "amount": 1}], "customer": "cus_1", "paymentMethod": "pm_1"}
        for key in (CALLER_GUESS, ADMIN_KEY, READ_ONLY_KEY):  # the read key's Create is refused (403)
            await http.post("/admin/api/invoices", json=body, headers={"Api-Key": key, "Idempotency-Key": "k-2"})
        payload = event("in_secrets0002", "invoice.paid", "paid", int(time.time()))
        for secret in (WEBHOOK_SECRET, "whsec_other"):
            await http.post("/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload, secret)})


def test_no_secret_reaches_the_logs(database: str, tmp_path: Path) -> None:
    """The server's, the sidecar's and Envoy's logs of a stack run at DEBUG, with every
    secret configured and used: none of them appears, the database passwords included."""
    env = stack_env(database, tmp_path, f"http://127.0.0.1:{free_port()}")
    keys = f"{ADMIN_KEY},second-{ADMIN_KEY},watcher:read:{READ_ONLY_KEY}"
    env |= {"ADMIN_API_KEYS": keys, "STRIPE_API_KEY": STRIPE_KEY}
    env |= {"STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET, "LOG_LEVEL": "DEBUG", "STRIPE_MAX_RETRIES": "0"}
    env |= {
        "DATABASE_URL": _with_password(env["DATABASE_URL"], DB_PASSWORD),
        "MIGRATION_DATABASE_URL": _with_password(database, OWNER_PASSWORD),
    }
    log_path = tmp_path / "all.log"
    with log_path.open("w") as log, backend(env, tmp_path, log=log) as running:
        wait_until_routed(f"http://127.0.0.1:{running.gateway_port}", ADMIN_KEY)
        asyncio.run(_exercise(running.grpc_port, running.webhook_port))
        asyncio.run(_exercise_gateway(running.gateway_port))
    text = log_path.read_text()
    did = ('"message": "webhook"', '"outcome": "applied"', "stripe call failed", '"message": "rpc"')
    assert all(part in text for part in did), "the run logged what it did"
    assert "ready: schema current, Postgres reachable" in text, "the service used the DSNs"
    assert "ENVOY_SIGTERM" in text, "Envoy's own log is part of what is read"
    assert '"caller": "watcher"' in text and '"code": "PERMISSION_DENIED"' in text, "the read key was used"
    for secret in (ADMIN_KEY, STRIPE_KEY, WEBHOOK_SECRET, CALLER_GUESS, DB_PASSWORD, OWNER_PASSWORD, READ_ONLY_KEY):
        assert secret not in text
    for line in text.splitlines():
        if line.startswith("{"):
            json.loads(line)  # every structured line is whole JSON
