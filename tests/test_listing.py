"""Listing at scale: keyset pages (AIP-158) beside the original page numbers, filters,
and the exact count kept by counters instead of a scan on every call."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from service.domain import STATUSES, Filters, StripeInvoice, User
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.storage import Storage
from tests.helpers import AUTH, make_invoice, save_invoice

BASE = datetime(2026, 11, 1, tzinfo=UTC)


async def _fill(store: Storage, n: int, start: int = 0) -> list[str]:
    """n invoices, a second apart, statuses and users cycling; their ids newest first."""
    ids = []
    for i in range(start, start + n):
        invoice = make_invoice(i, status=STATUSES[i % len(STATUSES)])
        ids.append((await save_invoice(store, invoice)).id)
    return ids[::-1]


async def _walk(
    stub: pb_grpc.InvoiceServiceAsyncStub, request: pb.ListInvoicesRequest
) -> list[pb.ListInvoicesResponse]:
    pages = [await stub.ListInvoices(request, metadata=AUTH)]
    while pages[-1].HasField("next_page_token"):
        request.page_token = pages[-1].next_page_token
        pages.append(await stub.ListInvoices(request, metadata=AUTH))
    return pages


async def test_token_pages_cover_every_invoice_once(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    expected = await _fill(store, 45)
    pages = await _walk(stub, pb.ListInvoicesRequest(limit=20))
    assert [len(p.invoices) for p in pages] == [20, 20, 5]
    assert [i.id for p in pages for i in p.invoices] == expected
    assert {p.count for p in pages} == {45}


async def test_a_page_number_answer_has_no_token(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    await _fill(store, 5)
    reply = await stub.ListInvoices(pb.ListInvoicesRequest(page=1, limit=2), metadata=AUTH)
    assert not reply.HasField("next_page_token")


async def test_token_pages_are_stable_under_concurrent_inserts(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage
) -> None:
    expected = await _fill(store, 30)
    first = await stub.ListInvoices(pb.ListInvoicesRequest(limit=10), metadata=AUTH)
    await _fill(store, 10, start=1000)  # newer than all: they belong before page 1
    rest = await _walk(stub, pb.ListInvoicesRequest(limit=10, page_token=first.next_page_token))
    assert [i.id for i in first.invoices] + [i.id for p in rest for i in p.invoices] == expected
    assert rest[-1].count == 40


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def test_filters_narrow_rows_and_count(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    await _fill(store, 40)
    invoices = [make_invoice(i, status=STATUSES[i % len(STATUSES)]) for i in range(40)]
    cases = [
        (pb.ListInvoicesRequest(status="paid"), [i for i in invoices if i.status == "paid"]),
        (pb.ListInvoicesRequest(user_id=invoices[7].user.id), [invoices[7]]),
        (
            pb.ListInvoicesRequest(
                created_after=_ts(BASE + timedelta(seconds=10)), created_before=_ts(BASE + timedelta(seconds=20))
            ),
            [i for i in invoices if BASE + timedelta(seconds=10) <= i.created_at < BASE + timedelta(seconds=20)],
        ),
        (
            pb.ListInvoicesRequest(status="open", created_after=_ts(BASE + timedelta(seconds=15))),
            [i for i in invoices if i.status == "open" and i.created_at >= BASE + timedelta(seconds=15)],
        ),
    ]
    for request, matching in cases:
        request.limit = 3
        pages = await _walk(stub, request)
        got = [i.invoice_id for p in pages for i in p.invoices]
        assert got == [i.stripe_invoice_id for i in sorted(matching, key=lambda i: i.created_at, reverse=True)]
        assert {p.count for p in pages} == {len(matching)}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListInvoicesRequest(page_token="not-a-token"), "page_token"),
        (pb.ListInvoicesRequest(page=2, page_token="eyJ0IjoxfQ"), "page"),
        (pb.ListInvoicesRequest(status="refunded"), "status"),
        (pb.ListInvoicesRequest(user_id="u" * 201), "user_id"),
        (pb.ListInvoicesRequest(created_after=_ts(BASE), created_before=_ts(BASE)), "created_before"),
    ],
)
async def test_bad_list_requests_name_the_field(
    stub: pb_grpc.InvoiceServiceAsyncStub, request_: pb.ListInvoicesRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListInvoices(request_, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}:")


def _forged(t: object, i: object) -> str:
    """A token as the service encodes one, for no filters, with a forger's fields."""
    data = {
        "t": t,
        "i": i,
        "f": Filters(status=None, user_id=None, created_after=None, created_before=None).fingerprint(),
    }
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "request_",
    [
        # Tokens that decode and carry the right fingerprint, but hold what Postgres refuses:
        # times that overflow when taken to UTC, a NUL in the id, an id of another type.
        pb.ListInvoicesRequest(page_token=_forged("9999-12-31T23:59:59-01:00", "0" * 24)),
        pb.ListInvoicesRequest(page_token=_forged("0001-01-01T00:00:00+01:00", "0" * 24)),
        pb.ListInvoicesRequest(page_token=_forged("2026-11-01T00:00:00+00:00", "\u0000" * 24)),
        pb.ListInvoicesRequest(page_token=_forged("2026-11-01T00:00:00+00:00", 7)),
        pb.ListInvoicesRequest(page_token=_forged("2026-11-01T00:00:00", "0" * 24)),
        # Deep nesting (json's recursion limit) within the length limit, past it, and not an object.
        pb.ListInvoicesRequest(page_token=base64.urlsafe_b64encode(b"[" * 380).decode()),
        pb.ListInvoicesRequest(page_token=base64.urlsafe_b64encode(b"[" * 1000).decode()),
        pb.ListInvoicesRequest(page_token=base64.urlsafe_b64encode(b"[1, 2]").decode()),
        # Timestamps a gRPC caller can send that no Timestamp may hold.
        pb.ListInvoicesRequest(created_after=timestamp_pb2.Timestamp(seconds=253402300800)),
        pb.ListInvoicesRequest(created_before=timestamp_pb2.Timestamp(seconds=-62135596801)),
        pb.ListInvoicesRequest(created_after=timestamp_pb2.Timestamp(seconds=0, nanos=-1)),
    ],
)
async def test_forged_tokens_and_impossible_times_are_invalid_arguments(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, request_: pb.ListInvoicesRequest
) -> None:
    await _fill(store, 3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListInvoices(request_, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    field = "page_token" if request_.page_token else request_.ListFields()[0][0].name
    assert (info.value.details() or "").startswith(f"{field}:")


async def test_a_token_does_not_serve_other_filters(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    await _fill(store, 12)
    first = await stub.ListInvoices(pb.ListInvoicesRequest(limit=1, status="paid"), metadata=AUTH)
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListInvoices(pb.ListInvoicesRequest(limit=2, page_token=first.next_page_token), metadata=AUTH)
    assert "other filters" in (info.value.details() or "")


async def _counts(pool: asyncpg.Pool) -> tuple[Counter[str], Counter[str]]:
    rows = Counter(
        {r["status"]: r["n"] for r in await pool.fetch("SELECT status, count(*) AS n FROM invoices GROUP BY status")}
    )
    kept = await pool.fetch("SELECT status, sum(n)::bigint AS n FROM invoice_counts GROUP BY status")
    return rows, Counter({r["status"]: r["n"] for r in kept if r["n"]})


async def test_counters_stay_exact_under_concurrent_writers(pool: asyncpg.Pool, store: Storage) -> None:
    """Sixteen writers create, advance, upsert and delete invoices at once; afterwards
    the counters agree with a full count, per status."""
    order = ["draft", "open", "uncollectible", "paid"]

    async def writer(w: int) -> None:
        rng = random.Random(w)  # noqa: S311 - reproducible, not secret
        for n in range(25):
            key = f"in_w{w:02d}n{n:03d}"
            for step, status in enumerate(order[: rng.randint(1, 4)]):
                user = User(id=f"u{w}", name="W")
                invoice = StripeInvoice(key, status, 100, "", user)
                await store.apply_stripe_invoice(invoice, stripe_time=step, event_id=f"evt_{key}_{step}")
            if rng.random() < 0.2:
                await store.apply_stripe_invoice(
                    StripeInvoice(key, "draft", 0, "", User("u", "")), stripe_time=9, event_type="invoice.deleted"
                )
            if rng.random() < 0.3:
                await save_invoice(store, make_invoice(w * 1000 + n))

    await asyncio.gather(*(writer(w) for w in range(16)))
    rows, kept = await _counts(pool)
    assert rows == kept
    assert sum(rows.values()) > 300
    await pool.execute("TRUNCATE invoices")
    assert await _counts(pool) == (Counter(), Counter())
