"""The service's own vocabulary: invoice records, page requests and the domain errors
that every edge maps to its own status codes (gRPC statuses at one interceptor)."""

from __future__ import annotations

import os
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
class Page:
    """A 1-based page of `limit` invoices, newest first."""

    number: int
    limit: int

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.limit


@dataclass(frozen=True, slots=True)
class InvoicePage:
    invoices: list[Invoice]
    total: int


@dataclass(frozen=True, slots=True)
class NewItem:
    name: str
    amount: int


@dataclass(frozen=True, slots=True)
class NewInvoice:
    """A validated request to create an invoice in Stripe."""

    items: tuple[NewItem, ...]
    customer: str
    payment_method: str


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


class Unimplemented(DomainError):
    pass
