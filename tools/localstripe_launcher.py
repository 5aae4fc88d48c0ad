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
- POST /v1/invoiceitems with invoice=in_...: the item becomes a line of that draft, and a
  non-draft invoice is a 400.
- POST /v1/invoices/{id}/finalize and /mark_uncollectible (new); /pay takes
  payment_method and answers a decline with a Stripe-shaped 402 card error; /void accepts
  invoices that never had a payment attempt. Each emits its Stripe webhook. Finalizing
  sets invoice_pdf and hosted_invoice_url (null before) to links on the emulator, which
  it does not serve.
- POST /v1/payment_methods/{id}/attach: Stripe's declining test cards (4000000000000002,
  ...) are refused with a card_error, as Stripe refuses them; 4000000000000341 attaches
  and declines when charged.
- GET /v1/invoices takes created[gt|gte|lt|lte] and status, newest first.
- Every POST with an Idempotency-Key is replayed, or refused with idempotency_error when
  its parameters differ, as Stripe does (kept in memory only).
- Errors look like Stripe's: card_error with decline_code for 402s, resource_missing for
  404s, "Received unknown parameters" instead of crashes for the invoice calls.

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
            raise bad_request(
                f"Invoice {invoice_id} is {invoice.status}; invoice items can only be added to draft invoices.",
                param="invoice",
            )
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
        """Stock statuses, plus `uncollectible` for an open invoice marked so."""
        value = stock_status(self)
        return "uncollectible" if value == "open" and getattr(self, "_uncollectible", False) else value

    return status


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
    """draft → open (paid when there is nothing to pay), with the links Stripe sets then."""
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
    if invoice.status == "paid":
        raise bad_request("Invoice is already paid")
    if invoice.status not in ("draft", "open", "uncollectible"):
        raise bad_request(f"This invoice is {invoice.status} and cannot be paid.")
    if payment_method:
        method = _payment_method_of(invoice.customer, payment_method, "payment_method")
    elif invoice.default_payment_method:
        method = resources.PaymentMethod._api_retrieve(invoice.default_payment_method)
    else:
        method = resources.Customer._api_retrieve(invoice.customer)._get_default_payment_method_or_source()
    if method is None and invoice.total > 0:
        raise bad_request("This customer has no attached payment source or default payment method.")

    if invoice.status == "draft":
        _finalize(invoice)  # Stripe finalizes a draft it is asked to pay
    if invoice.status == "paid":  # nothing to pay: finalizing settled it
        return invoice

    intent = resources.PaymentIntent(
        amount=invoice.total, currency=invoice.currency, customer=invoice.customer, payment_method=method.id
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
    invoice.status = property(_status_with(invoice.status.fget))
    invoice._on_payment_success = _on_payment_success_with(invoice._on_payment_success)
    invoice._api_create = classmethod(_create_invoice)
    invoice._api_list_all = classmethod(_list_invoices_with(invoice._api_list_all))
    r.InvoiceItem._api_create = classmethod(_create_invoice_item)
    r.PaymentMethod._charging_is_declined = _charging_is_declined_with(r.PaymentMethod._charging_is_declined)
    r.Charge._set_auth_failure = _set_auth_failure
    r.Charge._raise_failure = _raise_failure

    # Only the routes change: localstripe's subscriptions keep calling the stock
    # Invoice._api_pay_invoice, which must not raise on a decline.
    _set_route("POST", "/v1/invoices/{id}/finalize", finalize_invoice)
    _set_route("POST", "/v1/invoices/{id}/pay", pay_invoice)
    _set_route("POST", "/v1/invoices/{id}/void", void_invoice)
    _set_route("POST", "/v1/invoices/{id}/mark_uncollectible", mark_uncollectible)
    _set_route("POST", "/v1/payment_methods/{id}/attach", _attach_with(r.PaymentMethod._api_attach))
    _installed = True


# --- middlewares ---------------------------------------------------------------------


def error_response(status: int, error: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error}, status=status, headers=headers)


@web.middleware
async def stripe_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Renders localstripe's UserError itself (so the idempotency middleware sees a
    response) and gives 402s and 404s the type and code Stripe would."""
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


@dataclass(frozen=True)
class Remembered:
    at: float
    endpoint: str
    params: str
    status: int
    body: bytes


class Idempotency:
    """Stripe's idempotency for POST /v1/...: the first response to a key (when the call
    ran: 2xx, or a 402 decline) is replayed for the same endpoint and parameters, without
    running it again; other parameters are a 400 idempotency_error. 4xx validation errors
    and 5xx are not remembered, so a retry runs again. In memory: a restart forgets."""

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
        if isinstance(body, bytes) and (200 <= response.status < 300 or response.status == 402):
            self.seen[key] = Remembered(now, endpoint, params, response.status, body)
        response.headers["Idempotency-Key"] = key
        return response


IDEMPOTENCY = Idempotency()


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
        # call is never remembered or replayed.
        position = app.middlewares.index(server.auth_middleware) + 1
        app.middlewares.insert(position, IDEMPOTENCY.middleware)
        app.middlewares.insert(position + 1, stripe_shaped_errors)
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
    access = logging.getLogger("aiohttp.access")  # localstripe logs webhook deliveries here too
    access.setLevel(logging.DEBUG)
    access.addHandler(logging.StreamHandler())
    web.run_app(app, sock=listen(args.host, args.port), access_log=access)


if __name__ == "__main__":
    main()
