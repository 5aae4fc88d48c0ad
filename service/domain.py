"""The service's own vocabulary: invoice records, page requests and the domain errors
that every edge maps to its own status codes (gRPC statuses at one boundary, service/edge.py)."""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime

STATUSES = ("draft", "open", "paid", "uncollectible", "void")


@dataclass(frozen=True, slots=True)
class User:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Invoice:
    id: str
    stripe_invoice_id: str
    user: User
    status: str
    amount: int
    invoice_pdf: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Filters:
    """What a list may be narrowed to; all None is every invoice."""

    status: str | None = None
    user_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in list order (newest first): just after this invoice."""

    created_at: datetime
    id: str


@dataclass(frozen=True, slots=True)
class Page:
    """`limit` invoices, newest first: the 1-based page `number`, or, with `after`, the
    ones that follow that position (keyset paging)."""

    number: int
    limit: int
    filters: Filters = Filters()
    after: Cursor | None = None
    keyset: bool = False

    @property
    def offset(self) -> int:
        return 0 if self.keyset else (self.number - 1) * self.limit


@dataclass(frozen=True, slots=True)
class InvoicePage:
    invoices: list[Invoice]
    total: int
    # Where the next page starts; None when this page is the last.
    next_after: Cursor | None = None


@dataclass(frozen=True, slots=True)
class NewItem:
    name: str
    amount: int


@dataclass(frozen=True, slots=True)
class NewInvoice:
    """A validated request to create an invoice in Stripe. `user` is who the invoice
    belongs to when the caller names one; otherwise the Stripe customer is."""

    items: tuple[NewItem, ...]
    customer: str
    payment_method: str
    currency: str
    user: User | None = None

    def fingerprint(self) -> str:
        """Identifies the request's content, to tell a retry from a reused idempotency key."""
        return hashlib.sha256(repr(self).encode()).hexdigest()


RECORD_ID = re.compile(r"[0-9a-f]{24}")


def new_record_id() -> str:
    """A 24-hex-digit id in the shape existing callers know (a Mongo ObjectId): a 4-byte
    creation time and 8 random bytes, so ids sort roughly by creation and never collide
    across replicas."""
    return int(time.time()).to_bytes(4, "big").hex() + os.urandom(8).hex()


class DomainError(Exception):
    """A failure the caller can act on; its message is safe to show to the caller."""


class InvalidArgument(DomainError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(DomainError):
    pass


class Unavailable(DomainError):
    """A dependency (Postgres, Stripe) cannot be reached now; retrying later may work."""


class AlreadyExists(DomainError):
    """An idempotency key reused with a different request."""


class ResourceExhausted(DomainError):
    """A rate limit (Stripe's) was hit; retry with backoff."""


class Internal(DomainError):
    """The service itself is misconfigured; the message says what, never a secret."""


@dataclass(frozen=True, slots=True)
class StripeInvoice:
    """What one Stripe invoice object (from an API answer or an event) says about an
    invoice: enough to build or update the service's record."""

    stripe_invoice_id: str
    status: str
    amount: int
    invoice_pdf: str
    user: User


# Stripe's invoice state machine: draft -> open -> paid | uncollectible | void, and
# uncollectible -> paid | void. A step may be skipped (an event lost), never reversed.
_LATER_STATES = {
    "draft": frozenset({"open", "paid", "uncollectible", "void"}),
    "open": frozenset({"paid", "uncollectible", "void"}),
    "uncollectible": frozenset({"paid", "void"}),
    "paid": frozenset(),
    "void": frozenset(),
}


def supersedes(current: str, new: str) -> bool:
    """Whether an invoice in `current` may move to `new` (events arrive out of order)."""
    return new in _LATER_STATES[current]
