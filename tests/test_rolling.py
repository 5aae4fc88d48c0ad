"""A rolling restart of two servers and two webhook sidecars behind one Envoy, under REST
reads and keyed Creates, direct gRPC reads (round robin with retries, as docs/grpc-clients.md asks of
direct callers), watchers that resume, and signed webhook deliveries: each replica in turn
gets SIGTERM, drains, exits, is restarted and is available again (SERVING for MIN_READY_S,
so direct callers see it, tools/direct.py) and routed again by Envoy before the next.
With a replica always up, the rule is no failed call, no delivery answered anything but
200, every event recorded once, and every watcher seeing every change once, in order.
Envoy does not retry writes (a POST), so a server that skipped its drain would fail this
test, as its second case shows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import asyncpg
import grpc
import httpx

from gateway.render import render
from service import payments
from service.config import Settings
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.helpers import (
    API_KEY,
    AUTH,
    ResumingWatch,
    deliver,
    envoy_hosts,
    event,
    stack_env,
    until,
    until_watching,
    wait_until,
)
from tools.customers import customer_with_card
from tools.direct import direct_channel
from tools.stack import (
    LOCALSTRIPE_KEY,
    Part,
    free_port,
    start_envoy,
    start_service,
    start_webhooks,
    wait_until_available,
    wait_until_routed,
    wait_until_serving,
)


def _routed(admin_port: int, cluster: str, port: int) -> bool | None:
    """Envoy's own view: the host is in its cluster and healthy."""
    return True if envoy_hosts(admin_port).get(f"{cluster}::127.0.0.1:{port}") else None


def _reads(url: str, stop: threading.Event, seen: Counter[str]) -> None:
    with httpx.Client(headers={"Api-Key": API_KEY}, timeout=10) as http:
        while not stop.is_set():
            try:
                reply = http.get(url)
                seen[str(reply.status_code)] += 1
                if reply.status_code != 200:  # what the failure says, for the assertion's message
                    seen[f"{reply.status_code} {reply.text[:200]}"] += 1
            except httpx.HTTPError as exc:
                seen[type(exc).__name__] += 1


def _creates(base: str, customer: str, method: str, stop: threading.Event, seen: Counter[str]) -> None:
    body = {"items": [{"name": "Rolling", "amount": 1200}], "customer": customer, "paymentMethod": method}
    with httpx.Client(base_url=base, headers={"Api-Key": API_KEY}, timeout=30) as http:
        while not stop.is_set():
            key = {"Idempotency-Key": f"rolling-{uuid.uuid4().hex}"}
            try:
                reply = http.post("/admin/api/invoices", json=body, headers=key)
                seen[str(reply.status_code)] += 1
                if reply.status_code != 200:  # what the failure says, for the assertion's message
                    seen[f"{reply.status_code} {reply.text[:200]}"] += 1
            except httpx.HTTPError as exc:
                seen[type(exc).__name__] += 1


@dataclass
class Rolled:
    """What every caller got while the replicas rolled."""

    reads: Counter[str] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)
    direct: Counter[str] = field(default_factory=Counter)
    deliveries: Counter[str] = field(default_factory=Counter)
    sent: list[str] = field(default_factory=list)
    watched: list[list[tuple[str, str]]] = field(default_factory=list)


async def _async_callers(target: str, base: str, ready: threading.Event, stop: threading.Event, out: Rolled) -> None:
    """Direct gRPC readers, watchers that resume, and a sender of signed webhook events
    that retries each until it is answered 2xx, as Stripe does."""
    watchers = [ResumingWatch(target) for _ in range(3)]
    await until_watching(watchers)
    ready.set()

    async def direct() -> None:
        async with direct_channel(target) as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            while not stop.is_set():
                try:
                    await stub.ListInvoices(pb.ListInvoicesRequest(page=1, limit=5), metadata=AUTH, timeout=10)
                    out.direct["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    out.direct[f"{exc.code().name} {exc.details()}"] += 1

    async def hooks() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            while not stop.is_set():
                invoice = f"in_roll{len(out.sent):05d}"
                payload = event(invoice, "invoice.paid", "paid", int(time.time()))
                while True:
                    try:
                        reply = await deliver(http, payload)
                        out.deliveries[str(reply.status_code)] += 1
                        if reply.status_code == 200:
                            break
                    except httpx.HTTPError as exc:
                        out.deliveries[type(exc).__name__] += 1
                    await asyncio.sleep(0.1)
                out.sent.append(invoice)

    await asyncio.gather(direct(), hooks())

    # Each delivered invoice; a watcher may see more (the Creates' own events, where the
    # emulator's webhooks reach this stack: the container cluster, chaos/cluster.py).
    sent = set(out.sent)
    await until(lambda: all(sent <= {i for i, _ in w.ids} for w in watchers), "every watcher seeing every delivery")
    for w in watchers:
        await w.stop()
    out.watched = [w.ids for w in watchers]


def _roll(database: str, tmp_path: Path, localstripe: str, drain_s: str, rounds: int = 1) -> Rolled:
    ports, hook_ports = [free_port(), free_port()], [free_port(), free_port()]
    base_env = stack_env(database, tmp_path, localstripe) | {"SHUTDOWN_DRAIN_S": drain_s, "SHUTDOWN_GRACE_S": "10"}
    envs = [base_env | {"GRPC_PORT": str(p), "METRICS_PORT": "0"} for p in ports]
    hook_envs = [base_env | {"WEBHOOK_PORT": str(p)} for p in hook_ports]
    log = (tmp_path / "stack.log").open("w")
    servers: list[Part] = [start_service(env, log=log)[0] for env in envs]
    sidecars: list[Part] = [start_webhooks(env, log=log)[0] for env in hook_envs]
    config = render(Settings(), gateway_port=0, admin_port=0, grpc_port=ports, webhook_port=hook_ports)
    envoy, gateway_port, admin_port = start_envoy(config, tmp_path / "envoy", log=log)
    base = f"http://127.0.0.1:{gateway_port}"
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    client = payments.client(LOCALSTRIPE_KEY, api_base=localstripe, timeout_s=10, max_retries=0)
    customer, method = asyncio.run(customer_with_card(client))
    out = Rolled()
    stop, ready = threading.Event(), threading.Event()
    try:
        for port in ports:
            wait_until_serving(port)
        wait_until_routed(base, API_KEY)
        workers = [
            threading.Thread(target=_reads, args=(f"{base}/admin/api/invoices?page=1&limit=5", stop, out.reads))
            for _ in range(3)
        ]
        workers += [
            threading.Thread(target=_creates, args=(base, customer, method, stop, out.writes)) for _ in range(3)
        ]
        callers = threading.Thread(target=lambda: asyncio.run(_async_callers(target, base, ready, stop, out)))
        callers.start()
        assert ready.wait(30), "the watchers did not start"
        for w in workers:
            w.start()
        time.sleep(1)
        for _ in range(rounds):
            for i, env in enumerate(envs):
                servers[i].process.send_signal(signal.SIGTERM)
                assert servers[i].process.wait(timeout=30) == 0
                servers[i] = start_service(env, log=log)[0]
                # The next goes down only once every caller routes to this one again: direct
                # callers see it within MIN_READY_S (tools/direct.py), Envoy says so itself.
                wait_until_available(ports[i])
                wait_until(partial(_routed, admin_port, "invoice_grpc", ports[i]), f"Envoy routing to {ports[i]}")
            for i, env in enumerate(hook_envs):
                sidecars[i].process.send_signal(signal.SIGTERM)
                assert sidecars[i].process.wait(timeout=30) == 0
                sidecars[i] = start_webhooks(env, log=log)[0]
                wait_until(partial(_routed, admin_port, "webhooks", hook_ports[i]), f"Envoy routing to {hook_ports[i]}")
        time.sleep(1)
        stop.set()
        for w in workers:
            w.join()
        callers.join(timeout=60)
    finally:
        stop.set()
        envoy.stop()
        for part in (*servers, *sidecars):
            part.stop()
        log.close()
    return out


async def _recorded(database: str) -> list[str]:
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT stripe_invoice_id FROM invoices WHERE stripe_invoice_id LIKE 'in_roll%'")
        return sorted(r["stripe_invoice_id"] for r in rows)
    finally:
        await conn.close()


def test_a_rolling_restart_under_load_fails_no_call_and_loses_nothing(
    database: str, tmp_path: Path, localstripe: str
) -> None:
    rounds = int(os.environ.get("CHAOS_ROLLING_ROUNDS", "1"))
    rolled = _roll(database, tmp_path, localstripe, drain_s="2", rounds=rounds)
    figures = {
        "rounds": rounds,
        "rest_reads": dict(rolled.reads),
        "creates": dict(rolled.writes),
        "direct_grpc_reads": dict(rolled.direct),
        "deliveries": dict(rolled.deliveries),
        "events_sent": len(rolled.sent),
        "changes_seen_per_watcher": [len(w) for w in rolled.watched],
    }
    if "CHAOS_FIGURES" in os.environ:  # make chaos prints them
        Path(os.environ["CHAOS_FIGURES"]).write_text(json.dumps(figures))
    assert rolled.reads["200"] > 0 and rolled.writes["200"] > 0 and rolled.direct["OK"] > 0
    assert set(rolled.reads) == {"200"}, rolled.reads
    assert set(rolled.writes) == {"200"}, rolled.writes
    assert set(rolled.direct) == {"OK"}, rolled.direct
    # Every delivery answered 200 at its first try: none had to wait for Stripe's retry.
    assert rolled.deliveries == {"200": len(rolled.sent)}, rolled.deliveries
    assert asyncio.run(_recorded(database)) == sorted(rolled.sent)
    # Each watcher saw each recorded invoice once, in the order it was recorded.
    for watched in rolled.watched:
        assert watched == [(invoice, "paid") for invoice in rolled.sent]


def test_without_its_drain_a_rolling_restart_fails_calls(database: str, tmp_path: Path, localstripe: str) -> None:
    """The same restart with SHUTDOWN_DRAIN_S=0: the first case's rule is not met by luck."""
    rolled = _roll(database, tmp_path, localstripe, drain_s="0")
    assert set(rolled.writes) != {"200"}, rolled.writes
