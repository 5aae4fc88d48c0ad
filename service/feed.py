"""The change feed's vocabulary: positions in it, the changes it holds, one read of it, and
what a watch is narrowed to (service/watch.py streams them; service/storage/changes.py
reads them from Postgres). No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from service.domain import Invoice


@dataclass(frozen=True, slots=True, order=True)
class FeedPosition:
    """A position in the change feed: after the changes of transaction `xact` up to its
    change `seq`. Positions order the feed; see storage/migrations/0006 for why a
    sequence alone cannot."""

    xact: int
    seq: int


class ChangeKind(StrEnum):
    """What a change did to a record; BOOKMARK is no change, only a newer position."""

    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"
    BOOKMARK = "bookmark"


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed: the record as the change left it (as it was, for a
    deletion; None for a bookmark), at `position`, written at `changed_at`."""

    position: FeedPosition
    kind: ChangeKind
    invoice: Invoice | None
    changed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class FeedRead:
    """One read of the change feed: its changes in order; the position it reaches; the
    records (by both ids) that commits it cannot hand out yet changed (an older write
    transaction was still open); and whether it saw, one way or the other, every commit
    made before it began (neither list was cut short by its limit)."""

    changes: list[Change]
    reached: FeedPosition
    held: tuple[str, ...] = ()
    complete: bool = True


@dataclass(frozen=True, slots=True)
class WatchFilter:
    """What a watch is narrowed to; all None is every change. `invoice_id` is the
    service's id or Stripe's, as for Get."""

    invoice_id: str | None = None
    user_id: str | None = None
    status: str | None = None

    def matches(self, invoice: Invoice) -> bool:
        return (
            (self.invoice_id is None or self.invoice_id in (invoice.id, invoice.stripe_invoice_id))
            and (self.user_id is None or self.user_id == invoice.user.id)
            and (self.status is None or self.status == invoice.status)
        )
