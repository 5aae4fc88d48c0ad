"""POST /v1/invoiceitems with invoice=in_...: the item becomes a line of that draft (never
a pending item another invoice could sweep up, as in stock localstripe); a non-draft
invoice is a 400 invoice_not_editable, and an invoice holds at most 250 lines."""

from __future__ import annotations

from typing import Any

from tools.localstripe.errors import bad_request
from tools.localstripe.stock import resources

# Stripe refuses more than 250 invoice items on one invoice:
# https://docs.stripe.com/changelog/2016-02-22/no-more-than-250-invoice-items
MAX_LINES_PER_INVOICE = 250


def not_editable(invoice: Any, **contents: str) -> Any:
    """Stripe's code for changing the lines of an invoice that is no longer a draft."""
    return bad_request(
        f"Invoice {invoice.id} is {invoice.status}; lines can only be added to draft invoices.",
        code="invoice_not_editable",
        **contents,
    )


def too_many_lines(**contents: str) -> Any:
    return bad_request(f"An invoice can have at most {MAX_LINES_PER_INVOICE} line items.", **contents)


def _create_invoice_item(cls: Any, /, **params: Any) -> Any:
    """POST /v1/invoiceitems. With invoice=in_..., the item is a line of that draft (and
    never a pending item another invoice could sweep up, as in stock localstripe)."""
    invoice_id = params.get("invoice")
    invoice = None
    if isinstance(invoice_id, str) and invoice_id.startswith("in_"):
        invoice = resources.Invoice._api_retrieve(invoice_id)
        if invoice.status != "draft":
            raise not_editable(invoice, param="invoice")
        if len(invoice.lines._list) >= MAX_LINES_PER_INVOICE:
            raise too_many_lines(param="invoice")
        params.setdefault("customer", invoice.customer)
        if params["customer"] != invoice.customer:
            raise bad_request(f"Invoice {invoice_id} belongs to customer {invoice.customer}.", param="customer")
        params.setdefault("currency", invoice.currency)
        if str(params["currency"]).lower() != invoice.currency:
            raise bad_request(
                f"The currency {params['currency']} does not match the invoice's currency {invoice.currency}.",
                param="currency",
            )
        params["currency"] = invoice.currency
    item = cls(**params)
    if invoice is not None:
        invoice.lines._list.append(resources.InvoiceLineItem(item))
    return item


def patch() -> None:
    """Patches localstripe's classes in place (see app.install)."""
    resources.InvoiceItem._api_create = classmethod(_create_invoice_item)
