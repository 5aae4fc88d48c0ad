"""An invoice's life after its draft, as on Stripe: POST /v1/invoices/{id}/finalize and
/mark_uncollectible (missing from localstripe), /pay with a payment method and a
Stripe-shaped 402 on a decline, /void of invoices that never had a payment attempt, each
with its webhook. Finalizing (also through /pay of a draft) applies the customer's
balance in the invoice's currency first, then settles an amount due below the currency's
minimum charge: the invoice is paid with amount_due 0 and the amount carried to the
customer's balance in that currency."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from tools.localstripe import invoice_payments
from tools.localstripe.customers import balance_of, settle_balance
from tools.localstripe.errors import as_bool, bad_request, reject_unknown
from tools.localstripe.payment_methods import payment_method_of
from tools.localstripe.stock import emit, resources

# Stripe's "Minimum and maximum charge amounts", in minor units (JPY has none):
# https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts. An invoice whose
# amount due is below it is marked paid and the amount carried to the customer's balance.
MINIMUM_CHARGE: Mapping[str, int] = MappingProxyType(
    {
        "usd": 50,
        "aed": 200,
        "aud": 50,
        "bgn": 100,
        "brl": 50,
        "cad": 50,
        "chf": 50,
        "czk": 1500,
        "dkk": 250,
        "eur": 50,
        "gbp": 30,
        "hkd": 400,
        "huf": 17500,
        "inr": 50,
        "jpy": 50,
        "mxn": 1000,
        "myr": 200,
        "nok": 300,
        "nzd": 50,
        "pln": 200,
        "ron": 200,
        "sek": 300,
        "sgd": 50,
        "thb": 1000,
    }
)
DEFAULT_MINIMUM_CHARGE = 50  # $0.50, Stripe's minimum "or equivalent in charge currency"


def minimum_charge(currency: str) -> int:
    return MINIMUM_CHARGE.get(currency.lower(), DEFAULT_MINIMUM_CHARGE)


def _settlement(invoice: Any) -> tuple[int, int, int]:
    """(starting_balance, amount_due, ending_balance) if `invoice` were finalized now.
    Stripe applies the customer's balance in the invoice's currency (negative is credit,
    positive is owed; customers.py) first;
    an amount due below the currency's minimum charge, or none, is not charged: the
    invoice is paid and the amount (or the credit left over) is the new balance."""
    starting = balance_of(invoice.customer, invoice.currency)
    due = int(invoice.total) + starting
    if due < minimum_charge(invoice.currency):
        return starting, 0, due
    return starting, due, 0


class Lifecycle:
    """The routes that finalize an invoice, which then links its invoice_pdf and
    hosted_invoice_url to `public_base`, where the emulator is reachable (it does not
    serve them)."""

    def __init__(self, public_base: str) -> None:
        self.public_base = public_base

    def _finalize(self, invoice: Any) -> None:
        """draft → open, or paid when there is nothing to charge, with the customer's balance
        applied and the links Stripe sets then."""
        starting, due, ending = _settlement(invoice)
        invoice._starting_balance, invoice._amount_due, invoice._ending_balance = starting, due, ending
        settle_balance(invoice.customer, invoice.currency, ending)
        invoice._finalize()
        invoice.invoice_pdf = f"{self.public_base}/invoice/{invoice.id}/pdf"
        invoice.hosted_invoice_url = f"{self.public_base}/invoice/{invoice.id}"
        emit("invoice.finalized", invoice)
        if invoice.status == "paid":
            invoice._on_payment_success()

    def finalize_invoice(self, id: str, auto_advance: Any = None, **unknown: Any) -> Any:
        """POST /v1/invoices/{id}/finalize (missing from localstripe)."""
        reject_unknown(unknown)
        invoice = resources.Invoice._api_retrieve(id)
        auto_advance = as_bool(auto_advance, "auto_advance")
        if invoice.status != "draft":
            raise bad_request("This invoice is already finalized, you can't re-finalize a non-draft invoice.")
        if auto_advance is not None:
            invoice.auto_advance = auto_advance
        self._finalize(invoice)
        return invoice

    def pay_invoice(self, id: str, payment_method: Any = None, off_session: Any = None, **unknown: Any) -> Any:
        """POST /v1/invoices/{id}/pay: charges `payment_method`, else the invoice's
        default_payment_method, else the customer's default, through localstripe's
        PaymentIntent. A decline is a 402 card_error and leaves the invoice open, as on Stripe
        (stock localstripe answered 200 and sent no invoice.payment_failed)."""
        reject_unknown(unknown)
        as_bool(off_session, "off_session")  # accepted; the emulator charges at once either way
        invoice = resources.Invoice._api_retrieve(id)
        # Stripe's messages; its error codes (https://docs.stripe.com/error-codes) have none
        # for these two, so, as on Stripe, the errors carry no `code`.
        if invoice.status == "paid":
            raise bad_request("Invoice is already paid")
        if invoice.status == "void":
            raise bad_request("Voided invoices cannot be paid.")
        if invoice.status not in ("draft", "open", "uncollectible"):
            raise bad_request(f"This invoice is {invoice.status} and cannot be paid.")
        if payment_method:
            method = payment_method_of(invoice.customer, payment_method, "payment_method")
        elif invoice.default_payment_method:
            method = resources.PaymentMethod._api_retrieve(invoice.default_payment_method)
        else:
            method = resources.Customer._api_retrieve(invoice.customer)._get_default_payment_method_or_source()
        due = _settlement(invoice)[1] if invoice.status == "draft" else invoice.amount_due
        if method is None and due > 0:
            raise bad_request("This customer has no attached payment source or default payment method.")

        if invoice.status == "draft":
            self._finalize(invoice)  # Stripe finalizes a draft it is asked to pay
        if invoice.status == "paid":  # nothing to pay: finalizing settled it
            return invoice

        intent = resources.PaymentIntent(
            amount=invoice.amount_due, currency=invoice.currency, customer=invoice.customer, payment_method=method.id
        )
        intent.invoice = invoice.id
        invoice.payment_intent = intent.id
        invoice.attempt_count += 1
        invoice.attempted = True

        def declined() -> None:
            emit("payment_intent.payment_failed", intent)
            emit("invoice.payment_failed", invoice)
            intent.latest_charge._raise_failure()

        intent._confirm(on_failure_now=declined)
        return invoice


def void_invoice(id: str, **unknown: Any) -> Any:
    """POST /v1/invoices/{id}/void. Stock crashed on invoices without a payment attempt and
    sent no invoice.voided; Stripe voids finalized (open or uncollectible) invoices only."""
    reject_unknown(unknown)
    invoice = resources.Invoice._api_retrieve(id)
    if invoice.status not in ("open", "uncollectible"):
        raise bad_request(f"You can only void open or uncollectible invoices; this invoice is {invoice.status}.")
    if invoice.payment_intent:
        intent = resources.PaymentIntent._api_retrieve(invoice.payment_intent)
        if intent.status in ("requires_payment_method", "requires_confirmation", "requires_action"):
            intent._canceled, intent.next_action = True, None
    invoice._voided = True
    invoice.status_transitions["voided_at"] = int(time.time())
    if invoice.subscription:
        resources.Subscription._api_retrieve(invoice.subscription)._on_initial_payment_voided(invoice)
    emit("invoice.voided", invoice)
    return invoice


def mark_uncollectible(id: str, **unknown: Any) -> Any:
    """POST /v1/invoices/{id}/mark_uncollectible (missing from localstripe): open → uncollectible."""
    reject_unknown(unknown)
    invoice = resources.Invoice._api_retrieve(id)
    if invoice.status != "open":
        raise bad_request(f"Only open invoices can be marked uncollectible; this invoice is {invoice.status}.")
    invoice._uncollectible = True
    invoice.status_transitions["marked_uncollectible_at"] = int(time.time())
    emit("invoice.marked_uncollectible", invoice)
    return invoice


def _on_payment_success_with(stock: Callable[[Any], None]) -> Callable[[Any], None]:
    def on_payment_success(self: Any) -> None:
        """Stripe sends invoice.paid along with invoice.payment_succeeded, and an invoice
        payment with its own event; stock sends only the first."""
        stock(self)
        emit("invoice.paid", self)
        invoice_payments.record_paid(self)

    return on_payment_success


def patch() -> None:
    """Patches localstripe's Invoice class in place (see app.install)."""
    resources.Invoice._on_payment_success = _on_payment_success_with(resources.Invoice._on_payment_success)
