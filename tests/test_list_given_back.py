"""ListInvoices' given_back filter: invoices with money given back (refunded or credited by
their issued credit notes) or without, alone and with the other filters, paged by number and
by token, with the exact count the counters keep (migration 0013). Credit notes reach the
records through the store's own path (the one webhooks and RefundInvoice take); lists go
through the real gRPC server, and over REST through the real Envoy."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from datetime import timedelta

import asyncpg
import grpc
import httpx
import pytest

from service import storage
from service.credit_notes import NoteStatus, StripeCreditNote
from service.domain import STATUSES, Filters, Invoice, StripeInvoice
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.storage import Storage, migrations
from tests.helpers import AUTH, make_invoice, save_invoice
from tests.test_listing import BASE, _ts, _walk

# Which of the 15 invoices get credit notes, and how: (amount, refunded, out of band) per
# note, a voided note as None. 8's only note is voided, so it ends with nothing given back.
NOTES: dict[int, list[tuple[int, int, int] | None]] = {
    1: [(50, 50, 0)],  # refunded to the payment
    3: [(30, 0, 0)],  # credited to the customer's balance
    6: [(20, 0, 20)],  # given outside Stripe
    7: [(40, 10, 0), None],  # part refunded; a second note voided
    8: [None],
    12: [(100, 100, 0)],
}
GIVEN_BACK = {1, 3, 6, 7, 12}


def _note(invoice: Invoice, n: int, given: tuple[int, int, int] | None) -> StripeCreditNote:
    amount, refunded, out_of_band = given or (25, 0, 0)
    return StripeCreditNote(
        id=f"cn_{invoice.stripe_invoice_id[3:]}n{n}",
        stripe_invoice_id=invoice.stripe_invoice_id,
        status=NoteStatus.ISSUED,
        amount=amount,
        refunded=refunded,
        credited=amount - refunded - out_of_band,
        out_of_band=out_of_band,
        reason="order_change",
        memo="",
    )


async def _give_back(store: Storage, invoice: Invoice, notes: list[tuple[int, int, int] | None]) -> None:
    """Issues each note; a None note is issued, then voided (at a later Stripe second)."""
    for n, given in enumerate(notes):
        note = _note(invoice, n, given)
        await store.apply_stripe_credit_note(note, stripe_time=1)
        if given is None:
            await store.apply_stripe_credit_note(_voided(note), stripe_time=2)


def _voided(note: StripeCreditNote) -> StripeCreditNote:
    return StripeCreditNote(
        note.id, note.stripe_invoice_id, NoteStatus.VOID, note.amount, 0, 0, 0, note.reason, note.memo
    )


async def _fill(store: Storage) -> list[Invoice]:
    """15 invoices a second apart, statuses cycling, money given back as NOTES says."""
    invoices = [make_invoice(i, status=STATUSES[i % len(STATUSES)]) for i in range(15)]
    for i, invoice in enumerate(invoices):
        await save_invoice(store, invoice)
        await _give_back(store, invoice, NOTES.get(i, []))
    return invoices


def _newest_first(invoices: list[Invoice], keep: set[int]) -> list[str]:
    return [invoices[i].stripe_invoice_id for i in sorted(keep, reverse=True)]


async def test_given_back_narrows_rows_and_count_with_every_filter(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage
) -> None:
    invoices = await _fill(store)
    every = set(range(15))
    paid = {i for i in every if invoices[i].status == "paid"}
    assert paid & GIVEN_BACK and paid - GIVEN_BACK  # the combination narrows both ways
    late = {i for i in every if invoices[i].created_at >= BASE + timedelta(seconds=5)}
    cases = [
        (pb.ListInvoicesRequest(given_back=True), GIVEN_BACK),
        (pb.ListInvoicesRequest(given_back=False), every - GIVEN_BACK),
        (pb.ListInvoicesRequest(given_back=True, status="paid"), paid & GIVEN_BACK),
        (pb.ListInvoicesRequest(given_back=False, status="paid"), paid - GIVEN_BACK),
        (pb.ListInvoicesRequest(given_back=True, user_id=invoices[3].user.id), {3}),
        (pb.ListInvoicesRequest(given_back=False, user_id=invoices[3].user.id), set()),
        (pb.ListInvoicesRequest(given_back=True, created_after=_ts(BASE + timedelta(seconds=5))), late & GIVEN_BACK),
        (pb.ListInvoicesRequest(given_back=False, created_after=_ts(BASE + timedelta(seconds=5))), late - GIVEN_BACK),
    ]
    for request, keep in cases:
        request.limit = 2
        pages = await _walk(stub, request)
        assert [i.invoice_id for p in pages for i in p.invoices] == _newest_first(invoices, keep), request
        assert {p.count for p in pages} == {len(keep)}, request
        assert all((i.amount_credited != 0) == request.given_back for p in pages for i in p.invoices)


async def test_given_back_pages_by_number(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    invoices = await _fill(store)
    expected = _newest_first(invoices, GIVEN_BACK)
    for number in (1, 2, 3, 4):
        reply = await stub.ListInvoices(pb.ListInvoicesRequest(given_back=True, page=number, limit=2), metadata=AUTH)
        assert [i.invoice_id for i in reply.invoices] == expected[(number - 1) * 2 : number * 2]
        assert reply.count == len(GIVEN_BACK)
        assert not reply.HasField("next_page_token")


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (pb.ListInvoicesRequest(given_back=True), pb.ListInvoicesRequest()),
        (pb.ListInvoicesRequest(given_back=True), pb.ListInvoicesRequest(given_back=False)),
        (pb.ListInvoicesRequest(), pb.ListInvoicesRequest(given_back=False)),
        (pb.ListInvoicesRequest(status="draft", given_back=False), pb.ListInvoicesRequest(status="draft")),
    ],
)
async def test_a_token_serves_only_the_given_back_it_was_issued_for(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, first: pb.ListInvoicesRequest, then: pb.ListInvoicesRequest
) -> None:
    await _fill(store)
    request = pb.ListInvoicesRequest(limit=1)
    request.MergeFrom(first)
    token = (await stub.ListInvoices(request, metadata=AUTH)).next_page_token
    assert token
    request = pb.ListInvoicesRequest(limit=1, page_token=token)
    request.MergeFrom(then)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListInvoices(request, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "other filters" in (info.value.details() or "")


def test_tokens_issued_before_given_back_keep_their_fingerprint() -> None:
    """A token in flight across the deploy that added given_back carries the fingerprint of
    the filters' repr before it: unset, given_back leaves that unchanged."""
    before = "Filters(status='paid', user_id=None, created_after=None, created_before=None)"
    assert Filters(status="paid").fingerprint() == hashlib.sha256(before.encode()).hexdigest()[:16]
    assert Filters(status="paid", given_back=False).fingerprint() != Filters(status="paid").fingerprint()


async def _kept(pool: asyncpg.Pool) -> tuple[Counter[tuple[str, bool]], Counter[tuple[str, bool]]]:
    """Invoices per (status, money given back) as the rows say, and as the counters do."""
    rows = await pool.fetch("SELECT status, amount_credited <> 0 AS g, count(*) AS n FROM invoices GROUP BY status, g")
    kept = await pool.fetch("SELECT status, given_back AS g, sum(n)::bigint AS n FROM invoice_counts GROUP BY 1, 2")
    return (
        Counter({(r["status"], r["g"]): r["n"] for r in rows}),
        Counter({(r["status"], r["g"]): r["n"] for r in kept if r["n"]}),
    )


async def test_counters_follow_money_given_back_and_taken_away(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, pool: asyncpg.Pool
) -> None:
    invoices = await _fill(store)
    rows, kept = await _kept(pool)
    assert rows == kept
    assert sum(n for (_, g), n in kept.items() if g) == len(GIVEN_BACK)
    # The last note of 3 voided, a note on 0 issued, 12 deleted in Stripe, a status change on 1.
    await store.apply_stripe_credit_note(_voided(_note(invoices[3], 0, NOTES[3][0])), stripe_time=5)
    await _give_back(store, invoices[0], [(10, 0, 0)])
    deleted = StripeInvoice(invoices[12].stripe_invoice_id, "draft", 0, "", invoices[12].user)
    await store.apply_stripe_invoice(deleted, stripe_time=9, event_type="invoice.deleted")
    moved = StripeInvoice(invoices[1].stripe_invoice_id, "void", invoices[1].amount, "", invoices[1].user)
    await store.apply_stripe_invoice(moved, stripe_time=9)
    rows, kept = await _kept(pool)
    assert rows == kept
    now = (GIVEN_BACK - {3, 12}) | {0}
    for given_back, status, keep in [
        (True, "", now),
        (False, "", set(range(15)) - now - {12}),
        (True, "void", {i for i in now if i == 1 or invoices[i].status == "void"}),
    ]:
        reply = await stub.ListInvoices(pb.ListInvoicesRequest(given_back=given_back, status=status), metadata=AUTH)
        assert reply.count == len(keep), (given_back, status)
        assert {i.invoice_id for i in reply.invoices} == {invoices[i].stripe_invoice_id for i in keep}


async def test_the_migration_counts_money_given_back_before_it(postgres: str) -> None:
    """Invoices given money back under migration 0012's counters (status alone) are counted
    by given_back once 0013 has run."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        pool = await asyncpg.create_pool(storage.with_database(postgres, name), min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await migrations.migrate(conn, to=12)
            store = Storage(pool)
            invoices = [make_invoice(i, status=STATUSES[i % len(STATUSES)]) for i in range(6)]
            for i, invoice in enumerate(invoices):
                await save_invoice(store, invoice)
                await _give_back(store, invoice, NOTES.get(i, []))
            async with pool.acquire() as conn:
                assert await migrations.migrate(conn) == list(range(13, migrations.latest() + 1))
            rows, kept = await _kept(pool)
            assert rows == kept
            assert sum(n for (_, g), n in kept.items() if g) == len(GIVEN_BACK & set(range(6)))
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_given_back_over_rest(http: httpx.AsyncClient, stack_store: Storage) -> None:
    invoices = await _fill(stack_store)
    paid = {i for i in range(15) if invoices[i].status == "paid"}
    for params, keep in [
        ({"givenBack": "true"}, GIVEN_BACK),
        ({"givenBack": "false"}, set(range(15)) - GIVEN_BACK),
        ({"givenBack": "true", "status": "paid"}, paid & GIVEN_BACK),
        ({"givenBack": "false", "status": "paid"}, paid - GIVEN_BACK),
    ]:
        got: list[str] = []
        query: dict[str, str] = {**params, "limit": "2"}
        for _ in range(10):  # at most 8 pages of 2
            reply = await http.get("/admin/api/invoices", params=query)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["count"] == len(keep), params
            got += [i["invoiceId"] for i in body["invoices"]]
            if "nextPageToken" not in body:
                break
            query["pageToken"] = body["nextPageToken"]
        assert got == _newest_first(invoices, keep), params
    by_number = await http.get("/admin/api/invoices", params={"givenBack": "true", "page": 2, "limit": 2})
    assert [i["invoiceId"] for i in by_number.json()["invoices"]] == _newest_first(invoices, GIVEN_BACK)[2:4]


async def test_a_given_back_that_is_not_a_boolean_is_400_json(http: httpx.AsyncClient, stack_store: Storage) -> None:
    reply = await http.get("/admin/api/invoices", params={"givenBack": "maybe"})
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["code"] == 3
    assert body["message"].startswith("given_back:") and "maybe" in body["message"], body
