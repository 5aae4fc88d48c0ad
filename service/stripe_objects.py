"""Reading Stripe's invoice object, of any API version since the seed's 2023 sample, into
the service's StripeInvoice: from the answers of service/payments.py and the events of
service/webhooks.py. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service import validation
from service.domain import STATUSES, InvalidArgument, StripeInvoice, User

# Metadata keys that carry the invoice's owner to Stripe and back through webhooks.
USER_ID, USER_NAME = "invoice_service_user_id", "invoice_service_user_name"


# What a bigint column holds; Stripe's totals stay far inside (250 lines of 8 digits).
_INT64 = 2**63
# Where Python's datetime (and Postgres's timestamp range, for our purposes) ends.
_YEAR_10000 = 253_402_300_800


def _text(value: object) -> str:
    """What Postgres text can hold: no NUL (dropped) and no lone surrogate (JSON can
    escape one, UTF-8 cannot encode it: replaced), so that no invoice Stripe sends is
    unrecordable for a character of a customer's name."""
    return str(value).replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def invoice_from_stripe(obj: Mapping[str, Any]) -> StripeInvoice:
    """Reads a Stripe invoice object of any API version since the seed's 2023 sample.
    The owner is the user named at creation (metadata) or, failing that, the Stripe
    customer with Stripe's customer name."""
    try:
        metadata = obj.get("metadata") or {}
        user_id, user_name = metadata.get(USER_ID), metadata.get(USER_NAME)
        if user_id:
            user = User(id=_text(user_id), name=_text(user_name or ""))
        elif isinstance(obj.get("customer"), str) and obj["customer"]:
            user = User(id=_text(obj["customer"]), name=_text(obj.get("customer_name") or ""))
        else:
            raise ValueError("no owner: neither metadata names a user nor is there a customer id")
        total, created = obj.get("total") or 0, obj.get("created")
        if isinstance(total, bool) or not isinstance(total, int) or not -_INT64 <= total < _INT64:
            raise ValueError(f"total {total!r} is not a 64-bit integer")
        if created is not None and (
            isinstance(created, bool) or not isinstance(created, int) or not 0 <= created < _YEAR_10000
        ):
            raise ValueError(f"created {created!r} is not a Unix time")
        currency = obj.get("currency")
        if currency is not None and not (isinstance(currency, str) and validation.CURRENCY.fullmatch(currency)):
            raise ValueError(f"currency {currency!r} is not a lowercase ISO 4217 code")
        invoice = StripeInvoice(
            stripe_invoice_id=_text(obj["id"]),
            status=str(obj["status"]),
            amount=total,
            invoice_pdf=_text(obj.get("invoice_pdf") or ""),
            user=user,
            currency=currency,
            created=created,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument("data.object", f"not a Stripe invoice: {type(exc).__name__} {exc}") from exc
    if not validation.STRIPE_ID["in"].fullmatch(invoice.stripe_invoice_id):
        raise InvalidArgument("data.object.id", "not a Stripe invoice id")
    if invoice.status not in STATUSES:
        raise InvalidArgument("data.object.status", f"unknown invoice status {invoice.status!r}")
    return invoice
