"""Invoice payments as Stripe keeps them since 2025-03-31.basil, which took `payment_intent`
off the invoice (shapes.py no longer answers it): a refund names its payment intent, and
only an invoice payment says whose that is. Stock localstripe has none. An invoice paid by
a payment intent gets one, `invoice_payment.paid` is sent with it ("Occurs when an
InvoicePayment is successfully paid", Stripe's event types), and GET /v1/invoice_payments
takes Stripe's filters: `invoice`, `payment[type]` with `payment[payment_intent]`,
`status`, `created`. Shape: the `invoice_payment` object of Stripe's fixtures."""

from __future__ import annotations

from typing import Any

from tools.localstripe import store_index
from tools.localstripe.errors import invalid_param, one_of, reject_unknown
from tools.localstripe.invoices import created_filters
from tools.localstripe.stock import emit, resources

LIST_PARAMS = frozenset({"limit", "starting_after", "ending_before"})


class InvoicePayment(resources.StripeObject):  # type: ignore[misc]  # localstripe is untyped
    object = "invoice_payment"
    _id_prefix = "inpay_"

    def __init__(self, invoice: Any, intent: Any) -> None:
        super().__init__()
        self.livemode, self.invoice, self.currency = False, invoice.id, invoice.currency
        self.amount_requested = self.amount_paid = int(intent.amount)
        self.is_default, self.status = True, "paid"
        self.payment = {"type": "payment_intent", "payment_intent": intent.id}
        self.status_transitions = {"canceled_at": None, "paid_at": self.created}


def record_paid(invoice: Any) -> None:
    """An invoice just paid by its payment intent: its invoice payment, and the event."""
    intent_id = getattr(invoice, "payment_intent", None)  # localstripe's own attribute
    if not intent_id:
        return  # settled without a payment (a credit note, the customer's balance)
    intent = resources.PaymentIntent._api_retrieve(intent_id)
    if intent.status == "succeeded":  # not a declined attempt's, before a note settled it
        emit("invoice_payment.paid", InvoicePayment(invoice, intent))


def list_payments(
    invoice: Any = None, payment: Any = None, status: Any = None, created: Any = None, **params: Any
) -> Any:
    """GET /v1/invoice_payments, newest first."""
    reject_unknown({k: v for k, v in params.items() if k not in LIST_PARAMS})
    filters = created_filters(created)
    if invoice is not None:
        filters.append(lambda p: p.invoice == invoice)
    if status is not None:
        one_of(status, ("canceled", "open", "paid"), "status")
        filters.append(lambda p: p.status == status)
    if payment is not None:
        if not isinstance(payment, dict) or "type" not in payment:
            raise invalid_param("Missing required param: payment[type].", param="payment[type]")
        one_of(payment["type"], ("payment_intent", "payment_record"), "payment[type]")
        wanted = {k: v for k, v in payment.items() if k != "type"}
        filters.append(
            lambda p: p.payment["type"] == payment["type"] and all(p.payment.get(k) == v for k, v in wanted.items())
        )
    page = resources.List("/v1/invoice_payments", **params)
    found = store_index.of_type(InvoicePayment.object)
    page._list = sorted((p for p in found if all(f(p) for f in filters)), key=lambda p: p.created, reverse=True)
    return page
