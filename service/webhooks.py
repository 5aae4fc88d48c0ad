"""The Stripe webhook sidecar (aiohttp): verifies each delivery's Stripe-Signature over
the raw body, then records the event and applies it to the invoice (or to the invoice's
credit note, refund or payment, for `credit_note.*`, `refund.*`, `invoice_payment.paid`)
in one transaction.
Stripe retries anything but a 2xx for days, so the answers are chosen for that: 400 for
a delivery that is not Stripe's (no valid signature, not an event), 503 while Postgres
is away (Stripe will retry; nothing accepted is lost), 200 for applied, duplicate and
ignored events (other types, the other mode), and 200 `rejected`, logged at ERROR, for
a signed event the service can never record: retrying it for days would not help."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import stripe
from aiohttp import web

from service.config import default
from service.credit_notes import InvoicePayment, StripeCreditNote, StripeRefund
from service.domain import DomainError, Internal, InvalidArgument, Outcome, StripeInvoice, Unavailable, Unrecordable
from service.errors import status_of
from service.logs import REQUEST_ID, request_id
from service.metrics import METRICS, WEBHOOK_OUTCOMES, Metrics, add_routes
from service.stripe_objects import (
    credit_note_from_stripe,
    invoice_from_stripe,
    invoice_payment_from_stripe,
    refund_from_stripe,
)

log = logging.getLogger(__name__)

PATH = "/webhooks/stripe"
# Stripe's event ids; also what the stripe_events primary key can index.
EVENT_ID = re.compile(r"evt_[A-Za-z0-9_]{1,255}")
# The invoice events that change what the service records; others are answered 200.
INVOICE_EVENTS = frozenset(
    {
        "invoice.created",
        "invoice.finalized",
        "invoice.updated",
        "invoice.paid",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "invoice.voided",
        "invoice.marked_uncollectible",
        "invoice.deleted",
    }
)
# The credit note events: money given back on an invoice, by this service or anyone else.
CREDIT_NOTE_EVENTS = frozenset({"credit_note.created", "credit_note.updated", "credit_note.voided"})
# Refunds, with or without a credit note: one made in the Dashboard or by support has none.
# Each refund has its own event since 2024-10-28.acacia ("created, updated, and failed
# events for all refund types"); `charge.refund.updated` is the older name of an update.
# `charge.refunded` is not taken: it says the charge's total, not which refund is whose.
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"})
# Which invoice a payment intent pays (2025-03-31.basil on; before, the invoice said it).
PAYMENT_EVENTS = frozenset({"invoice_payment.paid"})
RECORDED_EVENTS = INVOICE_EVENTS | CREDIT_NOTE_EVENTS | REFUND_EVENTS | PAYMENT_EVENTS


class EventStore(Protocol):
    async def apply_stripe_invoice(
        self, invoice: StripeInvoice, *, stripe_time: int, event_id: str | None = None, event_type: str = ""
    ) -> Outcome: ...

    async def apply_stripe_credit_note(
        self, note: StripeCreditNote, *, stripe_time: int, event_id: str | None = None, event_type: str = ""
    ) -> Outcome: ...

    async def apply_stripe_refund(
        self, refund: StripeRefund, *, stripe_time: int, event_id: str | None = None, event_type: str = ""
    ) -> Outcome: ...

    async def apply_stripe_invoice_payment(
        self, payment: InvoicePayment, *, event_id: str | None = None, event_type: str = ""
    ) -> Outcome: ...

    async def check_ready(self) -> None: ...


STORE = web.AppKey("store", EventStore)
SECRETS = web.AppKey("secrets", Sequence[str])
TOLERANCE = web.AppKey("tolerance", int)
DRAINING = web.AppKey("draining", asyncio.Event)
# Whether the service runs in Stripe's live mode: events of the other mode are ignored.
LIVEMODE = web.AppKey("livemode", bool)


def _error(error: DomainError, http_status: int | None = None) -> web.Response:
    """Errors in the google.rpc.Status shape the REST gateway uses, so one parser serves."""
    code, status = status_of(error)
    return web.json_response({"code": code, "message": str(error), "details": []}, status=http_status or status)


def _received(outcome: str, **extra: str) -> web.Response:
    return web.json_response({"received": True, "outcome": outcome, **extra})


def verified_event(payload: bytes, header: str | None, secrets: Sequence[str], tolerance: int) -> dict[str, Any]:
    """The event, if any configured secret signed exactly these bytes recently enough.
    Raises InvalidArgument naming what is wrong."""
    if not header:
        raise InvalidArgument("Stripe-Signature", "header missing")
    if not header.isascii():  # the SDK's constant-time compare raises TypeError on non-ASCII
        raise InvalidArgument("Stripe-Signature", "not ASCII")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument("body", "not UTF-8") from exc
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance)
            break
        except stripe.SignatureVerificationError:
            continue
    else:
        raise InvalidArgument("Stripe-Signature", "no valid signature for this body and time")
    # The SDK refuses only old timestamps; one from the future is as suspect (a replay
    # prepared in advance, or a sender's clock far off).
    if _timestamp(header) > time.time() + tolerance:
        raise InvalidArgument("Stripe-Signature", "timestamp is in the future")
    try:
        event = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise InvalidArgument("body", "not JSON") from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise InvalidArgument("body", "not a Stripe event (id, type)")
    if not isinstance(event.get("id"), str) or not EVENT_ID.fullmatch(event["id"]):
        raise InvalidArgument("id", "not a Stripe event id (evt_...)")
    return event


def _timestamp(header: str) -> int:
    stamps = [v for k, _, v in (part.partition("=") for part in header.split(",")) if k.strip() == "t"]
    try:
        return int(stamps[0])
    except (IndexError, ValueError) as exc:
        raise InvalidArgument("Stripe-Signature", "no timestamp") from exc


async def receive(request: web.Request) -> web.Response:
    """One delivery: handled under Envoy's request id, then counted and logged once, with
    its event, type, outcome and duration."""
    token = REQUEST_ID.set(request_id(request.headers.get("X-Request-Id")))
    started = time.perf_counter()
    try:
        response, delivery = await _handle(request)
        seconds = time.perf_counter() - started
        request.app[METRICS].observe_webhook(delivery.type, delivery.outcome, seconds)
        # An event taken but never recorded needs an operator: ERROR, though Stripe got a 200.
        level = logging.ERROR if delivery.outcome == "rejected" else logging.INFO
        level = logging.WARNING if response.status >= 400 else level
        if log.isEnabledFor(level):  # the line's fields cost a dataclass copy per delivery
            extra = {k: v for k, v in asdict(delivery).items() if v}
            extra |= {"status": response.status, "duration_ms": round(seconds * 1000, 2)}
            log.log(level, "webhook", extra=extra)
        return response
    finally:
        REQUEST_ID.reset(token)


@dataclass
class Delivery:
    """What the log line and the metrics say about one delivery."""

    outcome: str = "invalid"
    type: str = "unknown"  # until the signature is verified, the body's type is not trusted
    event: str = ""
    invoice: str = ""
    reason: str = ""


async def _handle(request: web.Request) -> tuple[web.Response, Delivery]:
    delivery = Delivery()
    try:
        payload = await request.read()
    except web.HTTPRequestEntityTooLarge:
        delivery.reason = "body over the size limit"
        return _error(InvalidArgument("body", delivery.reason), 413), delivery
    try:
        event = verified_event(
            payload, request.headers.get("Stripe-Signature"), request.app[SECRETS], request.app[TOLERANCE]
        )
    except InvalidArgument as error:
        delivery.reason = str(error)
        return _error(error), delivery
    delivery.type, delivery.event = str(event["type"]), str(event["id"])
    livemode = event.get("livemode")
    recorded = event["type"] in RECORDED_EVENTS
    if not recorded or (isinstance(livemode, bool) and livemode != request.app[LIVEMODE]):
        delivery.outcome = "ignored"
        if recorded:
            delivery.reason = f"a {'live' if livemode else 'test'}-mode event; this service runs in the other mode"
        return _received("ignored"), delivery
    try:
        outcome = await _apply(request.app[STORE], event, delivery)
        if outcome is None:
            delivery.outcome, delivery.reason = "ignored", "pays or refunds no invoice (no payment intent)"
            return _received("ignored"), delivery
    except (InvalidArgument, Unrecordable) as error:
        # Signed by Stripe, so retrying cannot change it: taken, and left to an operator.
        delivery.outcome, delivery.reason = "rejected", str(error)
        return _received("rejected", reason=str(error)), delivery
    except Unavailable:
        delivery.outcome = "unavailable"
        return _error(Unavailable("the invoice store is unavailable; Stripe will retry")), delivery
    except Exception:  # a bug: Stripe retries a 500, and the delivery is still counted
        log.exception("webhook failed", extra={"event": delivery.event})
        delivery.outcome = "error"
        return _error(Internal("internal error")), delivery
    delivery.outcome = WEBHOOK_OUTCOMES.get(outcome, outcome)
    return _received(outcome), delivery


async def _apply(store: EventStore, event: dict[str, Any], delivery: Delivery) -> Outcome | None:
    """The event's invoice, credit note, refund or invoice payment, applied as of the
    event's time; None for a refund or payment that no invoice's payment intent made."""
    created = event.get("created")
    if isinstance(created, bool) or not isinstance(created, int):
        raise InvalidArgument("created", "must be the event's Unix time")
    event_id, event_type = str(event["id"]), str(event["type"])
    if event_type in CREDIT_NOTE_EVENTS:
        note = credit_note_from_stripe(_data_object(event))
        delivery.invoice = note.stripe_invoice_id
        return await store.apply_stripe_credit_note(note, stripe_time=created, event_id=event_id, event_type=event_type)
    if event_type in REFUND_EVENTS:
        refund = refund_from_stripe(_data_object(event))
        if refund is None:
            return None
        delivery.invoice = refund.payment_intent  # its invoice may not be known yet
        return await store.apply_stripe_refund(refund, stripe_time=created, event_id=event_id, event_type=event_type)
    if event_type in PAYMENT_EVENTS:
        payment = invoice_payment_from_stripe(_data_object(event))
        if payment is None:
            return None
        delivery.invoice = payment.stripe_invoice_id
        return await store.apply_stripe_invoice_payment(payment, event_id=event_id, event_type=event_type)
    invoice = invoice_from_stripe(_data_object(event))
    delivery.invoice = invoice.stripe_invoice_id
    return await store.apply_stripe_invoice(invoice, stripe_time=created, event_id=event_id, event_type=event_type)


def _data_object(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise InvalidArgument("data.object", "missing")
    return obj


async def ready(request: web.Request) -> web.Response:
    """Readiness (Envoy's and the orchestrator's): Postgres answers and the schema is
    current. While not, Envoy answers Stripe 503 itself and Stripe retries later."""
    if request.app[DRAINING].is_set():
        return _error(Unavailable("shutting down"))
    try:
        await request.app[STORE].check_ready()
    except Unavailable as exc:
        return _error(exc)
    return web.json_response({"status": "SERVING"})


def drain(app: web.Application) -> None:
    """Shutdown's first step: readiness fails, so Envoy's health check takes the sidecar
    out, while deliveries that still arrive are served."""
    app[DRAINING].set()


def init(
    secrets: Sequence[str],
    *,
    store: EventStore | None = None,
    open_store: Callable[[], AbstractAsyncContextManager[EventStore]] | None = None,
    tolerance_s: int = default("stripe_webhook_tolerance_s"),
    max_body_bytes: int = default("webhook_max_body_bytes"),
    metrics: Metrics | None = None,
    livemode: bool = False,
) -> web.Application:
    """The sidecar's application, with /metrics and /livez, over `store`, or over the one
    `open_store` opens when the app starts and closes when it stops (its pool is the app's
    own, in its cleanup context)."""
    if not secrets:
        raise ValueError("at least one webhook secret is required")
    app = web.Application(client_max_size=max_body_bytes)
    if store is not None:
        app[STORE] = store
    elif open_store is not None:
        opener = open_store

        async def opened(app: web.Application) -> AsyncIterator[None]:
            async with opener() as store:
                app[STORE] = store
                yield

        app.cleanup_ctx.append(opened)
    else:
        raise ValueError("a store, or a way to open one, is required")
    app[SECRETS] = list(secrets)
    app[TOLERANCE] = tolerance_s
    app[DRAINING] = asyncio.Event()
    app[LIVEMODE] = livemode
    app.router.add_post(PATH, receive)
    app.router.add_get("/healthz", ready)
    add_routes(app, metrics or Metrics())
    return app
