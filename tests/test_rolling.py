"""A rolling restart of two servers behind one Envoy, under REST reads and keyed Creates:
each server in turn gets SIGTERM, drains, exits, is restarted and becomes ready before the
next. With a replica always up, the rule is no failure at all. Writes are not retried by
Envoy (a POST), so a server that skipped its drain (answering UNAVAILABLE while Envoy still
sends it calls) would fail this test, as its second case shows."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

import httpx

from gateway.render import render
from service import payments
from service.config import Settings
from tests.helpers import API_KEY, stack_env, wait_until
from tools.stack import (
    LOCALSTRIPE_KEY,
    Part,
    customer_with_card,
    free_port,
    start_envoy,
    start_service,
    wait_until_serving,
)


def _routed(admin_port: int, port: int) -> bool | None:
    """Envoy's own view: the host is in its cluster and healthy (no health flag but healthy)."""
    clusters = httpx.get(f"http://127.0.0.1:{admin_port}/clusters", timeout=2).text
    return True if f"invoice_grpc::127.0.0.1:{port}::health_flags::healthy" in clusters else None


def _lists(base: str) -> bool | None:
    reply = httpx.get(f"{base}/admin/api/invoices?limit=1", headers={"Api-Key": API_KEY}, timeout=5)
    return True if reply.status_code == 200 else None


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


def _roll(database: str, tmp_path: Path, localstripe: str, drain_s: str) -> tuple[Counter[str], Counter[str]]:
    ports = [free_port(), free_port()]
    base_env = stack_env(database, tmp_path, localstripe) | {"SHUTDOWN_DRAIN_S": drain_s, "SHUTDOWN_GRACE_S": "10"}
    envs = [base_env | {"GRPC_PORT": str(p), "METRICS_PORT": "0"} for p in ports]
    log = (tmp_path / "stack.log").open("w")
    servers: list[Part] = [start_service(env, log=log)[0] for env in envs]
    config = render(Settings(), gateway_port=0, admin_port=0, grpc_port=ports, webhook_port=free_port())
    envoy, gateway_port, admin_port = start_envoy(config, tmp_path / "envoy", log=log)
    base = f"http://127.0.0.1:{gateway_port}"
    client = payments.client(LOCALSTRIPE_KEY, api_base=localstripe, timeout_s=10, max_retries=0)
    customer, method = asyncio.run(customer_with_card(client))
    reads, writes = Counter[str](), Counter[str]()
    stop = threading.Event()
    try:
        for port in ports:
            wait_until_serving(port)
        wait_until(partial(_lists, base), "Envoy routing to the servers")  # no sidecar here: not wait_until_routed
        workers = [
            threading.Thread(target=_reads, args=(f"{base}/admin/api/invoices?page=1&limit=5", stop, reads))
            for _ in range(3)
        ]
        workers += [threading.Thread(target=_creates, args=(base, customer, method, stop, writes)) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1)
        for i, env in enumerate(envs):
            servers[i].process.send_signal(signal.SIGTERM)
            assert servers[i].process.wait(timeout=30) == 0
            servers[i] = start_service(env, log=log)[0]
            wait_until_serving(ports[i])
            # Ready is when the load balancer sends it calls again, not when it says SERVING.
            wait_until(partial(_routed, admin_port, ports[i]), f"Envoy routing to {ports[i]} again")
        stop.set()
        for w in workers:
            w.join()
    finally:
        stop.set()
        envoy.stop()
        for server in servers:
            server.stop()
        log.close()
    return reads, writes


def test_a_rolling_restart_under_reads_and_keyed_creates_fails_no_call(
    database: str, tmp_path: Path, localstripe: str
) -> None:
    reads, writes = _roll(database, tmp_path, localstripe, drain_s="2")
    assert reads["200"] > 0 and writes["200"] > 0
    assert set(reads) == {"200"}, reads
    assert set(writes) == {"200"}, writes


def test_without_its_drain_a_rolling_restart_fails_calls(database: str, tmp_path: Path, localstripe: str) -> None:
    """The same restart with SHUTDOWN_DRAIN_S=0: the first case's rule is not met by luck."""
    reads, writes = _roll(database, tmp_path, localstripe, drain_s="0")
    assert set(reads) | set(writes) != {"200"}, (reads, writes)
