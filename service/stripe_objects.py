"""Reading Stripe's invoice, credit note, refund and invoice payment objects, of any API
version since the seed's 2023 sample, into the service's domain objects: from the answers
of service/payments.py and the events of service/webhooks.py. No I/O."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from service import validation
from service.credit_notes import InvoicePayment, NoteStatus, RefundStatus, StripeCreditNote, StripeRefund
from service.domain import STATUSES, InvalidArgument, StripeInvoice, User

# Metadata keys that carry the invoice's owner to Stripe and back through webhooks.
USER_ID, USER_NAME = "invoice_service_user_id", "invoice_service_user_name"
# Metadata key on the Stripe invoice or credit note: the idempotency key of the call that
# made it, so that a retry that never learned its id finds it among the customer's
# invoices (service/payments.py) or the invoice's notes (service/refunds.py).
CREATE_KEY = "invoice_service_key"


# What a bigint column holds; Stripe's totals stay far inside (250 lines of 8 digits).
_INT64 = 2**63
# Where Python's datetime (and Postgres's timestamp range, for our purposes) ends.
_YEAR_10000 = 253_402_300_800


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """Reads a Stripe object field by field: a field missing or of another shape is
    INVALID_ARGUMENT saying what the object is not (the webhook answers it `rejected`)."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument("data.object", f"not {what}: {type(exc).__name__} {exc}") from exc


def _text(value: object) -> str:
    """What Postgres text can hold: no NUL (dropped) and no lone surrogate (JSON can
    escape one, UTF-8 cannot encode it: replaced), so that no invoice Stripe sends is
    unrecordable for a character of a customer's name."""
    return str(value).replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def invoice_from_stripe(obj: Mapping[str, Any]) -> StripeInvoice:
    """Reads a Stripe invoice object of any API version since the seed's 2023 sample.
    The owner is the user named at creation (metadata) or, failing that, the Stripe
    customer with Stripe's customer name."""
    with _reading("a Stripe invoice"):
        metadata = obj.get("metadata") or {}
        user_id, user_name = metadata.get(USER_ID), metadata.get(USER_NAME)
        if user_id:
            user = User(id=_text(user_id), name=_text(user_name or ""))
        elif isinstance(obj.get("customer"), str) and obj["customer"]:
            user = User(id=_text(obj["customer"]), name=_text(obj.get("customer_name") or ""))
        else:
            raise ValueError("no owner: neither metadata names a user nor is there a customer id")
        total = obj.get("total") or 0
        if isinstance(total, bool) or not isinstance(total, int) or not -_INT64 <= total < _INT64:
            raise ValueError(f"total {total!r} is not a 64-bit integer")
        invoice = StripeInvoice(
            stripe_invoice_id=_text(obj["id"]),
            status=str(obj["status"]),
            amount=total,
            invoice_pdf=_text(obj.get("invoice_pdf") or ""),
            user=user,
            currency=_currency(obj),
            created=_created(obj),
            payment_intent=_optional_id(obj.get("payment_intent")),
        )
    if not validation.STRIPE_ID["in"].fullmatch(invoice.stripe_invoice_id):
        raise InvalidArgument("data.object.id", "not a Stripe invoice id")
    if invoice.payment_intent is not None and not validation.STRIPE_ID["pi"].fullmatch(invoice.payment_intent):
        raise InvalidArgument("data.object.payment_intent", "not a Stripe payment intent id")
    if invoice.status not in STATUSES:
        raise InvalidArgument("data.object.status", f"unknown invoice status {invoice.status!r}")
    return invoice


def _optional_id(value: object) -> str | None:
    """An id Stripe gives as a string, or inside the object when expanded, or null."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an id")
    return value


def _minor_units(obj: Mapping[str, Any], key: str, *, required: bool = False) -> int:
    """An amount; one Stripe leaves out or nulls is 0 unless `required`."""
    value = obj[key] if required else obj.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _INT64:
        raise ValueError(f"{key} {value!r} is not a non-negative 64-bit integer")
    return value


def _refunded(obj: Mapping[str, Any], amount: int, out_of_band: int) -> int:
    """What the note refunded to the invoice's payment. Since 2024 Stripe lists each refund
    with its amount (`refunds`); before, it named one refund (`refund`) and the balance
    transaction of a credit (`customer_balance_transaction`) without their amounts, so the
    split is known only when one of them is absent."""
    refunds = obj.get("refunds")
    if isinstance(refunds, list):
        return sum(_minor_units(r, "amount_refunded") for r in refunds)
    if not obj.get("refund"):
        return 0
    if obj.get("customer_balance_transaction"):
        raise ValueError("refunded and credited at once in an API version that does not say how much of each")
    return amount - out_of_band


def _refund_links(obj: Mapping[str, Any], refunded: int) -> tuple[tuple[str, int], ...]:
    """The refunds the note made or linked, each with the part of it the note counts: in
    `refunds` with its amount, or (2023) the one `refund`, all of what the note refunded."""
    refunds = obj.get("refunds")
    if isinstance(refunds, list):
        named = [(_optional_id(r.get("refund")), _minor_units(r, "amount_refunded")) for r in refunds]
        return tuple((ref, amount) for ref, amount in named if ref is not None)
    single = _optional_id(obj.get("refund"))
    return ((single, refunded),) if single is not None else ()


def credit_note_from_stripe(obj: Mapping[str, Any]) -> StripeCreditNote:
    """Reads a Stripe credit note object of any API version since 2023."""
    with _reading("a Stripe credit note"):
        invoice = obj["invoice"]
        invoice_id = invoice.get("id") if isinstance(invoice, Mapping) else invoice  # expanded or not
        amount, out_of_band = _minor_units(obj, "amount"), _minor_units(obj, "out_of_band_amount")
        refunded = _refunded(obj, amount, out_of_band)
        if refunded + out_of_band > amount:
            raise ValueError(f"refunded {refunded} and out of band {out_of_band} exceed the amount {amount}")
        note = StripeCreditNote(
            id=_text(obj["id"]),
            stripe_invoice_id=_text(invoice_id),
            status=NoteStatus(obj["status"]),
            amount=amount,
            refunded=refunded,
            credited=amount - refunded - out_of_band,
            out_of_band=out_of_band,
            reason=_text(obj.get("reason") or ""),
            memo=_text(obj.get("memo") or ""),
            currency=_currency(obj),
            created=_created(obj),
            refund_links=_refund_links(obj, refunded),
        )
    if not validation.STRIPE_ID["cn"].fullmatch(note.id) or not validation.STRIPE_ID["in"].fullmatch(
        note.stripe_invoice_id
    ):
        raise InvalidArgument("data.object.id", "not a Stripe credit note id on an invoice")
    return note


def _currency(obj: Mapping[str, Any]) -> str | None:
    currency = obj.get("currency")
    if currency is not None and not (isinstance(currency, str) and validation.CURRENCY.fullmatch(currency)):
        raise ValueError(f"currency {currency!r} is not a lowercase ISO 4217 code")
    return currency


def _created(obj: Mapping[str, Any]) -> int | None:
    created = obj.get("created")
    if created is not None and (
        isinstance(created, bool) or not isinstance(created, int) or not 0 <= created < _YEAR_10000
    ):
        raise ValueError(f"created {created!r} is not a Unix time")
    return created


def refund_from_stripe(obj: Mapping[str, Any]) -> StripeRefund | None:
    """Reads a Stripe refund object of any API version since 2023; None for a refund of no
    payment intent (a charge made without one), which pays no invoice."""
    with _reading("a Stripe refund"):
        payment_intent = _optional_id(obj.get("payment_intent"))
        if payment_intent is None:
            return None
        refund = StripeRefund(
            id=_text(obj["id"]),
            payment_intent=payment_intent,
            status=RefundStatus(obj["status"]),
            amount=_minor_units(obj, "amount", required=True),  # a refund of no amount says nothing
            reason=_text(obj.get("reason") or ""),
            currency=_currency(obj),
            created=_created(obj),
        )
    # `re_` for a card's refund, `pyr_` for one of a payment by bank debit or transfer.
    is_refund = any(validation.STRIPE_ID[prefix].fullmatch(refund.id) for prefix in ("re", "pyr"))
    if not is_refund or not validation.STRIPE_ID["pi"].fullmatch(payment_intent):
        raise InvalidArgument("data.object.id", "not a Stripe refund id of a payment intent")
    return refund


def invoice_payment_from_stripe(obj: Mapping[str, Any]) -> InvoicePayment | None:
    """Reads a Stripe invoice payment (2025-03-31.basil on); None for one paid by other
    than a payment intent (a payment record, an old charge), which no refund event names."""
    with _reading("a Stripe invoice payment"):
        payment = obj["payment"]
        if payment.get("type") != "payment_intent":
            return None
        paid = InvoicePayment(
            payment_intent=_text(_optional_id(payment.get("payment_intent")) or ""),
            stripe_invoice_id=_text(_optional_id(obj["invoice"]) or ""),
        )
    if not validation.STRIPE_ID["pi"].fullmatch(paid.payment_intent) or not validation.STRIPE_ID["in"].fullmatch(
        paid.stripe_invoice_id
    ):
        raise InvalidArgument("data.object.payment", "not a payment intent paying a Stripe invoice")
    return paid
