"""Every call to Stripe: the steps of a Create (an empty draft, its lines added in one
call, finalize, pay), the look-ups a resumed Create needs, Pay, Void and MarkUncollectible,
and the listings that reconcile reads (a refund's calls: service/stripe_money_back.py). Maps Stripe's errors to
domain errors. Nothing here knows gRPC, HTTP or the database; service/invoices.py and
service/refunds.py decide the order of the calls and their keys."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import stripe
from stripe import RequestOptions
from stripe.params import (
    InvoiceAddLinesParamsLine,
    InvoiceListParams,
    InvoicePayParams,
)

from service.domain import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NewInvoice,
    NewItem,
    ResourceExhausted,
    Status,
    StripeReplayed,
    Unavailable,
)
from service.stripe_money_back import MoneyBackCalls
from service.stripe_objects import CREATE_KEY, USER_ID, USER_NAME

log = logging.getLogger(__name__)
T = TypeVar("T")


def client(api_key: str, *, api_base: str | None, timeout_s: float, max_retries: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base} if api_base else None,
        http_client=stripe.HTTPXClient(timeout=timeout_s),
        max_network_retries=max_retries,
    )


def _domain_error(exc: stripe.StripeError) -> DomainError:
    """Stripe's error classes, mapped so that callers can act: their own mistakes are
    INVALID_ARGUMENT naming the field, Stripe's trouble is retryable. An error Stripe
    replays for the call's key (a 5xx, a decline, a refusal) is StripeReplayed: proof that
    Stripe saved it, for an earlier call that has ended, so that the caller may move on to
    new keys (service/attempts.py). A first 5xx proves neither: a proxy may have answered
    it, or Stripe may not have saved it."""
    if _replayed(exc):
        return StripeReplayed(f"Stripe replayed an earlier answer to this key ({type(exc).__name__}); retry later")
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
    if isinstance(exc, stripe.CardError):
        return FailedPrecondition(f"the card was declined: {exc.user_message or exc.code}")
    return Unavailable(f"Stripe call failed ({type(exc).__name__}); retry later with the same idempotency key")


def _replayed(exc: stripe.StripeError) -> bool:
    headers = {str(k).lower(): v for k, v in (exc.headers or {}).items()}
    return str(headers.get("idempotent-replayed", "")).lower() == "true"


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


# Stripe documents no limit on the lines of one add_lines call, only 250 invoice items per
# invoice (changelog 2016-02-22); a Create has at most validation.MAX_ITEMS (100), so one
# call carries them all. Batches of this size are sent beyond it.
LINES_PER_CALL = 250
# The statuses in which Stripe pays (a draft: finalized first), voids an invoice and marks
# it uncollectible.
PAYABLE = (Status.DRAFT, Status.OPEN, Status.UNCOLLECTIBLE)
VOIDABLE = (Status.OPEN, Status.UNCOLLECTIBLE)
COLLECTIBLE = (Status.OPEN,)


class StripePayments(MoneyBackCalls):
    """The Stripe calls of the service, one method per call (plus the look-ups a resumed
    Create needs), each answering Stripe's invoice object as a plain dict and raising
    domain errors. The order of the calls, and what to do after a failure, is the
    caller's (service/invoices.py)."""

    def __init__(
        self,
        stripe_client: stripe.StripeClient,
        *,
        observe: Observer | None = None,
        lines_per_call: int = LINES_PER_CALL,
    ) -> None:
        self._stripe = stripe_client
        self._observe = observe
        self._lines_per_call = lines_per_call

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        """Awaits one SDK call (its own retries included), timed and counted by outcome,
        with Stripe's errors mapped to domain errors."""
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return await call
        except stripe.StripeError as exc:
            error = exc
            mapped = _domain_error(exc)
            log.warning(
                "stripe call failed",
                extra={
                    "operation": operation,
                    "error": type(exc).__name__,
                    "http_status": exc.http_status,
                    "mapped": type(mapped).__name__,
                },
            )
            raise mapped from exc
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self._observe is not None:
                self._observe(operation, _outcome(error), time.perf_counter() - started)

    def batches(self, items: tuple[NewItem, ...]) -> list[tuple[NewItem, ...]]:
        """The items in the add_lines calls that carry them, in order."""
        size = self._lines_per_call
        return [items[i : i + size] for i in range(0, len(items), size)]

    async def create_draft(self, new: NewInvoice, key: str, stripe_key: str) -> dict[str, Any]:
        """An empty draft for the customer, carrying the Create's key in its metadata."""
        metadata = {CREATE_KEY: key}
        if new.user:
            metadata |= {USER_ID: new.user.id, USER_NAME: new.user.name}
        draft = await self._call(
            "invoices.create",
            self._stripe.v1.invoices.create_async(
                {
                    "customer": new.customer,
                    "currency": new.currency,
                    "collection_method": "charge_automatically",
                    # Paid now by the calls below, not an hour later by auto-advance.
                    "auto_advance": False,
                    "default_payment_method": new.payment_method,
                    # Only the lines added below, never the customer's other pending items
                    # (which a concurrent Create may be adding).
                    "pending_invoice_items_behavior": "exclude",
                    "metadata": metadata,
                },
                {"idempotency_key": stripe_key},
            ),
        )
        if draft.id is None:
            raise Internal("Stripe answered an invoice without an id")
        return draft.to_dict(for_json=True)

    async def find_draft(self, customer: str, key: str, since: datetime) -> dict[str, Any] | None:
        """The customer's invoice made by the Create with this key, if an earlier attempt
        made one without learning its id. Listing (not search, which lags by up to a
        minute) and only the invoices created since the key was first claimed."""
        async for invoice in self._invoices({"customer": customer, "created": {"gte": int(since.timestamp()) - 60}}):
            if (invoice.get("metadata") or {}).get(CREATE_KEY) == key:
                return invoice
        return None

    async def find_unmarked(self, new: NewInvoice, since: datetime) -> list[dict[str, Any]]:
        """The finalized invoices a Create of the service before it put its key in
        metadata may have made: the customer's since then without a key, in the request's
        currency, for its owner, with exactly the request's lines. Drafts are left out:
        never charged, a half-built one is simply not reused."""
        params: InvoiceListParams = {"customer": new.customer, "created": {"gte": int(since.timestamp()) - 60}}
        wanted = (new.currency, sum(item.amount for item in new.items), new.user.id if new.user else None)
        lines = [(item.name, item.amount) for item in new.items]
        found = []
        async for invoice in self._invoices(params):
            metadata = invoice.get("metadata") or {}
            if CREATE_KEY in metadata or invoice.get("status") == Status.DRAFT:
                continue
            if (invoice.get("currency"), invoice.get("subtotal"), metadata.get(USER_ID)) != wanted:
                continue
            listed = await self._call(
                "invoices.lines", self._stripe.v1.invoices.line_items.list_async(str(invoice["id"]), {"limit": 100})
            )
            if [(line.description, line.amount) for line in listed.data] == lines:
                found.append(invoice)
        return found

    async def _invoices(self, params: InvoiceListParams) -> AsyncIterator[dict[str, Any]]:
        params = {**params, "limit": 100}
        while True:
            page = await self._call("invoices.list", self._stripe.v1.invoices.list_async(params))
            for obj in page.data:
                yield obj.to_dict(for_json=True)
            if not page.has_more or not page.data:
                return
            params = {**params, "starting_after": page.data[-1].id}

    async def exists(self, invoice_id: str) -> bool:
        try:
            await self.retrieve(invoice_id)
        except InvalidArgument as error:
            cause = error.__cause__
            if isinstance(cause, stripe.InvalidRequestError) and cause.code == "resource_missing":
                return False
            raise
        return True

    async def retrieve(self, invoice_id: str) -> dict[str, Any]:
        invoice = await self._call("invoices.retrieve", self._stripe.v1.invoices.retrieve_async(invoice_id))
        return invoice.to_dict(for_json=True)

    async def add_lines(self, invoice_id: str, items: tuple[NewItem, ...], stripe_key: str) -> dict[str, Any]:
        """One batch of lines, in order, in one call."""
        lines: list[InvoiceAddLinesParamsLine] = [{"amount": i.amount, "description": i.name} for i in items]
        invoice = await self._call(
            "invoices.add_lines",
            self._stripe.v1.invoices.add_lines_async(invoice_id, {"lines": lines}, {"idempotency_key": stripe_key}),
        )
        return invoice.to_dict(for_json=True)

    async def finalize(self, invoice_id: str, stripe_key: str) -> dict[str, Any]:
        """draft -> open; or paid at once, when credit covers it or the amount due is under
        the currency's minimum charge (Stripe carries that to the customer's balance)."""
        invoice = await self._call(
            "invoices.finalize",
            self._stripe.v1.invoices.finalize_invoice_async(
                invoice_id, {"auto_advance": False}, {"idempotency_key": stripe_key}
            ),
        )
        return invoice.to_dict(for_json=True)

    async def pay(
        self, invoice_id: str, payment_method: str | None, stripe_key: str, *, declined_ok: bool = True
    ) -> dict[str, Any]:
        """Charges the invoice now. A decline leaves it `open`: answered as it is when
        `declined_ok` (a Create: the failure also arrives by webhook), else
        FAILED_PRECONDITION with the decline (the admin's Pay). A refusal because the
        invoice is no longer payable answers the invoice as it is now (`_after_refusal`)."""
        params: InvoicePayParams = {"payment_method": payment_method} if payment_method else {}
        try:
            paid = await self._call(
                "invoices.pay",
                self._stripe.v1.invoices.pay_async(invoice_id, params, {"idempotency_key": stripe_key}),
            )
        except DomainError as error:
            cause = error.__cause__
            if isinstance(cause, stripe.CardError) and not isinstance(error, StripeReplayed):
                log.info("card declined", extra={"invoice": invoice_id, "decline_code": cause.code})
                if declined_ok:
                    return await self.retrieve(invoice_id)
            return await self._after_refusal(invoice_id, error, PAYABLE)
        return paid.to_dict(for_json=True)

    async def void(self, invoice_id: str, stripe_key: str) -> dict[str, Any]:
        """Voids the invoice; as pay, a refusal because it is no longer open or
        uncollectible answers the invoice as it is now."""
        options: RequestOptions = {"idempotency_key": stripe_key}
        call = self._stripe.v1.invoices.void_invoice_async(invoice_id, options=options)
        return await self._transition(invoice_id, "invoices.void", call, VOIDABLE)

    async def mark_uncollectible(self, invoice_id: str, stripe_key: str) -> dict[str, Any]:
        """Writes the open invoice off; as pay, a refusal because it is no longer open
        answers the invoice as it is now."""
        options: RequestOptions = {"idempotency_key": stripe_key}
        call = self._stripe.v1.invoices.mark_uncollectible_async(invoice_id, options=options)
        return await self._transition(invoice_id, "invoices.mark_uncollectible", call, COLLECTIBLE)

    async def _transition(
        self, invoice_id: str, operation: str, call: Awaitable[stripe.Invoice], acted_on: tuple[str, ...]
    ) -> dict[str, Any]:
        """One call that moves the invoice to a status of its own, for the invoice in one
        of `acted_on`."""
        try:
            invoice = await self._call(operation, call)
        except DomainError as error:
            return await self._after_refusal(invoice_id, error, acted_on)
        return invoice.to_dict(for_json=True)

    async def _after_refusal(self, invoice_id: str, error: DomainError, acted_on: tuple[str, ...]) -> dict[str, Any]:
        """Stripe's invoice as it is after Stripe refused (400) to pay, void or write it
        off, when its status no longer allows that: it changed between the caller's read
        and the call (paid or voided from Stripe's dashboard, or by a concurrent call).
        The caller answers from the status and records it. Any other error, or a refusal
        of an invoice still in a status that allows the call (the payment method, say),
        is raised as it is."""
        cause = error.__cause__
        if (
            isinstance(error, StripeReplayed)
            or not isinstance(cause, stripe.InvalidRequestError)
            or cause.code == "resource_missing"
        ):
            raise error
        current = await self.retrieve(invoice_id)
        if current.get("status") in acted_on:
            raise error
        log.info("stripe refused a call on an invoice whose status changed", extra={"invoice": invoice_id})
        return current

    def invoices_since(self, since: datetime, page_size: int = 100) -> AsyncIterator[tuple[dict[str, Any], int]]:
        """Every Stripe invoice object created at or after `since` (see `_since`)."""
        return self._since("invoices.list", self._stripe.v1.invoices.list_async, since, page_size)

    def credit_notes_since(self, since: datetime, page_size: int = 100) -> AsyncIterator[tuple[dict[str, Any], int]]:
        """Every Stripe credit note created at or after `since` (see `_since`)."""
        return self._since("credit_notes.list", self._stripe.v1.credit_notes.list_async, since, page_size)

    def refunds_since(self, since: datetime, page_size: int = 100) -> AsyncIterator[tuple[dict[str, Any], int]]:
        """Every refund created at or after `since`, with a credit note or without (see `_since`)."""
        return self._since("refunds.list", self._stripe.v1.refunds.list_async, since, page_size)

    async def _since(
        self, operation: str, list_async: Callable[[Any], Awaitable[Any]], since: datetime, page_size: int
    ) -> AsyncIterator[tuple[dict[str, Any], int]]:
        """Every object the listing holds created at or after `since`, newest first, each
        with the time (Unix seconds) its page was asked for: what it says is true as of
        then, so an event from after the request is not taken as older than it. The second
        before, in fact: an event of the same second may be newer, and wins the tie.
        Objects come unread, so that one the service cannot read does not end the listing."""
        params: dict[str, Any] = {"created": {"gte": int(since.timestamp())}, "limit": page_size}
        seen: set[str] = set()
        while True:
            asked_at = int(time.time()) - 1
            page = await self._call(operation, list_async(params))
            fresh = [obj for obj in page.data if obj.id not in seen]
            for obj in fresh:
                seen.add(str(obj.id))
                yield obj.to_dict(for_json=True), asked_at
            if not page.has_more or not fresh:  # no new id: a list that starts over ends here
                return
            params = {**params, "starting_after": fresh[-1].id}
