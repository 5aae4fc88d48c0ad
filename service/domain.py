"""The service's own vocabulary: invoice records, page requests and the domain errors
that every edge maps to its own status codes (gRPC statuses at one boundary, service/edge.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from enum import StrEnum


class Status(StrEnum):
    """Stripe's invoice statuses, the words REST callers see."""

    DRAFT = "draft"
    OPEN = "open"
    PAID = "paid"
    UNCOLLECTIBLE = "uncollectible"
    VOID = "void"


STATUSES = tuple(Status)


class Outcome(StrEnum):
    """What applying one Stripe invoice did to the record (a webhook's answer says it)."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    DUPLICATE = "duplicate"  # the event was applied before
    STALE = "stale"  # older than what the record holds
    DELETED = "deleted"
    IGNORED_DELETED = "ignored-deleted"  # of an invoice Stripe deleted


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
    # Lowercase ISO 4217; None on records from before the service kept it.
    currency: str | None = None
    # Money given back by the invoice's issued credit notes (service/credit_notes.py), in
    # minor units of `currency`: all of it, and the part refunded to its payment.
    amount_credited: int = 0
    amount_refunded: int = 0


@dataclass(frozen=True, slots=True)
class Filters:
    """What a list may be narrowed to; all None is every invoice."""

    status: str | None = None
    user_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    # True: only invoices with money given back (refunded or credited); False: only those without.
    given_back: bool | None = None

    def fingerprint(self) -> str:
        """Binds a page token to its filters. A filter added after the first four is left
        out while unset, so that the fingerprint of the filters a token from before it named
        is the one it carries (tokens in flight across a deploy keep working)."""
        shown = [
            f"{f.name}={getattr(self, f.name)!r}"
            for n, f in enumerate(fields(self))
            if n < 4 or getattr(self, f.name) is not None
        ]
        return hashlib.sha256(f"Filters({', '.join(shown)})".encode()).hexdigest()[:16]


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
        """Identifies the request's content, to tell a retry from a reused idempotency key.
        A canonical, versioned encoding of the named fields: a field added to this class
        later changes no stored fingerprint (a new field enters as FINGERPRINT_VERSION 2)."""
        fields = {
            "currency": self.currency,
            "customer": self.customer,
            "items": [[item.name, item.amount] for item in self.items],
            "payment_method": self.payment_method,
            "user": None if self.user is None else [self.user.id, self.user.name],
        }
        return fingerprint("create", fields)

    def legacy_fingerprint(self) -> str:
        """The fingerprint of keys stored before the canonical one (sha256 of the repr),
        accepted for those keys so that their retries keep working after the upgrade."""
        return hashlib.sha256(repr(self).encode()).hexdigest()


FINGERPRINT_VERSION = 1


def fingerprint(operation: str, fields: Mapping[str, object]) -> str:
    """`v1:` and the SHA-256 of sorted, compact JSON of the operation and its fields."""
    canonical = json.dumps([operation, fields], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"v{FINGERPRINT_VERSION}:" + hashlib.sha256(canonical.encode()).hexdigest()


# The steps of a Create, in order (`legacy`: cut off before progress was recorded); a key's
# row names the last one known done.
CREATE_STEPS = ("legacy", "claimed", "drafted", "lined", "finalized", "done")


@dataclass(frozen=True, slots=True)
class CreateClaim:
    """An attempt's hold on an idempotency key: what earlier attempts recorded. `attempt`
    fences progress (only the attempt that holds the lease may record); `generation`
    names the Stripe Idempotency-Keys its calls use; `step` is the last step known done
    (`legacy`: cut off before the service recorded progress); `claim_id`, chosen by the
    claimer, ends the claim (release) even when the claimer never heard it was made."""

    attempt: int
    generation: int
    stripe_invoice_id: str | None
    step: str
    created_at: datetime
    claim_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Audited:
    """Who asked for a Create, Pay or Void, for the audit entry its attempt writes as it
    ends: the caller's name, the call's request id, the caller's own idempotency key
    (None when it sent none), and the invoice when the call names one (a Create's comes
    from its recorded progress). Stored with the attempt's claim too, for the entry the
    attempt taking its key over writes should it never end."""

    action: str
    caller: str
    request_id: str | None
    idempotency_key: str | None
    stripe_invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int  # its place in the trail, for paging
    at: datetime
    action: str
    caller: str
    request_id: str | None
    idempotency_key: str | None
    stripe_invoice_id: str | None
    attempt: int
    outcome: str
    detail: str


@dataclass(frozen=True, slots=True)
class AuditPage:
    """Entries of one invoice's trail, oldest first; `next_after` is the last one's `seq`
    when more follow."""

    entries: list[AuditEntry]
    next_after: int | None


# An audit entry's outcome when the attempt answered.
AUDIT_OK = "ok"
# ...and when it never ended, written by the attempt that took its key over.
AUDIT_ABANDONED = "abandoned"


def audit_outcome(error: BaseException) -> tuple[str, str]:
    """A failed attempt's outcome and detail: the domain error's kind and message, or
    `error` for anything else (whose message may hold what callers must not see)."""
    if isinstance(error, DomainError):
        return type(error).__name__, str(error)
    return "error", "internal error" if isinstance(error, Exception) else type(error).__name__


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


class StoreUnavailable(Unavailable):
    """Postgres did not answer within the unit of work's deadline, or the connection to it
    failed: a caller that was about to use the store again need not wait a second time."""


class ClaimUnconfirmed(Unavailable):
    """A claim of an idempotency key whose commit broke off with the connection (a
    failover): it may have been made, and then holds the key for nobody."""


class StripeReplayed(Unavailable):
    """Stripe replayed an error (5xx, decline, refusal) saved under the call's key by an
    earlier call, now ended: go on with a new generation of keys (service/attempts.py)."""


class CreateInProgress(Unavailable):
    """Another attempt holds the idempotency key now; its answer will be the answer."""


class AlreadyExists(DomainError):
    """An idempotency key reused with a different request."""


class FailedPrecondition(DomainError):
    """The invoice is not in a state that allows the operation (voiding a paid invoice);
    the message names the state."""


class ResourceExhausted(DomainError):
    """A limit was hit (Stripe's rate limit, the service's cap on watches, a watcher too
    slow for its buffer); retry with backoff."""


class OutOfRange(DomainError):
    """A position the service no longer holds (a watch's resume token older than the
    change feed's retention): start again from a fresh list."""


class Internal(DomainError):
    """The service itself is misconfigured; the message says what, never a secret."""


class Unrecordable(Internal):
    """Postgres refused what Stripe sent (a value no column can hold): retrying the same
    data cannot help, so the webhook takes it as `rejected` for an operator to see."""


@dataclass(frozen=True, slots=True)
class StripeInvoice:
    """What one Stripe invoice object (from an API answer or an event) says about an
    invoice: enough to build or update the service's record. `amount` is Stripe's
    `total` (negative for a credit), `created` Stripe's creation time (Unix seconds)."""

    stripe_invoice_id: str
    status: str
    amount: int
    invoice_pdf: str
    user: User
    currency: str | None = None
    created: int | None = None
    # The payment intent paying it, which API versions before 2025-03-31.basil name here
    # (later ones in an invoice payment): the link from a refund to its invoice.
    payment_intent: str | None = None


# Stripe's invoice state machine: draft -> open -> paid | uncollectible | void, and
# uncollectible -> paid | void. A step may be skipped (an event lost), never reversed.
_LATER_STATES = {
    Status.DRAFT: frozenset({Status.OPEN, Status.PAID, Status.UNCOLLECTIBLE, Status.VOID}),
    Status.OPEN: frozenset({Status.PAID, Status.UNCOLLECTIBLE, Status.VOID}),
    Status.UNCOLLECTIBLE: frozenset({Status.PAID, Status.VOID}),
    Status.PAID: frozenset(),
    Status.VOID: frozenset(),
}


def supersedes(current: str, new: str) -> bool:
    """Whether an invoice in `current` may move to `new` (events arrive out of order)."""
    return new in _LATER_STATES[Status(current)]


@dataclass(frozen=True, slots=True)
class StoredState:
    """What the record holds of Stripe's invoice, and the Stripe time (Unix seconds) of
    the newest fact applied to it."""

    status: str
    amount: int
    invoice_pdf: str
    stripe_time: int

    def _progress(self) -> tuple[bool, int]:
        return bool(self.invoice_pdf), abs(self.amount) if self.status == Status.DRAFT else 0

    def overtaken_by(self, new: StripeInvoice, stripe_time: int) -> bool:
        """Whether `new`, true at `stripe_time`, is a later state of the invoice than the
        record: a later status; or the same status at a later Stripe second; or, within
        the same second (whose events arrive in any order), a state at least as far along:
        a draft's total only grows (in size) while its lines are added, and the PDF link,
        once Stripe sets it at finalization, stays. So a draft's `invoice.created` (total
        0) never undoes the `invoice.updated` of the same second that carried its lines.
        The size of the total counts, not its sign: a credit's lines are negative."""
        if new.status != self.status:
            return supersedes(self.status, new.status)
        if stripe_time != self.stripe_time:
            return stripe_time > self.stripe_time
        later = StoredState(new.status, new.amount, new.invoice_pdf, stripe_time)
        return later._progress() >= self._progress()
