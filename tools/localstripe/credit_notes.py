"""Credit notes as Stripe documents them (https://docs.stripe.com/api/credit_notes/create,
API 2025-09-30.clover and later): missing from localstripe. POST /v1/credit_notes on an
open or paid invoice first reduces what the invoice still owes (amount_due and
amount_remaining, never below zero: the note's pre_payment_amount, added to the invoice's
pre_payment_credit_notes_amount; an open invoice brought to zero is paid); the rest is its
post_payment_amount (added to post_payment_credit_notes_amount, the invoice stays paid),
which must equal refund_amount (a new refund of the invoice's payment, refunds.py) plus
the linked `refunds`, credit_amount (the customer's balance in the invoice's currency,
with a customer balance transaction) and out_of_band_amount. All the notes of an invoice
together never exceed its total, nor a line's notes that line.

GET /v1/credit_notes/{id}, /v1/credit_notes (invoice, customer, created; newest first),
/v1/credit_notes/{id}/lines and /v1/credit_notes/preview (the note the same parameters
would make, nothing changed); POST /v1/credit_notes/{id} (memo, metadata) and
/v1/credit_notes/{id}/void, which undoes what the note did to the invoice and the
customer's balance. Stripe cannot take a refund back, so a note that refunded is never
voided; nor is one that reduced the amount due of an invoice no longer open.

Events: credit_note.created, .updated, .voided, and invoice.updated (with
previous_attributes) whenever the invoice's amounts change; refund.created and
charge.refunded come from refunds.py; an invoice a note settles sends invoice.paid."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tools.localstripe import store_index
from tools.localstripe.credit_note_params import CreditNoteParams, LineParams, parse
from tools.localstripe.customers import adjust_balance
from tools.localstripe.errors import bad_request, invalid_param, reject_unknown
from tools.localstripe.invoices import created_filters, merge_metadata, metadata_of
from tools.localstripe.refunds import money, refund_charge, refundable
from tools.localstripe.stock import emit, resources


@dataclass(frozen=True)
class Line:
    """A line of the note, its amount known."""

    params: LineParams
    amount: int
    description: str | None


@dataclass(frozen=True)
class Plan:
    """What a credit note will do, every check against the invoice passed."""

    params: CreditNoteParams
    invoice: Any
    lines: tuple[Line, ...]
    amount: int
    pre_payment: int
    post_payment: int
    charge: Any
    links: tuple[tuple[Any, int], ...]  # existing refunds and the amount of each to link


def _none_of(obj: Any, *names: str) -> None:
    """Stripe's lists of discounts, taxes and pretax credits: the emulator has none."""
    for name in names:
        setattr(obj, name, [])


class CreditNoteLineItem(resources.StripeObject):  # type: ignore[misc]  # localstripe is untyped
    """Reached only through its note (never stored, so no `created`, which Stripe has not)."""

    object = "credit_note_line_item"

    def __init__(self, line: Line) -> None:
        self.id, self.livemode = "cnli_" + resources.random_id(14), False
        params, self.type = line.params, line.params.type
        self.amount, self.description, self.quantity = line.amount, line.description, params.quantity or 1
        if params.invoice_line_item is not None:
            self.invoice_line_item = params.invoice_line_item
        self.unit_amount = params.unit_amount
        self.unit_amount_decimal = None if params.unit_amount is None else str(params.unit_amount)
        self.metadata = params.metadata
        self.discount_amount = 0
        _none_of(self, "discount_amounts", "pretax_credit_amounts", "tax_rates", "taxes")


class CreditNote(resources.StripeObject):  # type: ignore[misc]  # localstripe is untyped
    object = "credit_note"
    _id_prefix = "cn_"

    def __init__(self, plan: Plan, links: list[tuple[Any, int]], pdf_base: str, *, stored: bool) -> None:
        if stored:
            super().__init__()
        else:  # a preview: the same object, kept nowhere
            self.id, self.created, self.livemode = "cn_" + resources.random_id(14), int(time.time()), False
        invoice, params = plan.invoice, plan.params
        self.invoice, self.customer, self.currency = invoice.id, invoice.customer, invoice.currency
        self.customer_account = self.shipping_cost = self.voided_at = None
        self.customer_balance_transaction: str | None = None
        self.amount = self.subtotal = self.total = plan.amount
        self.subtotal_excluding_tax = self.total_excluding_tax = plan.amount
        self.amount_shipping = self.discount_amount = 0
        _none_of(self, "discount_amounts", "pretax_credit_amounts", "total_taxes")
        self.pre_payment_amount, self.post_payment_amount = plan.pre_payment, plan.post_payment
        self.type = _type_of(plan)
        self.refunds = [
            {"amount_refunded": amount, "refund": refund.id, "payment_record_refund": None, "type": "refund"}
            for refund, amount in links
        ]
        self.out_of_band_amount = params.out_of_band_amount
        self.reason, self.memo, self.metadata = params.reason, params.memo, dict(params.metadata)
        self.effective_at = params.effective_at or self.created
        self.status = "issued"
        notes = _notes_of(invoice)
        self.number = f"{invoice.id.removeprefix('in_')[:8].upper()}-CN-{len(notes) + 1:02d}"
        self.pdf = f"{pdf_base}/credit_note/{self.id}/pdf"
        self.lines = resources.List(f"/v1/credit_notes/{self.id}/lines")
        self.lines._list = [CreditNoteLineItem(line) for line in plan.lines]
        self._credit_amount = params.credit_amount or 0
        self._line_amounts: dict[str, int] = {}  # credited on each invoice line
        for line in plan.lines:
            if line.params.invoice_line_item is not None:
                item = line.params.invoice_line_item
                self._line_amounts[item] = self._line_amounts.get(item, 0) + line.amount
        if stored:
            notes.append(self.id)


def _type_of(plan: Plan) -> str:
    """pre_payment: issued while the invoice was owed; post_payment: once paid; mixed: both."""
    if plan.pre_payment and plan.post_payment:
        return "mixed"
    return "post_payment" if plan.post_payment else "pre_payment"


def _notes_of(invoice: Any) -> list[str]:
    """The ids of the invoice's credit notes, oldest first (kept on the invoice)."""
    notes: list[str] = invoice.__dict__.setdefault("_credit_notes", [])
    return notes


def _issued(invoice: Any) -> list[Any]:
    notes = (resources.store[f"credit_note:{note_id}"] for note_id in _notes_of(invoice))
    return [note for note in notes if note.status == "issued"]


def _lines(params: CreditNoteParams, invoice: Any, issued: list[Any]) -> tuple[Line, ...]:
    """The note's lines, each invoice line credited no more than what is left of it."""
    lines = []
    for index, line in enumerate(params.lines):
        if line.type == "custom_line_item":
            lines.append(Line(line, (line.unit_amount or 0) * (line.quantity or 1), line.description))
            continue
        prefix = f"lines[{index}]"
        found = next((il for il in invoice.lines._list if il.id == line.invoice_line_item), None)
        if found is None:
            raise bad_request(
                f"Invoice {invoice.id} has no line item {line.invoice_line_item}.", param=f"{prefix}[invoice_line_item]"
            )
        quantity = int(getattr(found, "quantity", 1) or 1)
        amount = line.amount if line.amount is not None else int(found.amount) // quantity * (line.quantity or 1)
        credited = sum(note._line_amounts.get(found.id, 0) for note in issued)
        credited += sum(done.amount for done in lines if done.params.invoice_line_item == found.id)
        if amount > int(found.amount) - credited:
            raise bad_request(
                f"The amount to credit on {found.id} ({money(amount, invoice.currency)}) is greater than what "
                f"remains to be credited on it ({money(int(found.amount) - credited, invoice.currency)}).",
                param=f"{prefix}[amount]",
            )
        lines.append(Line(line, amount, found.description))
    return tuple(lines)


def _charge_of(invoice: Any) -> Any:
    """The charge that paid the invoice, if a payment did."""
    if not invoice.payment_intent:
        return None
    charge = resources.PaymentIntent._api_retrieve(invoice.payment_intent).latest_charge
    return charge if charge is not None and charge.status == "succeeded" else None


def _links(params: CreditNoteParams, charge: Any) -> tuple[tuple[Any, int], ...]:
    """Existing refunds of the invoice's payment, each linked for no more than it has left."""
    links: list[tuple[Any, int]] = []
    for index, link in enumerate(params.refunds):
        param = f"refunds[{index}][refund]"
        refund = resources.Refund._api_retrieve(link.refund)
        if charge is None or refund.charge != charge.id:
            raise bad_request(f"Refund {refund.id} is not a refund of this invoice's payment.", param=param)
        left = int(refund.amount) - int(getattr(refund, "_credit_noted", 0))
        left -= sum(linked for earlier, linked in links if earlier is refund)
        amount = left if link.amount_refunded is None else link.amount_refunded
        if amount > left or amount <= 0:
            raise bad_request(
                f"Refund {refund.id} has {money(left, refund.currency)} left to link to credit notes.", param=param
            )
        links.append((refund, amount))
    return tuple(links)


def plan(params: CreditNoteParams) -> Plan:
    """Checks `params` against the invoice as it is now (a refusal is saved under the
    request's idempotency key, as a request that ran)."""
    invoice = resources.Invoice._api_retrieve(params.invoice)
    if invoice.status not in ("open", "paid"):
        raise bad_request(
            f"Credit notes can only be issued on open or paid invoices; invoice {invoice.id} is {invoice.status}.",
            param="invoice",
        )
    issued, currency = _issued(invoice), invoice.currency
    lines = _lines(params, invoice, issued)
    amount = params.amount if params.amount is not None else sum(line.amount for line in lines)
    if lines and amount != sum(line.amount for line in lines):
        raise bad_request(
            f"The amount ({money(amount, currency)}) must equal the sum of the lines "
            f"({money(sum(line.amount for line in lines), currency)}).",
            param="amount",
        )
    left = int(invoice.total) - sum(int(note.amount) for note in issued)
    if amount > left:
        raise bad_request(
            f"The credit note amount ({money(amount, currency)}) is greater than the amount that can still be "
            f"credited on invoice {invoice.id} ({money(left, currency)}).",
            param="amount",
        )
    pre_payment = min(amount, max(0, int(invoice.amount_remaining)))
    charge = _charge_of(invoice)
    links = _links(params, charge)
    refunded = (params.refund_amount or 0) + sum(linked for _, linked in links)
    given = refunded + (params.credit_amount or 0) + (params.out_of_band_amount or 0)
    if given != amount - pre_payment:
        raise bad_request(
            f"The sum of refunds, credit_amount and out_of_band_amount ({money(given, currency)}) must equal "
            f"the credit note's post_payment_amount ({money(amount - pre_payment, currency)}).",
            param="refund_amount" if params.refund_amount else "amount",
        )
    if params.refund_amount:
        if charge is None:
            raise bad_request(f"Invoice {invoice.id} has no payment to refund.", param="refund_amount")
        refundable(charge, params.refund_amount, "refund_amount")
    return Plan(params, invoice, lines, amount, pre_payment, amount - pre_payment, charge, links)


def _change_invoice(invoice: Any, pre_payment: int, post_payment: int) -> None:
    """Adds a note's amounts to (or, negative, takes a voided note's from) its invoice,
    with invoice.updated; an open invoice brought to zero is paid."""
    fields = ("amount_due", "amount_remaining", "pre_payment_credit_notes_amount", "post_payment_credit_notes_amount")
    before, was_open = {name: getattr(invoice, name) for name in (*fields, "status")}, invoice.status == "open"
    invoice._amount_due = int(invoice.amount_due) - pre_payment
    invoice.pre_payment_credit_notes_amount += pre_payment
    invoice.post_payment_credit_notes_amount += post_payment
    emit("invoice.updated", invoice, {k: v for k, v in before.items() if getattr(invoice, k) != v})
    if was_open and invoice.status == "paid":
        invoice._on_payment_success()


class CreditNotes:
    """The routes; a note's `pdf` links to `public_base`, where the emulator is reachable
    (it does not serve the PDF, as it does not serve the invoices')."""

    def __init__(self, public_base: str) -> None:
        self.public_base = public_base

    def create(self, **params: Any) -> Any:
        """POST /v1/credit_notes."""
        planned = plan(parse(params))
        links = list(planned.links)
        if planned.params.refund_amount:
            refund = refund_charge(planned.charge, planned.params.refund_amount, "refund_amount")
            links.insert(0, (refund, int(refund.amount)))
        note = CreditNote(planned, links, self.public_base, stored=True)
        for refund, amount in links:
            refund._credit_noted = int(getattr(refund, "_credit_noted", 0)) + amount
        invoice = planned.invoice
        if note._credit_amount:
            note.customer_balance_transaction = adjust_balance(
                invoice.customer, invoice.currency, -note._credit_amount, note.id
            )
        emit("credit_note.created", note)
        _change_invoice(invoice, planned.pre_payment, planned.post_payment)
        return note

    def preview(self, **params: Any) -> Any:
        """GET /v1/credit_notes/preview: the note these parameters would make (a refund it
        would create is not listed in its `refunds`, not being made)."""
        planned = plan(parse(params))
        return CreditNote(planned, list(planned.links), self.public_base, stored=False)


def retrieve(id: str, **unknown: Any) -> Any:
    """GET /v1/credit_notes/{id}."""
    reject_unknown(unknown)
    return CreditNote._api_retrieve(id)


def update(id: str, memo: Any = None, metadata: Any = None, **unknown: Any) -> Any:
    """POST /v1/credit_notes/{id}: Stripe lets a note's memo and metadata change."""
    reject_unknown(unknown)
    if memo is not None and not isinstance(memo, str):
        raise invalid_param(f"Invalid string: {memo!r}", param="memo")
    if metadata is not None and metadata != "":
        metadata_of(metadata, "metadata")
    note = CreditNote._api_retrieve(id)
    before = {"memo": note.memo, "metadata": dict(note.metadata)}
    if memo is not None:
        note.memo = memo
    merge_metadata(note, metadata)
    previous = {k: v for k, v in before.items() if getattr(note, k) != v}
    if previous:  # an event says what changed; nothing did
        emit("credit_note.updated", note, previous)
    return note


def void(id: str, **unknown: Any) -> Any:
    """POST /v1/credit_notes/{id}/void."""
    reject_unknown(unknown)
    note = CreditNote._api_retrieve(id)
    if note.status != "issued":
        raise bad_request(f"Credit note {note.id} is already void.")
    if note.refunds:
        raise bad_request(f"Credit note {note.id} refunded a payment, which cannot be undone; it cannot be voided.")
    invoice = resources.Invoice._api_retrieve(note.invoice)
    if note.pre_payment_amount and invoice.status != "open":
        raise bad_request(
            f"Credit note {note.id} reduced the amount due of invoice {invoice.id}, which is {invoice.status}; "
            "it can only be voided while the invoice is open."
        )
    note.status, note.voided_at = "void", int(time.time())
    if note._credit_amount:
        adjust_balance(note.customer, note.currency, note._credit_amount, note.id)
    emit("credit_note.voided", note)
    _change_invoice(invoice, -int(note.pre_payment_amount), -int(note.post_payment_amount))
    return note


LIST_PARAMS = frozenset({"limit", "starting_after"})


def list_notes(invoice: Any = None, customer: Any = None, created: Any = None, **params: Any) -> Any:
    """GET /v1/credit_notes, newest first."""
    reject_unknown({k: v for k, v in params.items() if k not in LIST_PARAMS})
    filters = created_filters(created)
    if customer is not None:
        filters.append(lambda note: note.customer == customer)
    if invoice is not None:
        notes = [resources.store[f"credit_note:{n}"] for n in _notes_of(resources.Invoice._api_retrieve(invoice))]
    else:
        notes = store_index.of_type(CreditNote.object)
    page = resources.List("/v1/credit_notes", **params)
    page._list = sorted(
        (note for note in reversed(notes) if all(f(note) for f in filters)), key=lambda n: n.created, reverse=True
    )
    return page


def list_lines(id: str, **params: Any) -> Any:
    """GET /v1/credit_notes/{id}/lines."""
    reject_unknown({k: v for k, v in params.items() if k not in LIST_PARAMS})
    note = CreditNote._api_retrieve(id)
    page = resources.List(note.lines.url, **params)
    page._list = list(note.lines._list)
    return page


def patch() -> None:
    """Stripe's credit-note amounts on every invoice (0 until a note changes them)."""
    resources.Invoice.pre_payment_credit_notes_amount = 0
    resources.Invoice.post_payment_credit_notes_amount = 0
