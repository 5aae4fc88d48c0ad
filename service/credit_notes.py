"""Money given back on an invoice: Stripe's credit notes and refunds as the service records
them, and which of two descriptions of one is the later. A note's amount is split the way
Stripe gives it back: `refunded` to the invoice's payment, `credited` to the customer's
balance, `out_of_band` outside Stripe. A refund made outside a note (the Dashboard, the
API, a dispute's support) names the payment intent it refunds, not the invoice; an
invoice payment says whose that is. No I/O (service/stripe_objects.py reads Stripe's
objects, service/storage/credit_notes.py and refunds.py keep them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class NoteStatus(StrEnum):
    ISSUED = "issued"
    VOID = "void"  # final: Stripe never issues a voided note again


@dataclass(frozen=True, slots=True)
class StripeCreditNote:
    """A credit note as Stripe described it, in minor units of `currency`."""

    id: str
    stripe_invoice_id: str
    status: NoteStatus
    amount: int
    refunded: int
    credited: int
    out_of_band: int
    reason: str
    memo: str
    currency: str | None = None
    created: int | None = None
    # The refunds the note made or linked, each with the part of it the note counts in
    # `refunded` (that part never counts again on its own); None when not known (a note
    # recorded before they were kept).
    refund_links: tuple[tuple[str, int], ...] | None = ()


class RefundStatus(StrEnum):
    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # final, and gave nothing back (a closed card, ...)
    CANCELED = "canceled"  # final, as failed


_REFUND_FINAL = frozenset({RefundStatus.FAILED, RefundStatus.CANCELED})


@dataclass(frozen=True, slots=True)
class StripeRefund:
    """A refund as Stripe described it, in minor units of `currency`."""

    id: str
    payment_intent: str
    status: RefundStatus
    amount: int
    reason: str
    currency: str | None = None
    created: int | None = None


@dataclass(frozen=True, slots=True)
class InvoicePayment:
    """That `payment_intent` pays `stripe_invoice_id` (Stripe never moves it to another)."""

    payment_intent: str
    stripe_invoice_id: str


def refunded_outside(notes: list[StripeCreditNote], refunds: list[StripeRefund]) -> int:
    """What refunds gave back outside the issued notes: the part of a refund a note linked
    is in the note's `refunded`, the rest of it is outside; a failed or canceled one gave
    nothing. An issued note whose links are unknown may have made any of those refunds, so
    its `refunded` is taken off what they seem to give outside (never below 0). The rule the
    record's totals follow (service/storage/credit_notes.py, REFRESH_TOTALS)."""
    issued = [n for n in notes if n.status == NoteStatus.ISSUED]
    linked: dict[str, int] = {}
    for note in issued:
        for refund_id, amount in note.refund_links or ():
            linked[refund_id] = linked.get(refund_id, 0) + amount
    outside = sum(max(r.amount - linked.get(r.id, 0), 0) for r in refunds if r.status not in _REFUND_FINAL)
    unknown = sum(n.refunded for n in issued if n.refund_links is None)
    return max(outside - unknown, 0)


# Stripe's credit note reasons (the `reason` parameter's enum).
REASONS = frozenset({"duplicate", "fraudulent", "order_change", "product_unsatisfactory"})


@dataclass(frozen=True, slots=True)
class RefundAsk:
    """What a RefundInvoice asks for: an amount (None: all that is left), Stripe's reason
    (empty for none) and a memo."""

    amount: int | None
    reason: str
    memo: str

    def fields(self) -> dict[str, object]:
        """The request's fields, for the idempotency key's fingerprint."""
        return {"amount": self.amount, "reason": self.reason, "memo": self.memo}


def note_overtaken(stored: NoteStatus, stored_time: int, new: NoteStatus, new_time: int) -> bool:
    """Whether `new`, true at Stripe time `new_time`, is a later state of the note than the
    stored one: void after issued whenever it arrives (Stripe delivers in any order); else
    the later Stripe second, or the same one (a note's fields do not change within its
    status but for its memo and metadata, so either description of that second will do)."""
    if new != stored:
        return new == NoteStatus.VOID
    return new_time >= stored_time


def refund_overtaken(stored: RefundStatus, stored_time: int, new: RefundStatus, new_time: int) -> bool:
    """As note_overtaken, for a refund: failed and canceled are final, whenever they
    arrive (a refund that succeeded can still fail later, Stripe's "failed refunds"); else
    the later Stripe second, or the same one."""
    if stored in _REFUND_FINAL:
        return False
    if new != stored and new in _REFUND_FINAL:
        return True
    return new_time >= stored_time
