"""WatchInvoices on a gRPC server of the test's own, over the real Postgres, with the
limits and the moments the test chooses: the cap on open watches, a watcher too slow for
its buffer, the drain at shutdown, and the reader's pruning."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.domain import StripeInvoice, User
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import GrpcServer, start_grpc
from service.storage import Storage
from service.watch import Watches, WatchLimits
from tests.helpers import API_KEY, AUTH, Watcher, make_invoice, open_watch, poll_until, save_invoices


async def _open_invoice(store: Storage, stripe_id: str) -> None:
    invoice = StripeInvoice(stripe_id, "open", 5000, "", User("u1", "Ada"), "eur", 1_700_000_000)
    await store.apply_stripe_invoice(invoice, stripe_time=1)


async def _server(store: Storage, limits: WatchLimits) -> tuple[GrpcServer, Watches]:
    watches = Watches(store, limits)
    watches.start()
    return await start_grpc(store, [API_KEY], "127.0.0.1:0", watches=watches), watches


async def test_beyond_the_cap_a_watch_is_resource_exhausted(store: Storage) -> None:
    running, _ = await _server(store, WatchLimits(max_streams=3, poll_s=0.1))
    opened: list[Watcher] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            for _ in range(3):
                await open_watch(stub, opened)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.WatchInvoices(pb.WatchInvoicesRequest(), metadata=AUTH):
                    pass
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            opened.pop().close()
            await asyncio.sleep(0.2)
            await open_watch(stub, opened)  # a slot freed is a slot again
            for watcher in opened:
                watcher.close()
    finally:
        await running.stop(0)


async def test_a_slow_watcher_is_ended_and_resumes_without_loss(store: Storage) -> None:
    running, _ = await _server(store, WatchLimits(buffer=20, poll_s=0.05))
    opened: list[Watcher] = []
    # No window growth: the server's sends block once 64 KiB are unread.
    options = [("grpc.http2.bdp_probe", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            call = stub.WatchInvoices(pb.WatchInvoicesRequest(), metadata=AUTH)
            first = await call.read()
            assert isinstance(first, pb.InvoiceEvent)
            invoices = [make_invoice(n) for n in range(1500)]
            await save_invoices(store, invoices)
            await asyncio.sleep(1)  # the reader hands them out; this watcher reads none
            received: list[pb.InvoiceEvent] = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (event := await call.read()) is not grpc.aio.EOF:
                    assert isinstance(event, pb.InvoiceEvent)
                    if event.kind != pb.InvoiceEvent.KIND_BOOKMARK:
                        received.append(event)
            assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "resume" in (ended.value.details() or "")
            assert 0 < len(received) < len(invoices)
            watcher, _ = await open_watch(stub, opened, resume_token=received[-1].resume_token)
            rest = await watcher.changes(len(invoices) - len(received))
            ids = [e.invoice.id for e in received + rest]
            assert ids == [invoice.id for invoice in invoices]
            watcher.close()
    finally:
        await running.stop(0)


async def test_shutdown_ends_watches_unavailable_after_the_drain(store: Storage) -> None:
    running, watches = await _server(store, WatchLimits(poll_s=0.05))
    opened: list[Watcher] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        watcher, _ = await open_watch(stub, opened)
        stopping = asyncio.create_task(running.stop(5, drain_delay=1))
        await asyncio.sleep(0.3)
        # Still served during the drain: a change made now reaches the watcher.
        await _open_invoice(store, "in_drain1")
        (during,) = await watcher.changes(1)
        assert during.invoice.invoice_id == "in_drain1"
        error = await watcher.ended()
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume" in (error.details() or "")
        await stopping
    assert watches.open_streams == 0


async def test_the_reader_prunes_what_is_older_than_the_retention(store: Storage) -> None:
    running, _ = await _server(store, WatchLimits(poll_s=0.05, retention_s=0.5, prune_every_s=0.2))
    opened: list[Watcher] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            watcher, _ = await open_watch(stub, opened)
            await _open_invoice(store, "in_pruned1")
            await _open_invoice(store, "in_pruned2")
            first, _ = await watcher.changes(2)
            watcher.close()

            async def refused() -> grpc.StatusCode | None:
                try:
                    async for _ in stub.WatchInvoices(
                        pb.WatchInvoicesRequest(resume_token=first.resume_token), metadata=AUTH
                    ):
                        return None
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return None

            assert await poll_until(refused, "the first change pruned") == grpc.StatusCode.OUT_OF_RANGE
            async with store._connection() as conn:
                assert await conn.fetchval("SELECT count(*) FROM invoice_changes") == 0
    finally:
        await running.stop(0)
