"""Page tokens (AIP-158) and watch resume tokens: opaque to callers. A page token carries
the position after the last invoice of a page and a fingerprint of the filters, so it
cannot be replayed with other filters; an audit page token, the last entry's place and
the invoice whose trail it pages; a resume token carries a change feed position, which
means the same under any filters. Not signed: a forged token can only move its holder
within a list or a feed it may read anyway."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

from service.domain import RECORD_ID, Cursor, Filters, InvalidArgument
from service.feed import FeedPosition

FIELD = "page_token"
RESUME_FIELD = "resume_token"
# An issued token is at most about 400 characters (an audit token of the longest Stripe
# id); anything longer was not issued here.
MAX_TOKEN = 512


def _pack(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def _unpack(token: str) -> dict[str, object]:
    """The token's JSON object; ValueError for anything else (bounded: a long token was
    never issued, and deep nesting would cost a parse)."""
    if len(token) > MAX_TOKEN:
        raise ValueError("too long")
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, RecursionError) as exc:
        raise ValueError("not base64 JSON") from exc
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return data


def encode(cursor: Cursor, filters: Filters) -> str:
    return _pack({"t": cursor.created_at.isoformat(), "i": cursor.id, "f": filters.fingerprint()})


def decode(token: str, filters: Filters) -> Cursor:
    """Checks all a forger could change, so that a tampered token is INVALID_ARGUMENT and
    never reaches Postgres (a time that overflows in UTC, a NUL in the id) and never
    costs more than a short parse (deep nesting in a long token)."""
    try:
        data = _unpack(token)
        created_at = datetime.fromisoformat(str(data["t"]))
        if created_at.tzinfo is None:
            raise ValueError("no time zone")
        created_at = created_at.astimezone(UTC)  # a time that overflows as UTC fails here
        record_id, fingerprint = data["i"], data["f"]
    except (ValueError, OverflowError, KeyError, TypeError) as exc:
        raise InvalidArgument(FIELD, "not a token this service issued") from exc
    if not isinstance(record_id, str) or not RECORD_ID.fullmatch(record_id):
        raise InvalidArgument(FIELD, "not a token this service issued")
    cursor = Cursor(created_at=created_at, id=record_id)
    if fingerprint != filters.fingerprint():
        raise InvalidArgument(FIELD, "was issued for other filters; keep the filters of the first page")
    return cursor


# Feed positions and audit entries' places are Postgres bigints, never negative.
_POSITION_MAX = 2**63 - 1


def encode_audit(stripe_invoice_id: str, after: int) -> str:
    return _pack({"n": stripe_invoice_id, "q": after})


def decode_audit(token: str, stripe_invoice_id: str) -> int:
    """The place after which the next page of this invoice's trail starts."""
    try:
        data = _unpack(token)
    except ValueError as exc:
        raise InvalidArgument(FIELD, "not a token this service issued") from exc
    after = _bigint(data.get("q"))
    if after is None or set(data) != {"n", "q"}:
        raise InvalidArgument(FIELD, "not a token this service issued")
    if data["n"] != stripe_invoice_id:
        raise InvalidArgument(FIELD, "was issued for another invoice's trail")
    return after


def encode_position(position: FeedPosition) -> str:
    return _pack({"x": position.xact, "s": position.seq})


def decode_position(token: str) -> FeedPosition:
    """The position a resume token names; INVALID_ARGUMENT for anything this service did
    not issue, before it reaches Postgres (a number beyond a bigint, a float, a bool)."""
    try:
        data = _unpack(token)
    except ValueError as exc:
        raise InvalidArgument(RESUME_FIELD, "not a token this service issued") from exc
    xact, seq = _bigint(data.get("x")), _bigint(data.get("s"))
    if xact is None or seq is None or set(data) != {"x", "s"}:
        raise InvalidArgument(RESUME_FIELD, "not a token this service issued")
    return FeedPosition(xact, seq)


def _bigint(value: object) -> int | None:
    """`value` if it is a whole number a position may hold (JSON's true is an int to Python)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _POSITION_MAX:
        return value
    return None
