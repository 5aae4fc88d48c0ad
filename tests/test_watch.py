"""WatchInvoices against the real Postgres and the real gRPC server: what a watcher sees,
in which order, how it resumes, what it is refused, and that the feed stays in order when
two transactions would interleave their changes to one record."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from service.domain import StripeInvoice, User
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.storage import Storage
from tests.helpers import AUTH, Watcher, make_invoice, open_watch, save_invoices

Event = pb.InvoiceEvent
KIND = pb.InvoiceEvent.Kind.Name


def _stripe(invoice_id: str, status: str, amount: int = 5000, user: str = "u1") -> StripeInvoice:
    return StripeInvoice(invoice_id, status, amount, "", User(user, "Ada"), "eur", 1_700_000_000)


async def _apply(store: Storage, invoice: StripeInvoice, at: int) -> None:
    await store.apply_stripe_invoice(invoice, stripe_time=at)


@pytest.fixture
async def watch(stub: pb_grpc.InvoiceServiceAsyncStub) -> AsyncIterator[list[Watcher]]:
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        watcher.close()


async def test_a_watcher_sees_each_change_with_the_record_it_left(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, watch: list[Watcher]
) -> None:
    watcher, first = await open_watch(stub, watch)
    assert first.kind == Event.KIND_BOOKMARK and first.resume_token and not first.HasField("invoice")

    await _apply(store, _stripe("in_watch1", "draft", 0), 1)
    await _apply(store, _stripe("in_watch1", "open"), 2)
    await _apply(store, _stripe("in_watch1", "paid"), 3)
    await store.apply_stripe_invoice(_stripe("in_watch2", "draft"), stripe_time=1)
    await store.apply_stripe_invoice(
        _stripe("in_watch2", "draft"), stripe_time=2, event_id="evt_del1", event_type="invoice.deleted"
    )

    seen = await watcher.changes(5)
    assert [(KIND(e.kind), e.invoice.invoice_id, e.invoice.status) for e in seen] == [
        ("KIND_CREATED", "in_watch1", "draft"),
        ("KIND_UPDATED", "in_watch1", "open"),
        ("KIND_UPDATED", "in_watch1", "paid"),
        ("KIND_CREATED", "in_watch2", "draft"),
        ("KIND_DELETED", "in_watch2", "draft"),
    ]
    paid = seen[2]
    record = await stub.GetInvoice(pb.GetInvoiceRequest(id="in_watch1"), metadata=AUTH)
    assert paid.invoice == record  # the same Invoice message as Get
    assert paid.change_time.ToDatetime(UTC) > datetime.now(UTC) - timedelta(minutes=1)
    assert len({e.resume_token for e in seen}) == 5


async def test_a_resumed_watch_gets_exactly_what_came_after_its_token(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, watch: list[Watcher]
) -> None:
    watcher, _ = await open_watch(stub, watch)
    for n in range(3):
        await _apply(store, _stripe(f"in_resume{n}", "open"), 1)
    third = (await watcher.changes(3))[2]
    watcher.close()

    for n in range(3, 8):
        await _apply(store, _stripe(f"in_resume{n}", "open"), 1)
    await _apply(store, _stripe("in_resume0", "paid"), 2)

    resumed, _ = await open_watch(stub, watch, resume_token=third.resume_token)
    later = await resumed.changes(6)
    assert [(e.invoice.invoice_id, e.invoice.status) for e in later] == [
        *((f"in_resume{n}", "open") for n in range(3, 8)),
        ("in_resume0", "paid"),
    ]
    # Then live, with nothing replayed twice.
    await _apply(store, _stripe("in_resume9", "open"), 1)
    (live,) = await resumed.changes(1)
    assert live.invoice.invoice_id == "in_resume9"
    assert resumed.events.empty()

    # A replay narrowed to one invoice, named by either id.
    record = await stub.GetInvoice(pb.GetInvoiceRequest(id="in_resume0"), metadata=AUTH)
    for name in ("in_resume0", record.id):
        narrowed, _ = await open_watch(stub, watch, resume_token=third.resume_token, invoice_id=name)
        (only,) = await narrowed.changes(1)
        assert (only.invoice.invoice_id, only.invoice.status) == ("in_resume0", "paid")


async def test_filters_narrow_a_watch(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, watch: list[Watcher]
) -> None:
    by_invoice, _ = await open_watch(stub, watch, invoice_id="in_filter1")
    by_user, _ = await open_watch(stub, watch, user_id="u2")
    paid, _ = await open_watch(stub, watch, status="paid")
    await _apply(store, _stripe("in_filter1", "open", user="u1"), 1)
    await _apply(store, _stripe("in_filter2", "open", user="u2"), 1)
    await _apply(store, _stripe("in_filter2", "paid", user="u2"), 2)
    await _apply(store, _stripe("in_filter1", "paid", user="u1"), 2)

    assert [(e.invoice.invoice_id, e.invoice.status) for e in await by_invoice.changes(2)] == [
        ("in_filter1", "open"),
        ("in_filter1", "paid"),
    ]
    assert [(e.invoice.invoice_id, e.invoice.status) for e in await by_user.changes(2)] == [
        ("in_filter2", "open"),
        ("in_filter2", "paid"),
    ]
    assert [e.invoice.invoice_id for e in await paid.changes(2)] == ["in_filter2", "in_filter1"]
    # The record's own id filters as Stripe's does.
    record = await stub.GetInvoice(pb.GetInvoiceRequest(id="in_filter1"), metadata=AUTH)
    by_id, _ = await open_watch(stub, watch, invoice_id=record.id)
    await _apply(store, _stripe("in_filter1", "paid", amount=6000, user="u1"), 3)
    assert (await by_id.changes(1))[0].invoice.amount == 6000
    assert by_user.events.empty()


async def test_200_watchers_all_see_the_same_changes(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, watch: list[Watcher]
) -> None:
    watchers = [(await open_watch(stub, watch))[0] for _ in range(200)]
    for n in range(20):
        await _apply(store, _stripe(f"in_many{n}", "open"), 1)
    expected = [f"in_many{n}" for n in range(20)]
    for watcher in watchers:
        assert [e.invoice.invoice_id for e in await watcher.changes(20)] == expected


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        base64.urlsafe_b64encode(b'{"x": -1, "s": 0}').decode(),
        base64.urlsafe_b64encode(b'{"x": 1.5, "s": 0}').decode(),
        base64.urlsafe_b64encode(b'{"x": true, "s": 0}').decode(),
        base64.urlsafe_b64encode(b'{"x": 99999999999999999999, "s": 0}').decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"x": 5, "s": 7, "extra": [1]}').decode(),
        "x" * 600,
    ],
)
async def test_a_forged_token_is_invalid_argument(stub: pb_grpc.InvoiceServiceAsyncStub, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stub.WatchInvoices(pb.WatchInvoicesRequest(resume_token=token), metadata=AUTH):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume_token" in (refused.value.details() or "")


async def test_a_token_beyond_the_retention_is_out_of_range_and_one_beyond_the_feed_invalid(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, watch: list[Watcher]
) -> None:
    watcher, _ = await open_watch(stub, watch)
    await _apply(store, _stripe("in_old1", "open"), 1)
    old = (await watcher.changes(1))[0].resume_token
    await _apply(store, _stripe("in_old2", "open"), 1)
    recent = (await watcher.changes(1))[0].resume_token
    # Both changes pruned: the first's token has lost what followed it, the second's has not.
    assert await store.prune_changes(datetime.now(UTC) + timedelta(days=1), 10) == 2

    ahead = base64.urlsafe_b64encode(b'{"x":9000000000000,"s":1}').decode().rstrip("=")
    for token, code in ((old, grpc.StatusCode.OUT_OF_RANGE), (ahead, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchInvoices(pb.WatchInvoicesRequest(resume_token=token), metadata=AUTH):
                pass
        assert refused.value.code() == code
        assert "list, then watch again" in (refused.value.details() or "")
    _, first = await open_watch(stub, watch, resume_token=recent)
    assert first.kind == Event.KIND_BOOKMARK


async def test_without_a_key_a_watch_is_unauthenticated(stub: pb_grpc.InvoiceServiceAsyncStub) -> None:
    for metadata in ((), (("api-key", "wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchInvoices(pb.WatchInvoicesRequest(), metadata=metadata):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_filters_are_invalid_argument(stub: pb_grpc.InvoiceServiceAsyncStub) -> None:
    for request, field in (
        (pb.WatchInvoicesRequest(status="settled"), "status"),
        (pb.WatchInvoicesRequest(invoice_id="nope"), "invoice_id"),
        (pb.WatchInvoicesRequest(user_id="x\x00"), "user_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchInvoices(request, metadata=AUTH):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith(field)


async def test_a_writer_that_would_feed_a_records_changes_out_of_order_is_refused(
    store: Storage, database: str
) -> None:
    """Transaction A takes its id first (by any write), then changes the record after the
    younger B did: in transaction-id order A's change would be fed first and watchers
    would end on B's stale state. The trigger refuses A, to retry; the feed stays in order."""
    invoice = make_invoice(1, status="open")
    await save_invoices(store, [invoice])
    a, b = await asyncpg.connect(database), await asyncpg.connect(database)
    try:
        ta = a.transaction()
        await ta.start()
        await a.execute("SELECT pg_current_xact_id()")  # A has its id now
        await b.execute("UPDATE invoices SET status = 'paid' WHERE id = $1", invoice.id)
        with pytest.raises(asyncpg.SerializationError):
            await a.execute("UPDATE invoices SET status = 'void' WHERE id = $1", invoice.id)
        await ta.rollback()
        feed = await a.fetch("SELECT kind, status FROM invoice_changes WHERE id = $1 ORDER BY xact, seq", invoice.id)
    finally:
        await a.close()
        await b.close()
    assert [(r["kind"], r["status"]) for r in feed] == [("created", "open"), ("updated", "paid")]
