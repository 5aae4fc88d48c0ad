"""The Stripe emulator for the tests and `make run`: localstripe, extended in memory for
the calls InvoiceService makes against real Stripe.

    python -m tools.localstripe_launcher --port 8420 [--from-scratch] [--host 127.0.0.1]

Why it exists: the service must only make calls that are valid for real Stripe, and it
creates an invoice the race-free way (a draft with pending_invoice_items_behavior=exclude,
its items attached by invoice id, finalize, then pay with a given payment method), each
call carrying an Idempotency-Key. Stock localstripe 1.15.10 crashes on or refuses most of
these and ignores idempotency keys. Rather than bend the service to the emulator, this
launcher imports localstripe's modules, patches its classes and routes, adds middlewares
to its aiohttp app before it starts, and serves it:

- POST /v1/invoices: also takes currency, collection_method, auto_advance,
  default_payment_method; with pending_invoice_items_behavior=exclude it makes an empty
  draft in that currency (never "nothing to invoice"); otherwise it sweeps the customer's
  pending items, also for customers without a subscription.
- POST /v1/invoiceitems with invoice=in_...: the item becomes a line of that draft; a
  non-draft invoice is a 400 invoice_not_editable, and an invoice holds at most 250 lines.
- POST /v1/invoices/{id}/add_lines (new): lines[i][amount|description|metadata] and
  invoice_metadata; each line becomes an invoice item of that draft, in order, all or
  none; emits invoice.updated.
- POST /v1/customers and /v1/customers/{id} take `balance` (negative is credit), and
  customers show it.
- POST /v1/invoices/{id}/finalize and /mark_uncollectible (new); /pay takes
  payment_method and answers a decline with a Stripe-shaped 402 card error; /void accepts
  invoices that never had a payment attempt. Each emits its Stripe webhook. Finalizing
  sets invoice_pdf and hosted_invoice_url (null before) to links on the emulator, which
  it does not serve.
- Finalizing (also through /pay of a draft) applies the customer's balance first
  (starting_balance, ending_balance), then settles an amount due below the currency's
  minimum charge as Stripe does: the invoice is paid with amount_due 0 and the amount is
  carried to the customer's balance, for the next invoice. `total` no longer includes
  the balance. /pay of a paid or void invoice is Stripe's 400.
- POST /v1/payment_methods/{id}/attach: Stripe's declining test cards (4000000000000002,
  ...) are refused with a card_error, as Stripe refuses them; 4000000000000341 attaches
  and declines when charged.
- GET /v1/invoices takes created[gt|gte|lt|lte] and status, newest first.
- Every POST with an Idempotency-Key is replayed, or refused with idempotency_error when
  its parameters differ, as Stripe does (kept in memory only): 2xx, 402 and 5xx answers
  are saved, 4xx validation errors are not.
- Errors look like Stripe's: card_error with decline_code for 402s, resource_missing for
  404s, "Received unknown parameters" instead of crashes for the invoice calls, and an
  api_error 500 for a crash in the emulator.
- Test hooks under /_config/: POST /_config/idempotency/forget (Stripe's 24 h expiry,
  now); POST and DELETE /_config/faults (the next matching requests answer a 500, before
  or after running, saved under their idempotency key); GET and DELETE /_config/calls
  (how many /v1 calls, by method and route).

localstripe is GPL-3 test/dev tooling. It runs as its own process, started by
tools/stack.py and the tests; the service package never imports localstripe or this
module, it only talks HTTP to it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import operator
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.typedefs import Handler

# localstripe ships no type information; modules from importlib are plain `ModuleType`s
# whose attributes mypy treats as Any, so its classes need no per-line ignores.
# localstripe.server is imported only in build_app(): it registers routes from
# resources.extra_apis when imported, so the route patches below must come first.
resources: Any = importlib.import_module("localstripe.resources")
UserError: Any = importlib.import_module("localstripe.errors").UserError

INVOICE_STATUSES = ("draft", "open", "paid", "uncollectible", "void")
# Stripe keeps idempotency keys for at least 24 hours; older ones may be reused.
IDEMPOTENCY_TTL_S = 24 * 3600
# Stripe refuses more than 250 invoice items on one invoice:
# https://docs.stripe.com/changelog/2016-02-22/no-more-than-250-invoice-items
MAX_LINES_PER_INVOICE = 250
# Stripe documents no limit of its own for add_lines' `lines`
# (https://docs.stripe.com/api/invoice-line-item/bulk): the invoice's 250 bounds one call too.
MAX_LINES_PER_ADD = MAX_LINES_PER_INVOICE
# Stripe's "Minimum and maximum charge amounts", in minor units (JPY has none):
# https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts. An invoice whose
# amount due is below it is marked paid and the amount carried to the customer's balance.
MINIMUM_CHARGE: dict[str, int] = {
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
DEFAULT_MINIMUM_CHARGE = 50  # $0.50, Stripe's minimum "or equivalent in charge currency"


@dataclass
class Settings:
    """Where the emulator is reachable: the base of the invoice_pdf/hosted_invoice_url links."""

    public_base: str = "http://127.0.0.1:8420"


SETTINGS = Settings()


# --- Stripe-shaped errors ------------------------------------------------------------


@dataclass(frozen=True)
class Decline:
    code: str
    decline_code: str | None
    message: str


GENERIC_DECLINE = Decline("card_declined", "generic_decline", "Your card was declined.")
# Stripe's test cards (https://docs.stripe.com/testing#declined-payments). localstripe
# already refuses to attach these, like Stripe; this table gives each its Stripe error.
DECLINES: dict[str, Decline] = {
    "4000000000000002": GENERIC_DECLINE,
    "4000000000000341": GENERIC_DECLINE,  # attaches fine, every charge declines
    "4000000000009995": Decline("card_declined", "insufficient_funds", "Your card has insufficient funds."),
    "4000000000009987": Decline("card_declined", "lost_card", "Your card was declined."),
    "4000000000009979": Decline("card_declined", "stolen_card", "Your card was declined."),
    "4000000000000069": Decline("expired_card", "expired_card", "Your card has expired."),
    "4000000000000127": Decline("incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."),
    "4000000000000119": Decline(
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
    "4242424242424241": Decline("incorrect_number", None, "Your card number is incorrect."),
}


def bad_request(message: str, **contents: str) -> Any:
    """A 400 invalid_request_error, raised by the caller; localstripe's error middleware renders it."""
    return UserError(400, message, dict(contents))


def card_error(decline: Decline, **contents: str) -> Any:
    """A 402 the stripe SDK turns into stripe.CardError, with Stripe's code and decline_code."""
    body: dict[str, Any] = {"code": decline.code, **contents}
    if decline.decline_code:
        body["decline_code"] = decline.decline_code
    body["doc_url"] = "https://stripe.com/docs/error-codes/" + decline.code.replace("_", "-")
    error = UserError(402, decline.message, body)
    error.body["error"]["type"] = "card_error"
    return error


def decline_for(payment_method: Any) -> Decline:
    return DECLINES.get(getattr(payment_method, "_card_number", None) or "", GENERIC_DECLINE)


def reject_unknown(params: dict[str, Any]) -> None:
    """Stripe answers 400 for unknown parameters; a Python TypeError here would be a 500."""
    if params:
        raise bad_request("Received unknown parameters: " + ", ".join(sorted(params)), param=sorted(params)[0])


def as_bool(value: Any, param: str) -> bool | None:
    value = resources.try_convert_to_bool(value)
    if value is None or isinstance(value, bool):
        return value
    raise bad_request(f"Invalid boolean: {value!r}", param=param)


def emit(event_type: str, obj: Any) -> None:
    """Schedules a signed webhook with localstripe's own machinery (a snapshot taken now)."""
    resources.schedule_webhook(resources.Event(event_type, obj))


# --- localstripe patches -------------------------------------------------------------


def _retrieve(cls: Any, /, id: str) -> Any:
    """StripeObject._api_retrieve with Stripe's message and code, so the SDK's
    InvalidRequestError says which object is missing."""
    obj = resources.store.get(f"{cls.object}:{id}")
    if obj is None:
        raise UserError(404, f"No such {cls.object}: '{id}'", {"code": "resource_missing"})
    return obj


def _with_int_balance(data: dict[str, Any]) -> dict[str, Any]:
    """Customer `balance` is an integer in minor units (a form sends it as a string)."""
    if "balance" in data:
        value = resources.try_convert_to_int(data["balance"])
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_request(f"Invalid integer: {data['balance']}", param="balance", code="parameter_invalid_integer")
        data["balance"] = value
    return data


def _customer_create_with(stock_create: Callable[..., Any]) -> Callable[..., Any]:
    def create(cls: Any, /, **data: Any) -> Any:
        """POST /v1/customers, with Stripe's message for a bad `balance` (stock: "Bad request")."""
        return stock_create(**_with_int_balance(data))

    return create


def _customer_update_with(stock_update: Callable[..., Any]) -> Callable[..., Any]:
    def update(cls: Any, /, id: str, **data: Any) -> Any:
        """POST /v1/customers/{id}: stock refuses `balance`, a field it has no attribute for."""
        return stock_update(id, **_with_int_balance(data))

    return update


def _get_customer_balance(self: Any) -> int:
    """Stripe's `balance`: negative is credit for the next invoices, positive is owed.
    Stock keeps it, inverted, as account_balance (what old pickled stores hold)."""
    return -int(self.account_balance)


def _set_customer_balance(self: Any, value: int) -> None:
    self.account_balance = -int(value)


def _payment_method_of(customer_id: str, pm_id: Any, param: str) -> Any:
    """The payment method, which Stripe requires to be attached to the invoice's customer."""
    if not isinstance(pm_id, str) or not pm_id.startswith(("pm_", "card_", "src_")):
        raise bad_request(f"Invalid payment method id: {pm_id!r}", param=param)
    method = resources.PaymentMethod._api_retrieve(pm_id)
    if getattr(method, "customer", None) != customer_id:
        raise bad_request(
            f"The customer does not have a payment method with the ID {pm_id}. "
            "The payment method must be attached to the customer.",
            param=param,
        )
    return method


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
        raise bad_request(f"Invalid value: {behavior!r}", param="pending_invoice_items_behavior")
    customer_id = params.get("customer")
    if not isinstance(customer_id, str) or not customer_id.startswith("cus_"):
        raise bad_request("Missing required param: customer.", param="customer")
    customer = resources.Customer._api_retrieve(customer_id)

    currency = params.pop("currency", None)
    if currency is not None:
        currency = str(currency).lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise bad_request(f"Invalid currency: {currency}.", param="currency")
    collection_method = params.pop("collection_method", None) or "charge_automatically"
    if collection_method != "charge_automatically":
        raise bad_request("The emulator supports charge_automatically only.", param="collection_method")
    auto_advance = as_bool(params.pop("auto_advance", None), "auto_advance")
    pm_id = params.pop("default_payment_method", None) or None
    default_method = None if pm_id is None else _payment_method_of(customer_id, pm_id, "default_payment_method")
    if params.get("metadata") == "":
        params["metadata"] = {}
    if not isinstance(params.get("metadata") or {}, dict):
        raise bad_request("Invalid metadata: must be a hash.", param="metadata")

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


def not_editable(invoice: Any, **contents: str) -> Any:
    """Stripe's code for changing the lines of an invoice that is no longer a draft."""
    return bad_request(
        f"Invoice {invoice.id} is {invoice.status}; lines can only be added to draft invoices.",
        code="invoice_not_editable",
        **contents,
    )


def too_many_lines(**contents: str) -> Any:
    return bad_request(f"An invoice can have at most {MAX_LINES_PER_INVOICE} line items.", **contents)


ADD_LINE_PARAMS = frozenset({"amount", "description", "metadata"})


def _metadata_of(value: Any, param: str) -> dict[str, Any]:
    """A metadata parameter: a hash, or "" for none."""
    if value is None or value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise bad_request("Invalid metadata: must be a hash of strings.", param=param)
    return value


def _line_params(index: int, line: Any) -> dict[str, Any]:
    """One entry of add_lines' `lines`, checked before any line is made (the call adds all or none)."""
    prefix = f"lines[{index}]"
    if not isinstance(line, dict):
        raise bad_request(f"Invalid {prefix}: must be a hash.", param=prefix)
    # Stripe knows invoice_item, price_data, quantity, ...: the emulator makes the
    # one-off amount lines the service sends, and refuses the rest rather than ignore them.
    reject_unknown({f"{prefix}[{k}]": v for k, v in line.items() if k not in ADD_LINE_PARAMS})
    if "amount" not in line:
        raise bad_request(
            f"Missing required param: {prefix}[amount].", param=f"{prefix}[amount]", code="parameter_missing"
        )
    amount = resources.try_convert_to_int(line["amount"])
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise bad_request(
            f"Invalid integer: {line['amount']}", param=f"{prefix}[amount]", code="parameter_invalid_integer"
        )
    description = line.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"Invalid string: {description!r}", param=f"{prefix}[description]")
    metadata = _metadata_of(line.get("metadata"), f"{prefix}[metadata]")
    return {"amount": amount, "description": description, "metadata": metadata}


def add_lines(id: str, lines: Any = None, invoice_metadata: Any = None, **unknown: Any) -> Any:
    """POST /v1/invoices/{id}/add_lines (missing from localstripe): each line becomes an
    invoice item of this draft, in the given order, in the invoice's currency; a bad line
    adds none of them, as on Stripe."""
    reject_unknown(unknown)
    if not isinstance(lines, list) or not lines:
        raise bad_request("Missing required param: lines.", param="lines", code="parameter_missing")
    if len(lines) > MAX_LINES_PER_ADD:
        raise bad_request(f"You can add at most {MAX_LINES_PER_ADD} lines at once.", param="lines")
    items = [_line_params(index, line) for index, line in enumerate(lines)]
    if invoice_metadata is not None and invoice_metadata != "":
        _metadata_of(invoice_metadata, "invoice_metadata")
    invoice = resources.Invoice._api_retrieve(id)
    if invoice.status != "draft":
        raise not_editable(invoice)
    if len(invoice.lines._list) + len(items) > MAX_LINES_PER_INVOICE:
        raise too_many_lines(param="lines")

    for params in items:
        resources.InvoiceItem._api_create(
            invoice=invoice.id, customer=invoice.customer, currency=invoice.currency, **params
        )
    if invoice_metadata == "":
        invoice.metadata = {}
    elif isinstance(invoice_metadata, dict):  # Stripe merges; an empty value unsets its key
        for key, value in invoice_metadata.items():
            if value == "":
                invoice.metadata.pop(key, None)
            else:
                invoice.metadata[key] = value
    emit("invoice.updated", invoice)
    return invoice


INVOICE_LIST_PARAMS = frozenset({"customer", "subscription", "limit", "starting_after"})


def _created_filter(op: str, raw: Any) -> Callable[[Any], bool]:
    compare = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le, "eq": operator.eq}[op]
    bound = resources.try_convert_to_int(raw)
    if not isinstance(bound, int):
        raise bad_request(f"Invalid integer: {raw!r}", param="created" if op == "eq" else f"created[{op}]")
    return lambda obj: bool(compare(obj.created, bound))


def _list_invoices_with(stock_list: Callable[..., Any]) -> Callable[..., Any]:
    def list_invoices(cls: Any, url: str, created: Any = None, status: Any = None, **params: Any) -> Any:
        """GET /v1/invoices, with Stripe's created[...] and status filters, newest first."""
        reject_unknown({k: v for k, v in params.items() if k not in INVOICE_LIST_PARAMS})
        if isinstance(created, dict) and created and set(created) <= {"gt", "gte", "lt", "lte"}:
            filters = [_created_filter(op, raw) for op, raw in created.items()]
        elif created is None:
            filters = []
        elif isinstance(created, str):
            filters = [_created_filter("eq", created)]
        else:
            raise bad_request("Invalid created: use created, created[gt], created[gte], created[lt] or created[lte].")
        if status is not None and status not in INVOICE_STATUSES:
            raise bad_request(f"Invalid status: {status!r}", param="status")
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


def _customer_balance(customer_id: str) -> int:
    customer = resources.store.get(f"customer:{customer_id}")
    return 0 if customer is None else int(customer.balance)


def _invoice_starting_balance(self: Any) -> int:
    """Stripe: the customer's balance when the invoice was finalized, its current balance
    before (stock kept its own snapshot from creation, with the sign inverted)."""
    if self._starting_balance is not None:
        return int(self._starting_balance)
    return _customer_balance(self.customer) if self.status == "draft" else 0


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
        return max(0, int(self.total) + _customer_balance(self.customer))
    return int(self.total)  # finalized by stock localstripe (subscriptions), which charges the total


def _ignore_stock_value(self: Any, value: Any) -> None:
    """Invoice.__init__ assigns its own balance fields; these properties compute Stripe's."""


def minimum_charge(currency: str) -> int:
    return MINIMUM_CHARGE.get(currency.lower(), DEFAULT_MINIMUM_CHARGE)


def _settlement(invoice: Any) -> tuple[int, int, int]:
    """(starting_balance, amount_due, ending_balance) if `invoice` were finalized now.
    Stripe applies the customer's balance (negative is credit, positive is owed) first;
    an amount due below the currency's minimum charge, or none, is not charged: the
    invoice is paid and the amount (or the credit left over) is the new balance."""
    starting = _customer_balance(invoice.customer)
    due = int(invoice.total) + starting
    if due < minimum_charge(invoice.currency):
        return starting, 0, due
    return starting, due, 0


def _on_payment_success_with(stock: Callable[[Any], None]) -> Callable[[Any], None]:
    def on_payment_success(self: Any) -> None:
        """Stripe sends invoice.paid along with invoice.payment_succeeded; stock sends only the latter."""
        stock(self)
        emit("invoice.paid", self)

    return on_payment_success


def _charging_is_declined_with(stock: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def charging_is_declined(self: Any) -> bool:
        """Cards Stripe refuses to attach (4000000000000002, ...) also decline when charged directly."""
        return bool(stock(self) or self._attaching_is_declined())

    return charging_is_declined


def _set_auth_failure(self: Any) -> None:
    """Charge._set_auth_failure with the card's own Stripe code and decline_code."""
    decline = decline_for(resources.PaymentMethod._api_retrieve(self.payment_method))
    self.status = "failed"
    self.failure_code = decline.code
    self.failure_message = decline.message
    self._decline_code = decline.decline_code  # private: a plain str, so the pickled store stays loadable


def _raise_failure(self: Any) -> None:
    decline = Decline(self.failure_code, getattr(self, "_decline_code", None), self.failure_message)
    raise card_error(decline, charge=self.id)


def _finalize(invoice: Any) -> None:
    """draft → open, or paid when there is nothing to charge, with the customer's balance
    applied and the links Stripe sets then."""
    starting, due, ending = _settlement(invoice)
    invoice._starting_balance, invoice._amount_due, invoice._ending_balance = starting, due, ending
    customer = resources.store.get(f"customer:{invoice.customer}")
    if customer is not None:
        customer.balance = ending
    invoice._finalize()
    invoice.invoice_pdf = f"{SETTINGS.public_base}/invoice/{invoice.id}/pdf"
    invoice.hosted_invoice_url = f"{SETTINGS.public_base}/invoice/{invoice.id}"
    emit("invoice.finalized", invoice)
    if invoice.status == "paid":
        invoice._on_payment_success()


def finalize_invoice(id: str, auto_advance: Any = None, **unknown: Any) -> Any:
    """POST /v1/invoices/{id}/finalize (missing from localstripe)."""
    reject_unknown(unknown)
    invoice = resources.Invoice._api_retrieve(id)
    auto_advance = as_bool(auto_advance, "auto_advance")
    if invoice.status != "draft":
        raise bad_request("This invoice is already finalized, you can't re-finalize a non-draft invoice.")
    if auto_advance is not None:
        invoice.auto_advance = auto_advance
    _finalize(invoice)
    return invoice


def pay_invoice(id: str, payment_method: Any = None, off_session: Any = None, **unknown: Any) -> Any:
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
        method = _payment_method_of(invoice.customer, payment_method, "payment_method")
    elif invoice.default_payment_method:
        method = resources.PaymentMethod._api_retrieve(invoice.default_payment_method)
    else:
        method = resources.Customer._api_retrieve(invoice.customer)._get_default_payment_method_or_source()
    due = _settlement(invoice)[1] if invoice.status == "draft" else invoice.amount_due
    if method is None and due > 0:
        raise bad_request("This customer has no attached payment source or default payment method.")

    if invoice.status == "draft":
        _finalize(invoice)  # Stripe finalizes a draft it is asked to pay
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


def _attach_with(stock_attach: Callable[..., Any]) -> Callable[..., Any]:
    def attach(id: str, **params: Any) -> Any:
        """Stock declines attaching Stripe's declining test cards (as Stripe does) with an
        invalid_request_error; Stripe answers a card_error naming the decline."""
        try:
            return stock_attach(id, **params)
        except UserError as exc:
            if exc.code != 402:
                raise
            raise card_error(decline_for(resources.PaymentMethod._api_retrieve(id))) from exc

    return attach


def _set_route(method: str, path: str, func: Callable[..., Any]) -> None:
    """Replaces or adds an entry of localstripe's extra routes (read when server imports)."""
    routes = resources.extra_apis
    for index, (m, p, _) in enumerate(routes):
        if (m, p) == (method, path):
            routes[index] = (method, path, func)
            return
    routes.append((method, path, func))


_installed = False


def install() -> None:
    """Patches localstripe.resources in place. Must run before localstripe.server is imported."""
    global _installed
    if _installed:
        return
    if "localstripe.server" in sys.modules:
        raise RuntimeError("localstripe.server was imported before the launcher could patch its routes")
    r = resources
    r.StripeObject._api_retrieve = classmethod(_retrieve)

    invoice = r.Invoice
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
    invoice._on_payment_success = _on_payment_success_with(invoice._on_payment_success)
    invoice._api_create = classmethod(_create_invoice)
    invoice._api_list_all = classmethod(_list_invoices_with(invoice._api_list_all))
    r.InvoiceItem._api_create = classmethod(_create_invoice_item)
    customer = r.Customer
    customer.balance = property(_get_customer_balance, _set_customer_balance)
    customer._api_create = classmethod(_customer_create_with(customer._api_create))
    customer._api_update = classmethod(_customer_update_with(customer._api_update))
    r.PaymentMethod._charging_is_declined = _charging_is_declined_with(r.PaymentMethod._charging_is_declined)
    r.Charge._set_auth_failure = _set_auth_failure
    r.Charge._raise_failure = _raise_failure

    # Only the routes change: localstripe's subscriptions keep calling the stock
    # Invoice._api_pay_invoice, which must not raise on a decline.
    _set_route("POST", "/v1/invoices/{id}/finalize", finalize_invoice)
    _set_route("POST", "/v1/invoices/{id}/add_lines", add_lines)
    _set_route("POST", "/v1/invoices/{id}/pay", pay_invoice)
    _set_route("POST", "/v1/invoices/{id}/void", void_invoice)
    _set_route("POST", "/v1/invoices/{id}/mark_uncollectible", mark_uncollectible)
    _set_route("POST", "/v1/payment_methods/{id}/attach", _attach_with(r.PaymentMethod._api_attach))
    _installed = True


# --- middlewares ---------------------------------------------------------------------


def error_response(status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error}, status=status, headers=headers)


def api_error(message: str) -> web.Response:
    """Stripe's answer when it fails internally: a 500 api_error."""
    return error_response(500, {"type": "api_error", "message": message})


@web.middleware
async def stripe_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Renders localstripe's UserError itself (so the idempotency middleware sees a
    response) and gives 402s and 404s the type and code Stripe would; a crash is Stripe's
    500 api_error, which the idempotency middleware then saves, as Stripe does."""
    try:
        return await handler(request)
    except UserError as exc:
        error = exc.body["error"]
        if exc.code == 402:
            error["type"] = "card_error"
            if error.get("code") == "card_declined":
                error.setdefault("decline_code", "generic_decline")
        elif exc.code == 404:
            error.setdefault("code", "resource_missing")
        return error_response(exc.code, error)
    except web.HTTPException:  # aiohttp's own answers: no route, wrong method, ...
        raise
    except Exception:
        logging.getLogger(__name__).exception("%s %s crashed", request.method, request.path)
        return api_error("An unknown error occurred in the emulator (see its log).")


@dataclass(frozen=True)
class Remembered:
    at: float
    endpoint: str
    params: str
    status: int
    body: bytes


class Idempotency:
    """Stripe's idempotency for POST /v1/...: the first response to a key, once the call
    started running (2xx, a 402 decline, or a 5xx: Stripe replays its 500s too), is
    replayed for the same endpoint and parameters for 24 hours, without running it again;
    other parameters are a 400 idempotency_error. 4xx validation errors and 409
    concurrent-request conflicts are not saved, so a retry runs again
    (https://docs.stripe.com/api/idempotent_requests). In memory: a restart forgets."""

    def __init__(self) -> None:
        self.seen: dict[str, Remembered] = {}
        self.running: set[str] = set()

    @staticmethod
    async def params_of(request: web.Request) -> str:
        """The request's parameters, independent of their order (aiohttp caches the body for the handler)."""
        body = await request.read()
        text = body.decode("utf-8", "replace")
        form: Any
        if request.content_type == "application/json" and body:
            try:
                form = json.loads(text)
            except ValueError:
                form = text
        else:
            form = sorted(parse_qsl(text, keep_blank_values=True))
        return json.dumps([form, sorted(parse_qsl(request.query_string, keep_blank_values=True))], sort_keys=True)

    @staticmethod
    def saved(status: int) -> bool:
        return 200 <= status < 300 or status == 402 or status >= 500

    def forget(self) -> int:
        """Forgets every key, as Stripe does 24 hours after each was first used."""
        count = len(self.seen)
        self.seen.clear()
        return count

    def forget_expired(self, now: float) -> None:
        for key, remembered in list(self.seen.items()):  # insertion order is time order
            if remembered.at > now - IDEMPOTENCY_TTL_S:
                break
            del self.seen[key]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not key or not request.path.startswith("/v1/"):
            return await handler(request)
        if len(key) > 255:
            return error_response(400, {"type": "invalid_request_error", "message": "Idempotency-Key is too long."})
        endpoint, params, now = f"{request.method} {request.path}", await self.params_of(request), time.time()
        self.forget_expired(now)
        seen = self.seen.get(key)
        if seen is not None:
            if seen.endpoint != endpoint:
                message = (
                    "Keys for idempotent requests can only be used for the same endpoint they were first used for "
                    f"('{seen.endpoint}' vs '{endpoint}'). Try using a key other than '{key}' if you meant to "
                    "execute a different request."
                )
                return error_response(400, {"type": "idempotency_error", "message": message})
            if seen.params != params:
                message = (
                    "Keys for idempotent requests can only be used with the same parameters they were first used "
                    f"with. Try using a key other than '{key}' if you meant to execute a different request."
                )
                return error_response(400, {"type": "idempotency_error", "message": message})
            headers = {"Idempotency-Key": key, "Idempotent-Replayed": "true"}
            return web.Response(
                body=seen.body, status=seen.status, content_type="application/json", charset="utf-8", headers=headers
            )
        if key in self.running:
            message = (
                "There is currently another in-progress request using this Idempotent Key (that probably means "
                f"you submitted twice, and the other request is still going through): '{key}'. Please try again later."
            )
            return error_response(409, {"type": "idempotency_error", "message": message})
        self.running.add(key)
        try:
            response = await handler(request)
        finally:
            self.running.discard(key)
        body = response.body if isinstance(response, web.Response) else None
        if isinstance(body, bytes) and self.saved(response.status):
            self.seen[key] = Remembered(now, endpoint, params, response.status, body)
        response.headers["Idempotency-Key"] = key
        return response


IDEMPOTENCY = Idempotency()


@dataclass
class Fault:
    path: re.Pattern[str]
    method: str | None  # None: any
    count: int
    when: str  # "before" or "after" running the call

    def matches(self, request: web.Request) -> bool:
        return self.method in (None, request.method) and self.path.search(request.path) is not None

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path.pattern, "method": self.method, "count": self.count, "when": self.when}


class Faults:
    """Stripe failing internally, on demand: the next `count` requests matching a fault
    answer Stripe's 500 api_error, either without running (`before`) or after running
    (`after`: the effect happened, only the answer is lost). It sits inside the
    idempotency middleware, so the 500 is saved under the request's key, as on Stripe."""

    WHENS = ("before", "after")

    def __init__(self) -> None:
        self.pending: list[Fault] = []

    def add(self, spec: Any) -> Fault:
        """A fault from POST /_config/faults' JSON body, or a ValueError saying what is wrong."""
        if not isinstance(spec, dict):
            raise ValueError("the body must be a JSON object")
        unknown = set(spec) - {"path", "method", "count", "when"}
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        path, method, count, when = spec.get("path"), spec.get("method"), spec.get("count", 1), spec.get("when")
        if not isinstance(path, str) or not path:
            raise ValueError("path must be a regular expression (a non-empty string)")
        try:
            pattern = re.compile(path)
        except re.error as exc:
            raise ValueError(f"path is not a regular expression: {exc}") from exc
        if method is not None and not isinstance(method, str):
            raise ValueError("method must be a string")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("count must be a positive integer")
        when = "before" if when is None else when
        if when not in self.WHENS:
            raise ValueError('when must be "before" or "after"')
        fault = Fault(pattern, None if method is None else method.upper(), count, when)
        self.pending.append(fault)
        return fault

    def clear(self) -> int:
        count = len(self.pending)
        self.pending.clear()
        return count

    def take(self, request: web.Request) -> Fault | None:
        """The first fault matching `request`, used up once more."""
        for fault in self.pending:
            if fault.matches(request):
                fault.count -= 1
                if fault.count == 0:
                    self.pending.remove(fault)
                return fault
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        fault = None if request.path.startswith("/_config/") else self.take(request)
        if fault is None:
            return await handler(request)
        if fault.when == "after":
            await handler(request)
        return api_error(f"An unknown error occurred (a fault set with /_config/faults, {fault.when} running).")


FAULTS = Faults()

# Ids in paths no route matched (a matched route names its own pattern, /v1/invoices/{id}).
OBJECT_ID = re.compile(r"(?<=/)(?:in|cus|pm|ii|il|pi|ch|card|src|sub|si|txr|evt|prod|price|plan|seti)_[A-Za-z0-9]+")


class Calls:
    """How many /v1 requests the emulator received, by method and route pattern
    ("POST /v1/invoices/{id}/add_lines"), replays and errors included: the service's tests
    count their Stripe calls with it."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @staticmethod
    def route_of(request: web.Request) -> str:
        resource = request.match_info.route.resource
        if resource is not None:
            return f"{request.method} {resource.canonical}"
        return f"{request.method} {OBJECT_ID.sub('{id}', request.path)}"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            self.counts[self.route_of(request)] += 1
        return await handler(request)


CALLS = Calls()


# --- test hooks: /_config/ (no API key, like localstripe's own) ------------------------


async def forget_idempotency_keys(request: web.Request) -> web.Response:
    """POST /_config/idempotency/forget: as if every key were 24 hours old."""
    return web.json_response({"forgotten": IDEMPOTENCY.forget()})


async def add_fault(request: web.Request) -> web.Response:
    """POST /_config/faults {"path": regex, "method": "POST", "count": 1, "when": "before"|"after"}."""
    try:
        FAULTS.add(await request.json())
    except ValueError as exc:  # json.JSONDecodeError is one
        return error_response(400, {"type": "invalid_request_error", "message": f"Invalid fault: {exc}"})
    return web.json_response({"faults": [fault.as_json() for fault in FAULTS.pending]})


async def clear_faults(request: web.Request) -> web.Response:
    """DELETE /_config/faults."""
    return web.json_response({"cleared": FAULTS.clear()})


async def get_calls(request: web.Request) -> web.Response:
    """GET /_config/calls."""
    return web.json_response({"calls": dict(sorted(CALLS.counts.items()))})


async def reset_calls(request: web.Request) -> web.Response:
    """DELETE /_config/calls."""
    CALLS.counts.clear()
    return web.json_response({"calls": {}})


# --- the process ---------------------------------------------------------------------


_app: web.Application | None = None


def build_app() -> web.Application:
    """localstripe's aiohttp app, patched, with the middlewares added (not started yet)."""
    global _app
    if _app is None:
        install()
        server: Any = importlib.import_module("localstripe.server")
        app: web.Application = server.app
        # Stock order: errors, auth, store saving. Ours go after auth, so an unauthenticated
        # call is never counted, remembered or replayed; calls are counted before the
        # idempotency layer (replays count), faults come inside it (their 500s are saved).
        position = app.middlewares.index(server.auth_middleware) + 1
        ours = (CALLS.middleware, IDEMPOTENCY.middleware, FAULTS.middleware, stripe_shaped_errors)
        for offset, middleware in enumerate(ours):
            app.middlewares.insert(position + offset, middleware)
        app.router.add_post("/_config/idempotency/forget", forget_idempotency_keys)
        app.router.add_post("/_config/faults", add_fault)
        app.router.add_delete("/_config/faults", clear_faults)
        app.router.add_get("/_config/calls", get_calls)
        app.router.add_delete("/_config/calls", reset_calls)
        _app = app
    return _app


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.localstripe_launcher", description="localstripe with InvoiceService's Stripe calls."
    )
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="neither load nor save the state localstripe keeps in /tmp/localstripe.pickle",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (localstripe itself uses ::)")
    args = parser.parse_args(argv)

    SETTINGS.public_base = f"http://127.0.0.1:{args.port}"
    app = build_app()
    if args.from_scratch:
        # Stock localstripe pickles its whole store on every write, to one file shared by
        # all instances: each call costs O(objects) (89% of its time by 400 invoices, seen
        # with py-spy) and parallel emulators overwrite each other's file.
        resources.Store.dump_to_disk = lambda self: None
    else:
        resources.store.try_load_from_disk()
        for obj in resources.store.values():  # invoices pickled by stock localstripe
            if isinstance(obj, resources.Invoice):
                obj.__dict__.pop("starting_balance", None)  # its inverted snapshots would be
                obj.__dict__.pop("ending_balance", None)  # exported over Stripe's fields
    access = logging.getLogger("aiohttp.access")  # localstripe logs webhook deliveries here too
    access.setLevel(logging.DEBUG)
    access.addHandler(logging.StreamHandler())
    web.run_app(app, sock=listen(args.host, args.port), access_log=access)


if __name__ == "__main__":
    main()
