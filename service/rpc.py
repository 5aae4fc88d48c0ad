"""The InvoiceService servicer: protobuf in, validation, domain calls, protobuf out.
It knows no SQL and no status codes; domain errors are mapped at the edge (service/edge.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from service import pagetoken, validation
from service.credit_notes import RefundAsk, StripeCreditNote
from service.domain import AuditPage, InvalidArgument, Invoice, InvoicePage, NewInvoice, Page
from service.feed import Change, ChangeKind, FeedPosition, WatchFilter
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc


class InvoiceStore(Protocol):
    async def list_invoices(self, page: Page) -> InvoicePage: ...
    async def get_invoice(self, key: str) -> Invoice: ...


class AuditTrail(Protocol):
    async def audit_of(self, stripe_invoice_id: str, after: int, limit: int) -> AuditPage: ...


class CreditNotes(Protocol):
    async def credit_notes_of(self, stripe_invoice_id: str) -> list[StripeCreditNote]: ...


class Watcher(Protocol):
    def watch(self, after: FeedPosition | None, match: WatchFilter) -> AsyncGenerator[Change, None]: ...


class Creator(Protocol):
    async def create(self, new: NewInvoice, idempotency_key: str | None) -> dict[str, Any]: ...
    async def pay(self, invoice_id: str, payment_method: str | None, idempotency_key: str | None) -> Invoice: ...
    async def void(self, invoice_id: str, idempotency_key: str | None) -> Invoice: ...
    async def mark_uncollectible(self, invoice_id: str, idempotency_key: str | None) -> Invoice: ...
    async def refund(self, invoice_id: str, ask: RefundAsk, idempotency_key: str | None) -> Invoice: ...


def _set_time(target: timestamp_pb2.Timestamp, moment: datetime) -> None:
    # Direct arithmetic: Timestamp.FromDatetime showed up in the list profile.
    target.seconds = int(moment.timestamp())
    target.nanos = moment.microsecond * 1000


def _time(request: pb.ListInvoicesRequest, field: Literal["created_after", "created_before"]) -> datetime | None:
    if not request.HasField(field):
        return None
    try:
        moment: datetime = getattr(request, field).ToDatetime(UTC)
    except ValueError as exc:  # seconds or nanos outside what a Timestamp may hold
        raise InvalidArgument(field, "must be a valid timestamp between 0001-01-01 and 9999-12-31") from exc
    return moment


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def fill_invoice(target: pb.Invoice, invoice: Invoice, default_currency: str) -> pb.Invoice:
    """Writes the invoice into `target` in place: building sub-messages and then copying
    them into a parent (as keyword construction does) was a fifth of a list's time. A
    record from before the service kept currencies is in `default_currency`."""
    target.id = invoice.id
    target.invoice_id = invoice.stripe_invoice_id
    target.user.id = invoice.user.id
    target.user.name = invoice.user.name
    target.status = invoice.status
    target.amount = invoice.amount
    target.amount_int32 = invoice.amount if _INT32_MIN <= invoice.amount <= _INT32_MAX else 0
    target.currency = invoice.currency or default_currency
    target.invoice_pdf = invoice.invoice_pdf
    target.amount_credited = invoice.amount_credited
    target.amount_refunded = invoice.amount_refunded
    _set_time(target.created_at, invoice.created_at)
    _set_time(target.updated_at, invoice.updated_at)
    return target


_KINDS = {
    ChangeKind.CREATED: pb.InvoiceEvent.KIND_CREATED,
    ChangeKind.UPDATED: pb.InvoiceEvent.KIND_UPDATED,
    ChangeKind.DELETED: pb.InvoiceEvent.KIND_DELETED,
    ChangeKind.BOOKMARK: pb.InvoiceEvent.KIND_BOOKMARK,
}


def invoice_event(change: Change, default_currency: str) -> pb.InvoiceEvent:
    event = pb.InvoiceEvent(kind=_KINDS[change.kind], resume_token=pagetoken.encode_position(change.position))
    if change.invoice is not None:
        fill_invoice(event.invoice, change.invoice, default_currency)
    if change.changed_at is not None:
        _set_time(event.change_time, change.changed_at)
    return event


def new_invoice(request: pb.CreateInvoiceRequest, default_currency: str) -> NewInvoice:
    return validation.new_invoice(
        ((item.name, item.amount) for item in request.items),
        request.customer,
        request.payment_method,
        currency=request.currency or default_currency,
        user=(request.user.id, request.user.name) if request.HasField("user") else None,
    )


def _metadata(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    value = next((v for k, v in context.invocation_metadata() or () if k == key), None)
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class InvoiceServicer(pb_grpc.InvoiceServiceServicer):
    def __init__(
        self,
        store: InvoiceStore,
        creator: Creator,
        default_currency: str,
        max_offset: int = validation.DEFAULT_MAX_OFFSET,
        watches: Watcher | None = None,
        audit: AuditTrail | None = None,
        notes: CreditNotes | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._notes = notes
        self._creator = creator
        self._watches = watches
        self._default_currency = default_currency
        self._max_offset = max_offset

    async def ListInvoices(
        self,
        request: pb.ListInvoicesRequest,
        context: grpc.aio.ServicerContext[pb.ListInvoicesRequest, pb.ListInvoicesResponse],
    ) -> pb.ListInvoicesResponse:
        filters = validation.filters(
            request.status,
            request.user_id,
            _time(request, "created_after"),
            _time(request, "created_before"),
            request.given_back if request.HasField("given_back") else None,
        )
        page = validation.page(
            request.page if request.HasField("page") else None,
            request.limit if request.HasField("limit") else None,
            token=request.page_token,
            filters=filters,
            max_offset=self._max_offset,
        )
        result = await self._store.list_invoices(page)
        reply = pb.ListInvoicesResponse(count=result.total)
        for invoice in result.invoices:
            fill_invoice(reply.invoices.add(), invoice, self._default_currency)
        if page.keyset and result.next_after is not None:
            reply.next_page_token = pagetoken.encode(result.next_after, filters)
        return reply

    async def GetInvoice(
        self, request: pb.GetInvoiceRequest, context: grpc.aio.ServicerContext[pb.GetInvoiceRequest, pb.Invoice]
    ) -> pb.Invoice:
        invoice = await self._store.get_invoice(validation.invoice_id(request.id))
        return fill_invoice(pb.Invoice(), invoice, self._default_currency)

    async def CreateInvoice(
        self,
        request: pb.CreateInvoiceRequest,
        context: grpc.aio.ServicerContext[pb.CreateInvoiceRequest, struct_pb2.Struct],
    ) -> struct_pb2.Struct:
        new = new_invoice(request, self._default_currency)
        key = validation.idempotency_key(_metadata(context, "idempotency-key"))
        answer = struct_pb2.Struct()
        answer.update(await self._creator.create(new, key))
        return answer

    async def PayInvoice(
        self, request: pb.PayInvoiceRequest, context: grpc.aio.ServicerContext[pb.PayInvoiceRequest, pb.Invoice]
    ) -> pb.Invoice:
        invoice_id = validation.invoice_id(request.id)
        method = validation.payment_method_id(request.payment_method) if request.payment_method else None
        key = validation.idempotency_key(_metadata(context, "idempotency-key"))
        return fill_invoice(pb.Invoice(), await self._creator.pay(invoice_id, method, key), self._default_currency)

    async def VoidInvoice(
        self, request: pb.VoidInvoiceRequest, context: grpc.aio.ServicerContext[pb.VoidInvoiceRequest, pb.Invoice]
    ) -> pb.Invoice:
        invoice_id = validation.invoice_id(request.id)
        key = validation.idempotency_key(_metadata(context, "idempotency-key"))
        return fill_invoice(pb.Invoice(), await self._creator.void(invoice_id, key), self._default_currency)

    async def MarkUncollectible(
        self,
        request: pb.MarkUncollectibleRequest,
        context: grpc.aio.ServicerContext[pb.MarkUncollectibleRequest, pb.Invoice],
    ) -> pb.Invoice:
        invoice_id = validation.invoice_id(request.id)
        key = validation.idempotency_key(_metadata(context, "idempotency-key"))
        invoice = await self._creator.mark_uncollectible(invoice_id, key)
        return fill_invoice(pb.Invoice(), invoice, self._default_currency)

    async def RefundInvoice(
        self,
        request: pb.RefundInvoiceRequest,
        context: grpc.aio.ServicerContext[pb.RefundInvoiceRequest, pb.Invoice],
    ) -> pb.Invoice:
        invoice_id = validation.invoice_id(request.id)
        amount = request.amount if request.HasField("amount") else None
        ask = validation.refund_ask(amount, request.reason, request.memo)
        key = validation.idempotency_key(_metadata(context, "idempotency-key"))
        invoice = await self._creator.refund(invoice_id, ask, key)
        return fill_invoice(pb.Invoice(), invoice, self._default_currency)

    async def ListInvoiceCreditNotes(
        self,
        request: pb.ListInvoiceCreditNotesRequest,
        context: grpc.aio.ServicerContext[pb.ListInvoiceCreditNotesRequest, pb.ListInvoiceCreditNotesResponse],
    ) -> pb.ListInvoiceCreditNotesResponse:
        key = validation.invoice_id(request.id)
        if self._notes is None:
            raise NotImplementedError("this server was built without credit notes")
        record = await self._store.get_invoice(key)  # NOT_FOUND for an invoice the service does not know
        reply = pb.ListInvoiceCreditNotesResponse()
        for note in await self._notes.credit_notes_of(record.stripe_invoice_id):
            target = reply.credit_notes.add(
                id=note.id,
                status=note.status,
                amount=note.amount,
                refunded=note.refunded,
                credited=note.credited,
                out_of_band=note.out_of_band,
                currency=note.currency or record.currency or self._default_currency,
                reason=note.reason,
                memo=note.memo,
            )
            if note.created is not None:
                target.created_at.seconds = note.created
        return reply

    async def ListInvoiceAudit(
        self,
        request: pb.ListInvoiceAuditRequest,
        context: grpc.aio.ServicerContext[pb.ListInvoiceAuditRequest, pb.ListInvoiceAuditResponse],
    ) -> pb.ListInvoiceAuditResponse:
        key = validation.invoice_id(request.id)
        limit = validation.page_size(request.limit if request.HasField("limit") else None)
        if self._audit is None:
            raise NotImplementedError("this server was built without an audit trail")
        # The trail is by Stripe's id: a Create's first entries come before its record.
        record = None if key.startswith("in_") else await self._store.get_invoice(key)
        stripe_id = key if record is None else record.stripe_invoice_id
        try:
            after = pagetoken.decode_audit(request.page_token, stripe_id) if request.page_token else 0
        except InvalidArgument:
            if record is None:  # an unknown invoice is NOT_FOUND whatever the token, as by its own id
                await self._known(self._audit, stripe_id)
            raise
        page = await self._audit.audit_of(stripe_id, after, limit)
        if not page.entries and record is None:
            await self._known(self._audit, stripe_id)
        reply = pb.ListInvoiceAuditResponse()
        if page.next_after is not None:
            reply.next_page_token = pagetoken.encode_audit(stripe_id, page.next_after)
        for entry in page.entries:
            target = reply.entries.add(
                action=entry.action,
                caller=entry.caller,
                request_id=entry.request_id or "",
                idempotency_key=entry.idempotency_key or "",
                invoice_id=entry.stripe_invoice_id or "",
                attempt=entry.attempt,
                outcome=entry.outcome,
                detail=entry.detail,
            )
            _set_time(target.time, entry.at)
        return reply

    async def _known(self, audit: AuditTrail, stripe_id: str) -> None:
        """NOT_FOUND unless the service knows the invoice: by its trail (a Create's first
        entries come before its record) or its record."""
        if not (await audit.audit_of(stripe_id, 0, 1)).entries:
            await self._store.get_invoice(stripe_id)

    async def WatchInvoices(
        self,
        request: pb.WatchInvoicesRequest,
        context: grpc.aio.ServicerContext[pb.WatchInvoicesRequest, pb.InvoiceEvent],
    ) -> AsyncIterator[pb.InvoiceEvent]:
        match = validation.watch_filter(request.invoice_id, request.user_id, request.status)
        after = pagetoken.decode_position(request.resume_token) if request.resume_token else None
        if self._watches is None:
            raise NotImplementedError("this server was built without a change feed")
        # Closed when this stream ends, so the watch leaves the hand-out at once.
        async with contextlib.aclosing(self._watches.watch(after, match)) as changes:
            async for change in changes:
                yield invoice_event(change, self._default_currency)
