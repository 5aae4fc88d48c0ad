"""Every call to Stripe. Creates invoices the race-free way real Stripe needs (a draft
first, then its items attached by id, then finalize and pay), derives a Stripe
Idempotency-Key for each call from the caller's key, and maps Stripe's errors to
domain errors. Nothing here knows gRPC or HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import stripe
from stripe.params import InvoiceListParams

from service.domain import (
    AlreadyExists,
    DomainError,
    Internal,
    InvalidArgument,
    NewInvoice,
    ResourceExhausted,
    StripeInvoice,
    Unavailable,
    User,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Metadata keys that carry the invoice's owner to Stripe and back through webhooks.
USER_ID, USER_NAME = "invoice_service_user_id", "invoice_service_user_name"


def client(api_key: str, *, api_base: str | None, timeout_s: float, max_retries: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base} if api_base else None,
        http_client=stripe.HTTPXClient(timeout=timeout_s),
        max_network_retries=max_retries,
    )


def invoice_from_stripe(obj: Mapping[str, Any]) -> StripeInvoice:
    """Reads a Stripe invoice object. The owner is the user named at creation (metadata)
    or, failing that, the Stripe customer with Stripe's customer name."""
    try:
        metadata = obj.get("metadata") or {}
        user_id, user_name = metadata.get(USER_ID), metadata.get(USER_NAME)
        if user_id:
            user = User(id=str(user_id), name=str(user_name or ""))
        else:
            user = User(id=str(obj["customer"]), name=str(obj.get("customer_name") or ""))
        invoice = StripeInvoice(
            stripe_invoice_id=str(obj["id"]),
            status=str(obj["status"]),
            amount=int(obj.get("total") or 0),
            invoice_pdf=str(obj.get("invoice_pdf") or ""),
            user=user,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument("data.object", f"not a Stripe invoice: {type(exc).__name__} {exc}") from exc
    if not invoice.stripe_invoice_id.startswith("in_"):
        raise InvalidArgument("data.object.id", "not a Stripe invoice id")
    if invoice.status not in ("draft", "open", "paid", "uncollectible", "void"):
        raise InvalidArgument("data.object.status", f"unknown invoice status {invoice.status!r}")
    return invoice


def _domain_error(exc: stripe.StripeError) -> DomainError:
    """Stripe's error classes, mapped so that callers can act: their own mistakes are
    INVALID_ARGUMENT naming the field, Stripe's trouble is retryable."""
    if isinstance(exc, stripe.InvalidRequestError):
        field = exc.param or "request"
        if exc.code == "resource_missing":
            return InvalidArgument(field, f"no such Stripe object: {exc.user_message or exc.code}")
        return InvalidArgument(field, f"Stripe refused the request: {exc.user_message or exc.code}")
    if isinstance(exc, stripe.IdempotencyError):
        return AlreadyExists(f"Stripe saw this idempotency key with other parameters: {exc.user_message}")
    if isinstance(exc, stripe.RateLimitError):
        return ResourceExhausted("Stripe rate limit reached; retry with backoff")
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return Internal("the service's Stripe credentials were refused")
    # APIError includes Stripe's 409 "another request with this key is in progress" (a
    # caller's retry overtaking its first attempt): retrying later is right for it too.
    if isinstance(exc, stripe.APIConnectionError | stripe.APIError):
        return Unavailable("Stripe is unreachable or failing; retry later with the same idempotency key")
    return Unavailable(f"Stripe call failed ({type(exc).__name__}); retry later with the same idempotency key")


# (operation, outcome, seconds) for each Stripe call: the composition root counts them.
Observer = Callable[[str, str, float], None]


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, stripe.CardError):
        return "declined"
    if isinstance(exc, stripe.StripeError):
        return type(exc).__name__.removesuffix("Error").lower() or "error"
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "exception"


class StripePayments:
    def __init__(self, stripe_client: stripe.StripeClient, *, observe: Observer | None = None) -> None:
        self._stripe = stripe_client
        self._observe = observe

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        """Awaits one SDK call (its own retries included), timed and counted by outcome."""
        started, error = time.perf_counter(), None
        try:
            return await call
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self._observe is not None:
                self._observe(operation, _outcome(error), time.perf_counter() - started)

    async def create_invoice(self, new: NewInvoice, idempotency_key: str) -> dict[str, Any]:
        """Creates, finalizes and charges the invoice; returns Stripe's invoice object.
        A declined charge is not an error: the invoice exists, stays `open`, and its
        payment result arrives by webhook."""

        def key(step: str) -> stripe.RequestOptions:
            return {"idempotency_key": f"invoice-service:{idempotency_key}:{step}"}

        metadata = {USER_ID: new.user.id, USER_NAME: new.user.name} if new.user else {}
        invoices = self._stripe.v1.invoices
        try:
            draft = await self._call(
                "invoices.create",
                invoices.create_async(
                    {
                        "customer": new.customer,
                        "currency": new.currency,
                        "collection_method": "charge_automatically",
                        # Paid now by the calls below, not an hour later by auto-advance.
                        "auto_advance": False,
                        "default_payment_method": new.payment_method,
                        # Only the items created for this invoice, never the customer's other
                        # pending items (which a concurrent Create may be adding).
                        "pending_invoice_items_behavior": "exclude",
                        "metadata": metadata,
                    },
                    key("invoice"),
                ),
            )
            if draft.id is None:
                raise Internal("Stripe answered an invoice without an id")
            for i, item in enumerate(new.items):
                await self._call(
                    "invoice_items.create",
                    self._stripe.v1.invoice_items.create_async(
                        {
                            "customer": new.customer,
                            "invoice": draft.id,
                            "amount": item.amount,
                            "currency": new.currency,
                            "description": item.name,
                        },
                        key(f"item-{i}"),
                    ),
                )
            await self._call(
                "invoices.finalize", invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, key("finalize"))
            )
            try:
                paid = await self._call(
                    "invoices.pay", invoices.pay_async(draft.id, {"payment_method": new.payment_method}, key("pay"))
                )
            except stripe.CardError as declined:
                log.info("card declined", extra={"invoice": draft.id, "decline_code": declined.code})
                return (await self._call("invoices.retrieve", invoices.retrieve_async(draft.id))).to_dict(for_json=True)
            return paid.to_dict(for_json=True)
        except stripe.StripeError as exc:
            error = _domain_error(exc)
            log.warning(
                "stripe call failed",
                extra={"error": type(exc).__name__, "http_status": exc.http_status, "mapped": type(error).__name__},
            )
            raise error from exc

    async def invoices_since(self, since: datetime, page_size: int = 100) -> AsyncIterator[tuple[StripeInvoice, int]]:
        """Every Stripe invoice created at or after `since`, newest first, each with the
        time (Unix seconds) its page was asked for: what it says is true as of then, so an
        event from after the request is not taken as older than it. The second before, in
        fact: an event of the same second may be newer, and wins the tie."""
        params: InvoiceListParams = {"created": {"gte": int(since.timestamp())}, "limit": page_size}
        seen: set[str] = set()
        try:
            while True:
                asked_at = int(time.time()) - 1
                page = await self._call("invoices.list", self._stripe.v1.invoices.list_async(params))
                fresh = [obj for obj in page.data if obj.id not in seen]
                for obj in fresh:
                    seen.add(obj.id)
                    yield invoice_from_stripe(obj.to_dict(for_json=True)), asked_at
                if not page.has_more or not fresh:  # no new id: a list that starts over ends here
                    return
                params = {**params, "starting_after": fresh[-1].id}
        except stripe.StripeError as exc:
            raise _domain_error(exc) from exc
