"""InvoiceService over a real grpc.aio channel, against the real server on a real Postgres."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service import pagetoken
from service.domain import Page, new_record_id
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import start_grpc
from service.storage import Storage
from tests.helpers import (
    ADDED_INVOICE_KEYS,
    API_KEY,
    AUTH,
    ROTATED_KEY,
    has_shape,
    json_shape,
    make_invoice,
    save_invoice,
)

FIXTURES = Path(__file__).parent / "fixtures"
RFC3339_MILLIS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def _fill(store: Storage, n: int) -> list[str]:
    """Saves n invoices; returns their ids newest first, the order lists use."""
    ids = [(await save_invoice(store, make_invoice(i))).id for i in range(n)]
    return ids[::-1]


async def _rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_list_of_an_empty_table(stub: pb_grpc.InvoiceServiceAsyncStub) -> None:
    reply = await stub.ListInvoices(pb.ListInvoicesRequest(page=1, limit=10), metadata=AUTH)
    assert list(reply.invoices) == []
    assert reply.count == 0


async def test_pages_cover_every_invoice_once_newest_first(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage
) -> None:
    expected = await _fill(store, 45)
    seen: list[str] = []
    for page, size in ((1, 20), (2, 20), (3, 5)):
        reply = await stub.ListInvoices(pb.ListInvoicesRequest(page=page, limit=20), metadata=AUTH)
        assert reply.count == 45, "count is the total, not the page length"
        assert len(reply.invoices) == size
        seen += [i.id for i in reply.invoices]
    assert seen == expected
    past_end = await stub.ListInvoices(pb.ListInvoicesRequest(page=4, limit=20), metadata=AUTH)
    assert list(past_end.invoices) == []
    assert past_end.count == 45


async def test_page_and_limit_default_when_absent(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    expected = await _fill(store, 25)
    reply = await stub.ListInvoices(pb.ListInvoicesRequest(), metadata=AUTH)
    assert [i.id for i in reply.invoices] == expected[:20]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListInvoicesRequest(page=0, limit=10), "page"),
        (pb.ListInvoicesRequest(page=-3, limit=10), "page"),
        (pb.ListInvoicesRequest(page=1, limit=0), "limit"),
        (pb.ListInvoicesRequest(page=1, limit=101), "limit"),
        (pb.ListInvoicesRequest(page=1, limit=-1), "limit"),
    ],
)
async def test_bad_pages_are_invalid_arguments_naming_the_field(
    stub: pb_grpc.InvoiceServiceAsyncStub, request_: pb.ListInvoicesRequest, field: str
) -> None:
    error = await _rpc_error(stub.ListInvoices(request_, metadata=AUTH))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{field}:")
    status = rpc_status.from_call(error)
    assert status is not None
    violation = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violation)
    assert violation.field_violations[0].field == field


async def test_get_by_own_id_and_by_stripe_id(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    saved = await save_invoice(store, make_invoice(7))
    by_id = await stub.GetInvoice(pb.GetInvoiceRequest(id=saved.id), metadata=AUTH)
    by_stripe_id = await stub.GetInvoice(pb.GetInvoiceRequest(id=saved.stripe_invoice_id), metadata=AUTH)
    assert by_id == by_stripe_id
    assert by_id.invoice_id == "in_test000007"
    assert by_id.amount == 800
    assert by_id.user.name == "User 7"


@pytest.mark.parametrize("key", ["0123456789abcdef01234567", "in_doesnotexist"])
async def test_unknown_id_is_not_found(stub: pb_grpc.InvoiceServiceAsyncStub, key: str) -> None:
    error = await _rpc_error(stub.GetInvoice(pb.GetInvoiceRequest(id=key), metadata=AUTH))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert key in (error.details() or "")


@pytest.mark.parametrize(
    "key", ["", "42", "0123456789ABCDEF01234567", "in_", "in_x'; DROP TABLE invoices;--", "../etc/passwd", "é" * 24]
)
async def test_malformed_id_is_invalid_argument(
    stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage, key: str
) -> None:
    await _fill(store, 1)
    error = await _rpc_error(stub.GetInvoice(pb.GetInvoiceRequest(id=key), metadata=AUTH))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("id:")
    assert (await store.list_invoices(Page(number=1, limit=1))).total == 1


def _create(**overrides: object) -> pb.CreateInvoiceRequest:
    fields: dict[str, object] = {
        "items": [pb.InvoiceItem(name="All resources", amount=3300)],
        "customer": "cus_OxIokju2aarNVm",
        "payment_method": "pm_1O9OCiA0ZUrt0vQJ7GqrPclY",
    }
    fields.update(overrides)
    return pb.CreateInvoiceRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_create(items=[]), "items"),
        (_create(items=[pb.InvoiceItem(name="x", amount=0)]), "items[0].amount"),
        (_create(items=[pb.InvoiceItem(name="x", amount=1), pb.InvoiceItem(name="y", amount=-5)]), "items[1].amount"),
        (_create(items=[pb.InvoiceItem(name="x", amount=100_000_000)]), "items[0].amount"),
        (_create(items=[pb.InvoiceItem(name="  ", amount=1)]), "items[0].name"),
        (_create(items=[pb.InvoiceItem(name="x", amount=1)] * 101), "items"),
        (_create(customer=""), "customer"),
        (_create(customer="pm_1O9OCiA0ZUrt0vQJ7GqrPclY"), "customer"),
        (_create(payment_method="card_123"), "payment_method"),
    ],
)
async def test_bad_create_requests_are_invalid_arguments(
    stub: pb_grpc.InvoiceServiceAsyncStub, request_: pb.CreateInvoiceRequest, field: str
) -> None:
    error = await _rpc_error(stub.CreateInvoice(request_, metadata=AUTH))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{field}:")


async def test_valid_create_without_stripe_configured_is_unavailable(stub: pb_grpc.InvoiceServiceAsyncStub) -> None:
    error = await _rpc_error(stub.CreateInvoice(_create(), metadata=AUTH))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "STRIPE_API_KEY" in (error.details() or "")


@pytest.mark.parametrize(
    "metadata",
    # 40,000 bytes is past gRPC's default hard metadata limit (16 KiB): without the
    # server's own limit that call would be RESOURCE_EXHAUSTED, never judged by its key.
    [(), (("api-key", ""),), (("api-key", "wrong"),), (("api-key", "x" * 4096),), (("api-key", "x" * 40_000),)],
)
async def test_missing_or_wrong_key_is_unauthenticated(
    stub: pb_grpc.InvoiceServiceAsyncStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    for call in (
        stub.ListInvoices(pb.ListInvoicesRequest(), metadata=metadata),
        stub.GetInvoice(pb.GetInvoiceRequest(id="in_x"), metadata=metadata),
        stub.CreateInvoice(_create(), metadata=metadata),
    ):
        error = await _rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "api-key" in (error.details() or "")


async def test_every_configured_key_is_accepted(stub: pb_grpc.InvoiceServiceAsyncStub) -> None:
    reply = await stub.ListInvoices(pb.ListInvoicesRequest(), metadata=(("api-key", ROTATED_KEY),))
    assert reply.count == 0


async def test_invoice_json_has_the_referencejson_shape(stub: pb_grpc.InvoiceServiceAsyncStub, store: Storage) -> None:
    """The proto3 JSON mapping of an Invoice, with the printer options Envoy uses, prints
    the keys, JSON types and formats of the original API's sample."""
    saved = await save_invoice(store, make_invoice(3))
    reply = await stub.GetInvoice(pb.GetInvoiceRequest(id=saved.id), metadata=AUTH)
    printed = json.loads(json_format.MessageToJson(reply, always_print_fields_with_no_presence=True))
    sample = json.loads((FIXTURES / "get-invoice.response.json").read_text())
    # `amount` is a double: Python's printer writes a whole one as 400.0, Envoy's (C++) as
    # 400, a JSON integer, as tests/test_gateway.py checks through the real Envoy.
    assert printed["amount"] == 400.0
    printed["amount"] = int(printed["amount"])
    assert has_shape(printed, sample), json_shape(printed)
    assert set(printed) - set(sample) == ADDED_INVOICE_KEYS
    for key in ("createdAt", "updatedAt"):
        assert RFC3339_MILLIS.fullmatch(printed[key]), printed[key]
    assert printed["createdAt"] == "2026-11-01T00:00:03.250Z"


@pytest.fixture
async def audited(store: Storage) -> AsyncIterator[pb_grpc.InvoiceServiceAsyncStub]:
    """A server with the audit trail (the default one's is left out)."""
    running = await start_grpc(store, [API_KEY], "127.0.0.1:0", audit=store)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.InvoiceServiceStub(channel)
    await running.server.stop(None)


# Page tokens this service never issued: garbage, another invoice's, and one shaped for the unknown invoice.
FORGED_AUDIT_TOKENS = (
    "not-a-token",
    pagetoken.encode_audit("in_another", 1),
    pagetoken.encode_audit("in_unknownaudit", 3),
)


async def test_an_unknown_invoices_audit_is_not_found_whatever_the_page_token(
    audited: pb_grpc.InvoiceServiceAsyncStub, store: Storage
) -> None:
    """Which invoices exist is answered the same way with a token or without: an unknown
    one is NOT_FOUND first, by either id, before its token is judged."""
    for key in ("in_unknownaudit", new_record_id()):
        for token in ("", *FORGED_AUDIT_TOKENS):
            request = pb.ListInvoiceAuditRequest(id=key, page_token=token)
            error = await _rpc_error(audited.ListInvoiceAudit(request, metadata=AUTH))
            assert (error.code(), key in (error.details() or "")) == (grpc.StatusCode.NOT_FOUND, True), (key, token)
    # The same tokens on an invoice that exists are refused as tokens.
    known = await save_invoice(store, make_invoice(1))
    for key in (known.id, known.stripe_invoice_id):
        for token in FORGED_AUDIT_TOKENS:
            request = pb.ListInvoiceAuditRequest(id=key, page_token=token)
            error = await _rpc_error(audited.ListInvoiceAudit(request, metadata=AUTH))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (key, token)
