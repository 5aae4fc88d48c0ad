"""Refunds as Stripe makes them (stock localstripe keeps a bare Refund object): one never
takes back more than its charge still holds, Stripe's refusal says how much that is, and
each sends refund.created and charge.refunded ("Adds created, updated, and failed events
for all refund types", https://docs.stripe.com/changelog/acacia/2024-10-28/refund-webhook-update).
POST /v1/refunds goes through here, and so does a credit note's refund_amount
(credit_notes.py); GET /v1/refunds takes Stripe's charge, payment_intent and created
filters, newest first. Their shape (payment_intent, customer, payment_method,
destination_details, ...) is shapes.py's."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from tools.localstripe.errors import as_int, bad_request, invalid_param, one_of, reject_unknown
from tools.localstripe.invoices import created_filters, metadata_of
from tools.localstripe.stock import emit, resources

# Stripe's reasons a refund may be given (POST /v1/refunds `reason`).
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
# Currencies without minor units (https://docs.stripe.com/currencies#zero-decimal): their
# amounts are whole units, which Stripe's messages print without decimals.
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
SYMBOLS: Mapping[str, str] = MappingProxyType({"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"})


def money(amount: int, currency: str) -> str:
    """An amount as Stripe's messages print it: "$25.00", "€10.00", "¥500", "25.00 CHF"."""
    currency = currency.lower()
    figure = f"{amount}" if currency in ZERO_DECIMAL else f"{amount / 100:.2f}"
    symbol = SYMBOLS.get(currency)
    return f"{symbol}{figure}" if symbol else f"{figure} {currency.upper()}"


def unrefunded(charge: Any) -> int:
    """What a charge still holds: its amount less every refund of it."""
    return int(charge.amount) - int(charge.amount_refunded)


def refundable(charge: Any, amount: int | None, param: str) -> int:
    """How much a refund of `amount` (None: all that is left) takes from `charge`, or
    Stripe's refusal; `param` names the amount in the caller's request."""
    left = unrefunded(charge)
    if charge.status != "succeeded" or not charge.captured:
        raise bad_request(f"Charge {charge.id} has not succeeded; there is nothing to refund.", param=param)
    if left <= 0:
        raise bad_request(f"Charge {charge.id} has already been refunded.", code="charge_already_refunded")
    if amount is not None and amount > left:
        raise bad_request(
            f"Refund amount ({money(amount, charge.currency)}) is greater than unrefunded amount on charge "
            f"({money(left, charge.currency)})",
            param=param,
        )
    return left if amount is None else amount


def refund_charge(charge: Any, amount: int | None, param: str, reason: Any = None, metadata: Any = None) -> Any:
    """Refunds `amount` of `charge` (see refundable) and sends Stripe's events."""
    amount = refundable(charge, amount, param)
    refund = resources.Refund(charge=charge.id, amount=amount, metadata=metadata or {})
    # Stock fills these only when the refund was asked for by payment intent.
    refund.payment_intent = charge.payment_intent
    refund.customer, refund.payment_method, refund.reason = charge.customer, charge.payment_method, reason
    emit("refund.created", refund)
    emit("charge.refunded", charge)
    return refund


def _create_refund(
    cls: Any,
    /,
    charge: Any = None,
    payment_intent: Any = None,
    amount: Any = None,
    reason: Any = None,
    metadata: Any = None,
    **unknown: Any,
) -> Any:
    """POST /v1/refunds: of a charge, or of a payment intent's latest charge."""
    reject_unknown(unknown)
    refund_amount = None if amount is None else as_int(amount, "amount", minimum=1)
    if reason is not None:
        one_of(reason, REFUND_REASONS, "reason")
    metadata = metadata_of(metadata, "metadata")
    if (charge is None) == (payment_intent is None):
        raise invalid_param("You must pass either charge or payment_intent, not both or neither.")
    if payment_intent is not None:
        intent = resources.PaymentIntent._api_retrieve(str(payment_intent))
        if intent.latest_charge is None:
            raise bad_request(f"PaymentIntent {intent.id} has no charge to refund.", param="payment_intent")
        target = intent.latest_charge
    else:
        target = resources.Charge._api_retrieve(str(charge))
    return refund_charge(target, refund_amount, "amount", reason, metadata)


REFUND_LIST_PARAMS = frozenset({"charge", "payment_intent", "limit", "starting_after"})


def _list_refunds_with(stock_list: Callable[..., Any]) -> Callable[..., Any]:
    def list_refunds(cls: Any, url: str, created: Any = None, **params: Any) -> Any:
        """GET /v1/refunds (stock crashed on other parameters), newest first."""
        reject_unknown({k: v for k, v in params.items() if k not in REFUND_LIST_PARAMS})
        for name in ("charge", "payment_intent"):
            if params.get(name) is not None and not isinstance(params[name], str):
                raise invalid_param(f"Invalid {name}: must be an id.", param=name)
        filters = created_filters(created)
        page = stock_list(url, **params)
        page._list = [r for r in page._list if all(f(r) for f in filters)]
        page._list.sort(key=lambda r: r.created, reverse=True)
        return page

    return list_refunds


def patch() -> None:
    """Patches localstripe's Refund class in place (see app.install)."""
    refund = resources.Refund
    refund._api_create = classmethod(_create_refund)
    refund._api_list_all = classmethod(_list_refunds_with(refund._api_list_all))
