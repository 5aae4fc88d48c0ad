"""Invoices as the service creates them on Stripe: POST /v1/invoices with Stripe's draft
parameters, POST /v1/invoices/{id}/add_lines, GET /v1/invoices with Stripe's filters, and
Stripe's status and balance fields (finalize, pay, void, mark_uncollectible: invoice_lifecycle)."""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Callable, Iterator
from typing import Any

from service.domain import STATUSES
from tools.localstripe.customers import balance_of
from tools.localstripe.errors import as_bool, as_int, bad_request, invalid_param, missing, reject_unknown
from tools.localstripe.invoice_items import MAX_LINES_PER_INVOICE, not_editable, too_many_lines
from tools.localstripe.payment_methods import payment_method_of
from tools.localstripe.stock import emit, resources

# Stripe's five invoice statuses are the service's Status words; the emulator reads them
# from there rather than typing them out again (the emulator may import the service; the
# service never imports the emulator).
INVOICE_STATUSES = STATUSES
# Stripe documents no limit of its own for add_lines' `lines`
# (https://docs.stripe.com/api/invoice-line-item/bulk): the invoice's 250 bounds one call too.
MAX_LINES_PER_ADD = MAX_LINES_PER_INVOICE


@contextlib.contextmanager
def _pending_items_hidden() -> Iterator[None]:
    """Invoice.__init__ always sweeps the customer's pending items into its lines; this
    hides them for the length of one (synchronous) construction."""
    items = resources.InvoiceItem
    stock = items.__dict__["_api_list_all"]
    items._api_list_all = classmethod(lambda cls, url, **_: resources.List(url))
    try:
        yield
    finally:
        items._api_list_all = stock


INVOICE_CREATE_PARAMS = frozenset(
    {
        "customer",
        "subscription",
        "tax_percent",
        "default_tax_rates",
        "description",
        "metadata",
        "pending_invoice_items_behavior",
        "currency",
        "collection_method",
        "auto_advance",
        "default_payment_method",
    }
)


def _create_invoice(cls: Any, /, **params: Any) -> Any:
    """POST /v1/invoices. `exclude` makes an empty draft (Stripe's race-free way: the items
    are then attached by invoice id); `include` or nothing sweeps the customer's pending
    items; a `subscription` keeps localstripe's own subscription invoice."""
    reject_unknown({k: v for k, v in params.items() if k not in INVOICE_CREATE_PARAMS})
    behavior = params.pop("pending_invoice_items_behavior", None)
    if behavior not in (None, "include", "exclude"):
        raise invalid_param(f"Invalid value: {behavior!r}", param="pending_invoice_items_behavior")
    customer_id = params.get("customer")
    if not isinstance(customer_id, str) or not customer_id.startswith("cus_"):
        raise invalid_param("Missing required param: customer.", param="customer")
    customer = resources.Customer._api_retrieve(customer_id)

    currency = params.pop("currency", None)
    if currency is not None:
        currency = str(currency).lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise invalid_param(f"Invalid currency: {currency}.", param="currency")
    collection_method = params.pop("collection_method", None) or "charge_automatically"
    if collection_method != "charge_automatically":
        raise invalid_param("The emulator supports charge_automatically only.", param="collection_method")
    auto_advance = as_bool(params.pop("auto_advance", None), "auto_advance")
    pm_id = params.pop("default_payment_method", None) or None
    default_method = None if pm_id is None else payment_method_of(customer_id, pm_id, "default_payment_method")
    if params.get("metadata") == "":
        params["metadata"] = {}
    if not isinstance(params.get("metadata") or {}, dict):
        raise invalid_param("Invalid metadata: must be a hash.", param="metadata")

    if params.get("subscription"):
        invoice = resources.Invoice._get_next_invoice(pending_invoice_items_behavior=behavior, **params)
        created_event_sent = True
    else:
        pending = []
        if behavior != "exclude":
            pending = [
                item
                for item in resources.InvoiceItem._api_list_all(None, customer=customer_id, limit=999)._list
                if item.invoice is None and (currency is None or item.currency == currency)
            ]
            if not pending:
                raise bad_request("Nothing to invoice for customer", code="invoice_no_customer_line_items")
        params.pop("subscription", None)
        with _pending_items_hidden():
            # simulation=True: no webhook yet, it goes out below once every field is set.
            invoice = cls(simulation=True, **params)
        for item in reversed(pending):  # oldest first, as they were added
            item.invoice = invoice.id
            invoice.lines._list.append(resources.InvoiceLineItem(item))
        created_event_sent = False

    lines = invoice.lines._list
    invoice.currency = currency or (lines[0].currency if lines else customer.currency)
    invoice.collection_method = collection_method
    if auto_advance is not None:
        invoice.auto_advance = auto_advance
    invoice.default_payment_method = default_method.id if default_method is not None else None
    invoice.customer_name = customer.name
    invoice.attempt_count, invoice.attempted = 0, False
    invoice.status_transitions.setdefault("marked_uncollectible_at", None)
    if not created_event_sent:
        emit("invoice.created", invoice)
    return invoice


ADD_LINE_PARAMS = frozenset({"amount", "description", "metadata"})


def metadata_of(value: Any, param: str) -> dict[str, Any]:
    """A metadata parameter: a hash, or "" for none."""
    if value is None or value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid_param("Invalid metadata: must be a hash of strings.", param=param)
    return value


def merge_metadata(obj: Any, value: Any) -> None:
    """Stripe's update of an object's metadata: "" unsets all of it, a hash merges, and an
    empty value unsets its key (`value` already checked with metadata_of)."""
    if value == "":
        obj.metadata = {}
    elif isinstance(value, dict):
        for key, item in value.items():
            if item == "":
                obj.metadata.pop(key, None)
            else:
                obj.metadata[key] = item


def _line_params(index: int, line: Any) -> dict[str, Any]:
    """One entry of add_lines' `lines`, checked before any line is made (the call adds all or none)."""
    prefix = f"lines[{index}]"
    if not isinstance(line, dict):
        raise invalid_param(f"Invalid {prefix}: must be a hash.", param=prefix)
    # Stripe knows invoice_item, price_data, quantity, ...: the emulator makes the
    # one-off amount lines the service sends, and refuses the rest rather than ignore them.
    reject_unknown({f"{prefix}[{k}]": v for k, v in line.items() if k not in ADD_LINE_PARAMS})
    if "amount" not in line:
        raise missing(f"{prefix}[amount]")
    amount = as_int(line["amount"], f"{prefix}[amount]")
    description = line.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid_param(f"Invalid string: {description!r}", param=f"{prefix}[description]")
    metadata = metadata_of(line.get("metadata"), f"{prefix}[metadata]")
    return {"amount": amount, "description": description, "metadata": metadata}


def add_lines(id: str, lines: Any = None, invoice_metadata: Any = None, **unknown: Any) -> Any:
    """POST /v1/invoices/{id}/add_lines (missing from localstripe): each line becomes an
    invoice item of this draft, in the given order, in the invoice's currency; a bad line
    adds none of them, as on Stripe."""
    reject_unknown(unknown)
    if not isinstance(lines, list) or not lines:
        raise missing("lines")
    if len(lines) > MAX_LINES_PER_ADD:
        raise invalid_param(f"You can add at most {MAX_LINES_PER_ADD} lines at once.", param="lines")
    items = [_line_params(index, line) for index, line in enumerate(lines)]
    if invoice_metadata is not None and invoice_metadata != "":
        metadata_of(invoice_metadata, "invoice_metadata")
    invoice = resources.Invoice._api_retrieve(id)
    if invoice.status != "draft":
        raise not_editable(invoice)
    if len(invoice.lines._list) + len(items) > MAX_LINES_PER_INVOICE:
        raise too_many_lines(param="lines")

    for params in items:
        resources.InvoiceItem._api_create(
            invoice=invoice.id, customer=invoice.customer, currency=invoice.currency, **params
        )
    merge_metadata(invoice, invoice_metadata)
    emit("invoice.updated", invoice)
    return invoice


INVOICE_LIST_PARAMS = frozenset({"customer", "subscription", "limit", "starting_after"})


def _created_filter(op: str, raw: Any) -> Callable[[Any], bool]:
    compare = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le, "eq": operator.eq}[op]
    bound = resources.try_convert_to_int(raw)
    if not isinstance(bound, int):
        raise invalid_param(f"Invalid integer: {raw!r}", param="created" if op == "eq" else f"created[{op}]")
    return lambda obj: bool(compare(obj.created, bound))


def created_filters(created: Any) -> list[Callable[[Any], bool]]:
    """A list's `created` parameter (an exact time, or created[gt|gte|lt|lte]) as filters."""
    if isinstance(created, dict) and created and set(created) <= {"gt", "gte", "lt", "lte"}:
        return [_created_filter(op, raw) for op, raw in created.items()]
    if created is None:
        return []
    if isinstance(created, str):
        return [_created_filter("eq", created)]
    raise invalid_param("Invalid created: use created, created[gt], created[gte], created[lt] or created[lte].")


def _list_invoices_with(stock_list: Callable[..., Any]) -> Callable[..., Any]:
    def list_invoices(cls: Any, url: str, created: Any = None, status: Any = None, **params: Any) -> Any:
        """GET /v1/invoices, with Stripe's created[...] and status filters, newest first."""
        reject_unknown({k: v for k, v in params.items() if k not in INVOICE_LIST_PARAMS})
        filters = created_filters(created)
        if status is not None and status not in INVOICE_STATUSES:
            raise invalid_param(f"Invalid status: {status!r}", param="status")
        page = stock_list(url, **params)
        # Stock sorts by `date` with ties oldest first; Stripe lists by `created`, newest first.
        kept = [i for i in reversed(page._list) if all(f(i) for f in filters) and status in (None, i.status)]
        page._list = sorted(kept, key=lambda i: i.created, reverse=True)
        return page

    return list_invoices


def _status_with(stock_status: Callable[[Any], str]) -> Callable[[Any], str]:
    def status(self: Any) -> str:
        """Stock statuses, plus `uncollectible` for an open invoice marked so, and `paid`
        for one finalized with nothing to charge (credit, or below the minimum charge)."""
        value = stock_status(self)
        if value == "open" and self._amount_due is not None and self._amount_due <= 0:
            return "paid"
        return "uncollectible" if value == "open" and getattr(self, "_uncollectible", False) else value

    return status


def _invoice_starting_balance(self: Any) -> int:
    """Stripe: the customer's balance when the invoice was finalized, its current balance
    before (stock kept its own snapshot from creation, with the sign inverted)."""
    if self._starting_balance is not None:
        return int(self._starting_balance)
    return balance_of(self.customer, self.currency) if self.status == "draft" else 0


def _invoice_ending_balance(self: Any) -> int | None:
    """Stripe: the customer's balance after finalization, null before."""
    return None if self._ending_balance is None else int(self._ending_balance)


def _invoice_total(self: Any) -> int:
    """Stripe's total: lines and tax; the customer balance only changes amount_due."""
    return int(self.subtotal + self.tax)


def _invoice_amount_due(self: Any) -> int:
    """Fixed at finalization; a draft's takes the customer's current balance into account."""
    if self._amount_due is not None:
        return int(self._amount_due)
    if self.status == "draft":
        return max(0, int(self.total) + balance_of(self.customer, self.currency))
    return int(self.total)  # finalized by stock localstripe (subscriptions), which charges the total


def _ignore_stock_value(self: Any, value: Any) -> None:
    """Invoice.__init__ assigns its own balance fields; these properties compute Stripe's."""


def patch() -> None:
    """Patches localstripe's Invoice class in place (see app.install)."""
    invoice = resources.Invoice
    # Class attributes are exported like instance ones (localstripe's _export walks dir()),
    # so every invoice, old pickled ones included, shows these fields.
    invoice.auto_advance = False
    invoice.default_payment_method = None
    invoice.invoice_pdf = None
    invoice.hosted_invoice_url = None
    invoice.customer_name = None
    invoice.amount_remaining = property(lambda self: self.amount_due - self.amount_paid)
    # Stripe's balance fields; the private ones are set at finalization (None before).
    invoice._starting_balance = invoice._amount_due = invoice._ending_balance = None
    invoice.starting_balance = property(_invoice_starting_balance, _ignore_stock_value)
    invoice.ending_balance = property(_invoice_ending_balance, _ignore_stock_value)
    invoice.total = property(_invoice_total)
    invoice.amount_due = property(_invoice_amount_due)
    invoice.status = property(_status_with(invoice.status.fget))
    invoice._api_create = classmethod(_create_invoice)
    invoice._api_list_all = classmethod(_list_invoices_with(invoice._api_list_all))
