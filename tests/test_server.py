"""The server as its operators and grpcurl users meet it: health, reflection, graceful
shutdown, and the `python -m service` process itself."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import become_ready
from service.config import Settings
from service.domain import Invoice, InvoicePage, Page, Unavailable
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import SERVICE_NAME, GrpcServer, start_grpc
from service.metrics import METRICS, Metrics, ready
from service.storage import Storage
from tests.helpers import API_KEY, AUTH, make_invoice, save_invoice, stack_env

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


async def test_health_is_open_and_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _grpcurl(port: int, *verb: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Runs `grpcurl -plaintext [flags] 127.0.0.1:port verb...` as a person would."""
    return subprocess.run(
        [GRPCURL, "-plaintext", *flags, f"127.0.0.1:{port}", *verb],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_grpcurl_lists_by_reflection_and_calls_get(server: GrpcServer, store: Storage) -> None:
    saved = await save_invoice(store, make_invoice(5))
    listed = await asyncio.to_thread(_grpcurl, server.port, "list")
    assert listed.returncode == 0, listed.stderr
    assert SERVICE_NAME in listed.stdout.split()
    described = await asyncio.to_thread(_grpcurl, server.port, "describe", SERVICE_NAME)
    assert "rpc GetInvoice" in described.stdout
    # A method by its name, as a person debugging one types it (grpc/grpc#34743).
    method = await asyncio.to_thread(_grpcurl, server.port, "describe", f"{SERVICE_NAME}.GetInvoice")
    assert method.returncode == 0, method.stderr
    assert f"{SERVICE_NAME}.GetInvoice is a method:" in method.stdout
    assert "rpc GetInvoice ( .billing.v1.GetInvoiceRequest ) returns ( .billing.v1.Invoice )" in method.stdout
    # A name that is nothing is still NOT_FOUND, not an error of the server's.
    unknown = await asyncio.to_thread(_grpcurl, server.port, "describe", f"{SERVICE_NAME}.NoSuchMethod")
    assert unknown.returncode != 0
    assert "Symbol not found" in unknown.stderr

    flags = ("-H", f"api-key: {API_KEY}", "-d", json.dumps({"id": saved.id}))
    got = await asyncio.to_thread(_grpcurl, server.port, f"{SERVICE_NAME}/GetInvoice", flags=flags)
    assert got.returncode == 0, got.stderr
    body = json.loads(got.stdout)
    assert body["_id"] == saved.id
    # grpcurl prints proto field names unless a json_name is set explicitly, as for _id.
    assert body["invoice_id"] == "in_test000005"
    assert body["amount"] == 600

    refused = await asyncio.to_thread(_grpcurl, server.port, f"{SERVICE_NAME}/ListInvoices", flags=("-d", "{}"))
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr


class SlowStore:
    """Isolates shutdown from storage: each read takes a known time."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = asyncio.Event()

    async def list_invoices(self, page: Page) -> InvoicePage:
        self.started.set()
        await asyncio.sleep(self.delay)
        return InvoicePage(invoices=[], total=42)

    async def get_invoice(self, key: str) -> Invoice:
        raise NotImplementedError


async def test_stop_drains_in_flight_calls_and_reports_not_serving_first() -> None:
    store = SlowStore(delay=1.0)
    running = await start_grpc(store, [API_KEY], "127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.ListInvoices(pb.ListInvoicesRequest(), metadata=AUTH))
        await store.started.wait()
        stopping = asyncio.ensure_future(running.stop(grace=10, drain_delay=0.5))
        await asyncio.sleep(0.1)
        health = health_pb2_grpc.HealthStub(channel)
        status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        reply = await in_flight
        assert reply.count == 42
        await stopping


async def test_calls_are_refused_until_first_ready_and_still_served_while_draining() -> None:
    """Health checks keep Envoy away from a server that is not ready; the gate keeps away a
    caller that skips them. Once open it stays open, so the shutdown drain serves."""
    running = await start_grpc(SlowStore(delay=0), [API_KEY], "127.0.0.1:0", ready=False)
    seen: list[str] = []

    async def list_details() -> str:
        try:
            await stub.ListInvoices(pb.ListInvoicesRequest(), metadata=AUTH)
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        return "OK"

    async def prepare() -> None:
        """Each attempt first records what a caller is told after the attempt before."""
        seen.append(await list_details())
        if len(seen) == 1:
            raise ValueError("invalid literal for int() with base 10: 'hunter2'")
        if len(seen) == 2:
            raise Unavailable("the schema is not migrated to version 3 yet (it is at 2)")
        if len(seen) == 3:
            raise Unavailable("the invoice store is unavailable; retry later")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        await become_ready(prepare, running, retry_s=0)
        assert seen == [
            "UNAVAILABLE: not ready: starting; retry later",
            "UNAVAILABLE: not ready: the database is not ready yet; retry later",  # not the ValueError's text
            "UNAVAILABLE: not ready: the schema is not migrated to version 3 yet (it is at 2); retry later",
            "UNAVAILABLE: not ready: the invoice store is unavailable; retry later",  # said once
        ]
        assert await list_details() == "OK"
        stopping = asyncio.ensure_future(running.stop(grace=5, drain_delay=2.0))
        await asyncio.sleep(0.1)
        assert await list_details() == "OK"  # NOT_SERVING, but a late call is still served
        await stopping


def test_sigterm_stops_the_process_cleanly(database: str, tmp_path: Path) -> None:
    # `python -m service` with no subcommand, as an operator starts it: the default is serve.
    env = stack_env(database, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("HTTP  metrics"), line
        line = proc.stdout.readline()
        assert "InvoiceService" in line, line
        port = int(line.rsplit(":", 1)[1])
        listed = _grpcurl(port, "list")
        assert SERVICE_NAME in listed.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert API_KEY not in (proc.stderr.read() if proc.stderr else "")
    finally:
        proc.kill()


def test_a_pool_floor_above_its_ceiling_is_refused_at_start() -> None:
    """Else the warm-up would wait forever for a connection the pool may not open."""
    with pytest.raises(pydantic.ValidationError, match=r"DB_POOL_MIN_SIZE \(3\) exceeds DB_POOL_MAX_SIZE \(2\)"):
        Settings(db_pool_min_size=3, db_pool_max_size=2)


async def test_readiness_failures_are_logged_without_what_could_quote_a_dsn(
    server: GrpcServer, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = 0

    async def prepare() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ValueError("invalid literal for int() with base 10: 'hunter2'")
        if attempts == 31:
            raise Unavailable("the schema is at version 2, this code needs 3")
        if attempts < 32:
            raise OSError("connection refused")

    await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await become_ready(prepare, server, retry_s=0)
    assert attempts == 32
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not ready")]
    assert logged == ["not ready: ValueError", "not ready: Unavailable: the schema is at version 2, this code needs 3"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        status = (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_readyz_says_what_the_grpc_health_service_says(store: Storage) -> None:
    """GET /readyz on the metrics port, for a probe that cannot speak TLS to the gRPC port."""
    metrics = Metrics()
    app = web.Application()
    app.router.add_get("/readyz", ready)
    app[METRICS] = metrics
    running = await start_grpc(store, [API_KEY], "127.0.0.1:0", ready=False, metrics=metrics)
    async with TestServer(app) as site, aiohttp.ClientSession() as http:

        async def readyz() -> tuple[int, str]:
            async with http.get(site.make_url("/readyz")) as reply:
                return reply.status, (await reply.json())["status"]

        assert await readyz() == (503, "NOT_SERVING")
        await running.set_serving()
        assert await readyz() == (200, "SERVING")
        await running.stop(grace=0)  # the drain says NOT_SERVING first, here too
        assert await readyz() == (503, "NOT_SERVING")
