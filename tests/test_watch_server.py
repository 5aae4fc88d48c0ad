"""WatchInvoices on a gRPC server of the test's own, over the real Postgres, with the
limits the test chooses and the moments it waits for (the reader's reads, as its
follower hears them; the health status; the open-watch count), never for a sleep: a
change committing after a later one is never skipped (the reason feed positions are not
bare sequences), the cap on open watches, a watcher too slow for its buffer, the drain at
shutdown, and the reader's pruning."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.domain import StripeInvoice, User
from service.feed import FeedRead
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import GrpcServer, start_grpc
from service.storage import Storage
from service.watch import Watches, WatchLimits
from tests.helpers import API_KEY, AUTH, Watcher, make_invoice, open_watch, poll_until, save_invoices, until


async def _open_invoice(store: Storage, stripe_id: str) -> None:
    invoice = StripeInvoice(stripe_id, "open", 5000, "", User("u1", "Ada"), "eur", 1_700_000_000)
    await store.apply_stripe_invoice(invoice, stripe_time=1)


class FeedReads:
    """The reader's reads, followed as the record cache follows them (service/watch.py's
    Follower): each with the time its statement was sent."""

    def __init__(self) -> None:
        self.reads: list[tuple[FeedRead, float]] = []

    def applied(self, read: FeedRead, began: float) -> None:
        self.reads.append((read, began))

    def listening(self, on: bool) -> None:
        pass

    def clear(self) -> None:
        pass

    def held_since(self, since: float, record_id: str) -> bool:
        """Whether a read sent after `since` held `record_id` back."""
        return any(began > since and record_id in read.held for read, began in self.reads)

    def handed_out(self, record_id: str) -> bool:
        return any(c.invoice is not None and c.invoice.id == record_id for read, _ in self.reads for c in read.changes)


async def _server(store: Storage, limits: WatchLimits, follower: FeedReads | None = None) -> tuple[GrpcServer, Watches]:
    watches = Watches(store, limits, follower=follower)
    watches.start()
    return await start_grpc(store, [API_KEY], "127.0.0.1:0", watches=watches), watches


async def test_a_change_that_commits_after_a_later_one_is_not_skipped(store: Storage, database: str) -> None:
    """Transaction A writes its change first (the lower sequence number) and commits last.
    A reader that took positions as bare sequence numbers would hand out B's change,
    move past A's number, and never see A's. The reader is seen to read the feed with B
    committed and A open (B's record held back) before A commits."""
    reads = FeedReads()
    running, _ = await _server(store, WatchLimits(poll_s=0.05), follower=reads)
    opened: list[Watcher] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            watcher, _ = await open_watch(stub, opened)
            one, two = make_invoice(1), make_invoice(2)
            await save_invoices(store, [one, two])
            await watcher.changes(2)

            a, b = await asyncpg.connect(database), await asyncpg.connect(database)
            try:
                ta, tb = a.transaction(), b.transaction()
                await ta.start()
                await a.execute("UPDATE invoices SET status = 'void' WHERE id = $1", one.id)
                await tb.start()
                await b.execute("UPDATE invoices SET status = 'open' WHERE id = $1", two.id)
                await tb.commit()
                committed = time.monotonic()
                await until(lambda: reads.held_since(committed, two.id), "a read of the feed with B held back behind A")
                await ta.commit()
            finally:
                await a.close()
                await b.close()

            # Both, in the feed's order: A's change (the older transaction) first.
            seen = await watcher.changes(2)
            assert [(e.invoice.id, e.invoice.status) for e in seen] == [(one.id, "void"), (two.id, "open")]
            # And a watch resumed from the first of them still gets the second.
            resumed, _ = await open_watch(stub, opened, resume_token=seen[0].resume_token)
            (again,) = await resumed.changes(1)
            assert again.invoice.id == two.id
            for watcher in opened:
                watcher.close()
    finally:
        await running.stop(0)


async def test_beyond_the_cap_a_watch_is_resource_exhausted(store: Storage) -> None:
    running, watches = await _server(store, WatchLimits(max_streams=3, poll_s=0.1))
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
            await until(lambda: watches.open_streams == 2, "the cancelled watch's slot freed")
            await open_watch(stub, opened)  # a slot freed is a slot again
            for watcher in opened:
                watcher.close()
    finally:
        await running.stop(0)


async def test_a_slow_watcher_is_ended_and_resumes_without_loss(store: Storage) -> None:
    reads = FeedReads()
    running, _ = await _server(store, WatchLimits(buffer=20, poll_s=0.05), follower=reads)
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
            # The reader hands out the last of them while this watcher reads none: it can
            # only have got past the watch's 20 places by ending it.
            await until(lambda: reads.handed_out(invoices[-1].id), "the reader handing out every change")
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


# How long the server keeps serving after it reports NOT_SERVING, in the drain test.
DRAIN_S = 2.0


async def test_shutdown_ends_watches_unavailable_after_the_drain(store: Storage) -> None:
    running, watches = await _server(store, WatchLimits(poll_s=0.05))
    opened: list[Watcher] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        watcher, _ = await open_watch(stub, opened)
        began = time.monotonic()
        stopping = asyncio.create_task(running.stop(5, drain_delay=DRAIN_S))
        health = health_pb2_grpc.HealthStub(channel)

        async def draining() -> bool | None:
            answer = await health.Check(health_pb2.HealthCheckRequest())
            return answer.status == health_pb2.HealthCheckResponse.NOT_SERVING or None

        await poll_until(draining, "the server reporting NOT_SERVING")
        # Still served during the drain: a change made now reaches the watcher.
        await _open_invoice(store, "in_drain1")
        (during,) = await watcher.changes(1)
        assert during.invoice.invoice_id == "in_drain1"
        error = await watcher.ended()
        assert time.monotonic() - began >= DRAIN_S  # ended once the drain was over, not before
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
