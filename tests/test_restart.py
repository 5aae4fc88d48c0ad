"""SIGTERM to the server while REST and gRPC calls keep coming: health turns NOT_SERVING
first and calls are still served for the drain, in-flight calls finish, REST callers see nothing worse than
a 503 while no server is up (Envoy retries reads that the restart cuts off), and the
restarted server on the same port serves again; watchers resume on it and miss nothing.
And the webhook sidecar's own drain."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import httpx

from gateway.render import render
from service.config import Settings
from service.domain import StripeInvoice, User
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.storage import Storage
from tests.helpers import API_KEY, ResumingWatch, stack_env, until_caught_up, until_watching, wait_until
from tools.stack import free_port, start_envoy, start_service, start_webhooks


def _rest_load(url: str, stop: threading.Event, seen: Counter[str]) -> None:
    with httpx.Client(headers={"Api-Key": API_KEY}, timeout=10) as http:
        while not stop.is_set():
            try:
                seen[str(http.get(url).status_code)] += 1
            except httpx.HTTPError as exc:
                seen[type(exc).__name__] += 1


def _grpc_load(port: int, stop: threading.Event, seen: Counter[str]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        while not stop.is_set():
            try:
                stub.ListInvoices(pb.ListInvoicesRequest(page=1, limit=5), metadata=(("api-key", API_KEY),), timeout=5)
                seen["OK"] += 1
            except grpc.RpcError as exc:
                seen[exc.code().name] += 1
                time.sleep(0.05)


def _envoy_stat(admin_port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=^{name}$", timeout=5) as reply:
        line = reply.read().decode().strip()
    return int(line.rsplit(":", 1)[1])


def _wait_for_200(url: str, timeout: float = 20) -> None:
    def served() -> bool | None:
        return True if httpx.get(url, headers={"Api-Key": API_KEY}).status_code == 200 else None

    wait_until(served, "the gateway serving", timeout_s=timeout, interval_s=0.1)


def test_sigterm_under_load_drains_then_the_restarted_server_serves(database: str, tmp_path: Path) -> None:
    port = free_port()
    env = stack_env(database, tmp_path) | {"GRPC_PORT": str(port), "SHUTDOWN_DRAIN_S": "2", "SHUTDOWN_GRACE_S": "5"}
    log = (tmp_path / "stack.log").open("w")
    service, _ = start_service(env, log=log)
    config = render(Settings(), gateway_port=0, admin_port=0, grpc_port=port, webhook_port=free_port())
    envoy, gateway_port, admin_port = start_envoy(config, tmp_path / "envoy", log=log)
    url = f"http://127.0.0.1:{gateway_port}/admin/api/invoices?page=1&limit=5"
    try:
        _wait_for_200(url)
        stop = threading.Event()
        before, during = Counter[str](), Counter[str]()
        rest, direct = Counter[str](), Counter[str]()
        workers = [threading.Thread(target=_rest_load, args=(url, stop, rest)) for _ in range(4)]
        workers.append(threading.Thread(target=_grpc_load, args=(port, stop, direct)))
        for w in workers:
            w.start()
        time.sleep(1)
        before.update(rest)
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
        service, _ = start_service(env, log=log)
        _wait_for_200(url)
        during.update(rest)
        time.sleep(1)
        stop.set()
        for w in workers:
            w.join()
        assert before["200"] > 0
        assert set(rest) <= {"200", "503"}, rest
        # ...each failure retried as its route allows: Envoy's default limit of 3 retries at
        # a time passed the rest on unretried, and a CANCELLED reached a caller as 499.
        assert _envoy_stat(admin_port, "cluster.invoice_grpc.upstream_rq_retry_overflow") == 0
        assert rest["200"] > during["200"], "the restarted server serves REST calls"
        # Direct gRPC callers have no health-checking proxy in front: while no server is up
        # they see UNAVAILABLE, and a call that lands in the instant the listener closes is
        # CANCELLED by gRPC's core (seen about once in 600); both are safe to retry for reads.
        assert set(direct) <= {"OK", "UNAVAILABLE", "CANCELLED"}, direct
        assert direct["OK"] > 0
    finally:
        envoy.stop()
        service.stop()
        log.close()


async def test_watchers_resume_across_a_server_restart_and_miss_nothing(
    database: str, store: Storage, tmp_path: Path
) -> None:
    """Changes keep coming before, during and after the restart (the server is not needed
    to record them: the webhook sidecar does). Each watcher is ended with UNAVAILABLE by
    the drain, finds no server for a while, and resumes from its token on the new one."""
    port = free_port()
    env = stack_env(database, tmp_path) | {"GRPC_PORT": str(port), "SHUTDOWN_DRAIN_S": "1", "SHUTDOWN_GRACE_S": "5"}
    written: list[tuple[str, str]] = []
    with (tmp_path / "server.log").open("w") as log:
        service, _ = start_service(env, log=log)
        try:
            watchers = [ResumingWatch(f"127.0.0.1:{port}") for _ in range(5)]
            await until_watching(watchers)

            async def write(n: int) -> None:
                for status in ("draft", "open"):
                    invoice = StripeInvoice(f"in_restart{n:04d}", status, 100, "", User("u", "U"), "eur", 1)
                    await store.apply_stripe_invoice(invoice, stripe_time=1 if status == "draft" else 2)
                    written.append((invoice.stripe_invoice_id, status))

            for n in range(20):
                await write(n)
            service.process.send_signal(signal.SIGTERM)
            for n in range(20, 40):  # while the server drains, and while none is up
                await write(n)
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(service.process.wait, 30) == 0
            for n in range(40, 50):
                await write(n)
            service, _ = await asyncio.to_thread(start_service, env, log=log)
            for n in range(50, 60):
                await write(n)

            await until_caught_up(watchers, len(written))
            for watcher in watchers:
                await watcher.stop()
                assert watcher.ids == written
                assert watcher.ends["UNAVAILABLE"] >= 1, watcher.ends
        finally:
            service.stop()


def test_sigterm_to_the_sidecar_fails_readiness_first_and_still_answers_deliveries(
    database: str, tmp_path: Path
) -> None:
    """The webhook sidecar drains like the server: /healthz turns 503 so a health-checking
    proxy with other hosts stops sending, deliveries that still arrive are answered, then it
    exits cleanly."""
    env = stack_env(database, tmp_path) | {"SHUTDOWN_DRAIN_S": "6"}
    with (tmp_path / "webhooks.log").open("w") as log:
        webhooks, port = start_webhooks(env, log=log)
        base = f"http://127.0.0.1:{port}"
        try:
            assert httpx.get(f"{base}/healthz").status_code == 200
            webhooks.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 4
            while (health := httpx.get(f"{base}/healthz")).status_code == 200:
                assert time.monotonic() < deadline, "readiness still passes after SIGTERM"
                time.sleep(0.05)
            assert health.status_code == 503
            assert health.json()["message"] == "shutting down"
            unsigned = httpx.post(f"{base}/webhooks/stripe", content=b"{}")
            assert unsigned.status_code == 400, unsigned.text  # still served, and judged as before
            assert webhooks.process.wait(timeout=20) == 0
        finally:
            webhooks.stop()
