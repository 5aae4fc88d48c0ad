"""Turns raw request values into domain values, or raises InvalidArgument naming the
field. Kept free of protobuf so the same rules serve every edge."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

from service import pagetoken
from service.credit_notes import REASONS, RefundAsk
from service.domain import RECORD_ID, STATUSES, Filters, InvalidArgument, NewInvoice, NewItem, Page, User
from service.feed import WatchFilter

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_ITEMS = 100
# Stripe refuses amounts above eight digits in minor units: an item's, and the total a
# Create charges.
MAX_AMOUNT = 99_999_999
MAX_NAME_LENGTH = 500
# Deep pages cost an OFFSET scan; past this, callers must narrow the query.
MAX_PAGE = 1_000_000
# How many invoices a page by number may skip (LIST_MAX_OFFSET): each is read and
# thrown away, so a deep page costs as much as all the pages before it. As in
# Elasticsearch's max_result_window; deeper, page with page_token.
DEFAULT_MAX_OFFSET = 10_000

# Stripe metadata values hold 500 characters; user ids and names stay well inside.
MAX_USER_FIELD = 200
CURRENCY = re.compile(r"[a-z]{3}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")

STRIPE_ID = {
    prefix: re.compile(prefix + r"_[A-Za-z0-9]{1,250}") for prefix in ("in", "cus", "pm", "cn", "pi", "re", "pyr")
}


def page(
    number: int | None,
    limit: int | None,
    *,
    token: str = "",
    filters: Filters | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET,
) -> Page:
    """A page by number (the original API, which always sent `page`), or by token
    (AIP-158) when `page` is absent: the first page then has no token."""
    filters = filters or Filters()
    limit = page_size(limit)
    if token:
        if number is not None:
            raise InvalidArgument("page", "must be absent when page_token is given")
        return Page(number=1, limit=limit, filters=filters, after=pagetoken.decode(token, filters), keyset=True)
    if number is None:
        return Page(number=1, limit=limit, filters=filters, keyset=True)
    if not 1 <= number <= MAX_PAGE:
        raise InvalidArgument("page", f"must be between 1 and {MAX_PAGE}, got {number}")
    if (number - 1) * limit > max_offset:
        raise InvalidArgument(
            "page",
            f"page {number} of {limit} skips {(number - 1) * limit} invoices, more than {max_offset}: "
            "page with pageToken instead (leave page out; pass each answer's nextPageToken as pageToken)",
        )
    return Page(number=number, limit=limit, filters=filters)


def page_size(limit: int | None) -> int:
    """A page's `limit`, for every paged call alike."""
    limit = DEFAULT_PAGE_SIZE if limit is None else limit
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidArgument("limit", f"must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    return limit


def filters(
    status: str,
    user_id: str,
    created_after: datetime | None,
    created_before: datetime | None,
    given_back: bool | None = None,
) -> Filters:
    if status and status not in STATUSES:
        raise InvalidArgument("status", f"must be one of {', '.join(STATUSES)}")
    if len(user_id) > MAX_USER_FIELD:
        raise InvalidArgument("user_id", f"must be at most {MAX_USER_FIELD} characters")
    _storable("user_id", user_id)
    if created_after and created_before and created_after >= created_before:
        raise InvalidArgument("created_before", "must be after created_after")
    return Filters(
        status=status or None,
        user_id=user_id or None,
        created_after=created_after,
        created_before=created_before,
        given_back=given_back,
    )


def invoice_id(value: str, field: str = "id") -> str:
    """An id is the service's own 24-hex-digit id or Stripe's `in_...` id."""
    if RECORD_ID.fullmatch(value) or STRIPE_ID["in"].fullmatch(value):
        return value
    raise InvalidArgument(field, "must be 24 lowercase hex digits or a Stripe invoice id (in_...)")


def watch_filter(invoice: str, user_id: str, status: str) -> WatchFilter:
    """A watch's filters, checked as a list's are; empty strings are no filter."""
    narrowed = filters(status, user_id, None, None)
    return WatchFilter(
        invoice_id=invoice_id(invoice, "invoice_id") if invoice else None,
        user_id=narrowed.user_id,
        status=narrowed.status,
    )


def _stripe_id(field: str, prefix: str, value: str) -> str:
    if not STRIPE_ID[prefix].fullmatch(value):
        raise InvalidArgument(field, f"must be a Stripe id of the form {prefix}_...")
    return value


def new_invoice(
    items: Iterable[tuple[str, int]],
    customer: str,
    payment_method: str,
    *,
    currency: str,
    user: tuple[str, str] | None = None,
) -> NewInvoice:
    checked = []
    for i, (name, amount) in enumerate(items):
        if not name.strip():
            raise InvalidArgument(f"items[{i}].name", "must not be blank")
        _storable(f"items[{i}].name", name)
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidArgument(f"items[{i}].name", f"must be at most {MAX_NAME_LENGTH} characters")
        if not 0 < amount <= MAX_AMOUNT:
            raise InvalidArgument(f"items[{i}].amount", f"must be between 1 and {MAX_AMOUNT} minor units, got {amount}")
        checked.append(NewItem(name=name, amount=amount))
    if not checked:
        raise InvalidArgument("items", "at least one item is required")
    total = sum(item.amount for item in checked)
    if total > MAX_AMOUNT:
        raise InvalidArgument("items", f"the total must be at most {MAX_AMOUNT} minor units, got {total}")
    if len(checked) > MAX_ITEMS:
        raise InvalidArgument("items", f"at most {MAX_ITEMS} items are allowed, got {len(checked)}")
    if not CURRENCY.fullmatch(currency.lower()):
        raise InvalidArgument("currency", "must be an ISO 4217 code such as eur")
    return NewInvoice(
        items=tuple(checked),
        customer=_stripe_id("customer", "cus", customer),
        payment_method=payment_method_id(payment_method),
        currency=currency.lower(),
        user=None if user is None else _user(*user),
    )


def payment_method_id(value: str) -> str:
    return _stripe_id("payment_method", "pm", value)


def _storable(field: str, value: str) -> None:
    """Postgres text cannot hold NUL: refused here as the caller's mistake it is, not
    discovered by the database as an internal error."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")


def _user(user_id: str, name: str) -> User:
    if not user_id.strip() or len(user_id) > MAX_USER_FIELD:
        raise InvalidArgument("user._id", f"must be 1 to {MAX_USER_FIELD} characters")
    if len(name) > MAX_USER_FIELD:
        raise InvalidArgument("user.name", f"must be at most {MAX_USER_FIELD} characters")
    _storable("user._id", user_id)
    _storable("user.name", name)
    return User(id=user_id, name=name)


def idempotency_key(value: str | None) -> str | None:
    """Callers' keys, printable ASCII, short enough to derive Stripe's keys (255 max)."""
    if value is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidArgument("idempotency-key", "must be 1 to 200 printable ASCII characters")
    return value


MAX_MEMO = 5000  # Stripe's limit on a credit note's memo
# Past this, a double (the record's amounts on the wire) no longer holds every integer.
MAX_REFUND = 2**53 - 1


def refund_ask(amount: int | None, reason: str, memo: str) -> RefundAsk:
    """A RefundInvoice's amount, reason and memo, checked as Stripe would refuse them."""
    if amount is not None and not 1 <= amount <= MAX_REFUND:
        raise InvalidArgument("amount", f"must be between 1 and {MAX_REFUND:,} minor units, or left out for all")
    if reason and reason not in REASONS:
        raise InvalidArgument("reason", f"must be one of {', '.join(sorted(REASONS))}, or empty")
    if len(memo) > MAX_MEMO:
        raise InvalidArgument("memo", f"must be at most {MAX_MEMO:,} characters")
    return RefundAsk(amount, reason, memo)
