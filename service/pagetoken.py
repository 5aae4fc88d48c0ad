"""Page tokens (AIP-158): opaque to callers, they carry the position after the last
invoice of a page and a fingerprint of the filters, so a token cannot be replayed with
other filters. Not signed: a forged token can only move its holder within a list it
may read anyway."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

from service.domain import RECORD_ID, Cursor, Filters, InvalidArgument

FIELD = "page_token"
# An issued token is about 120 characters; anything much longer was not issued here.
MAX_TOKEN = 512


def encode(cursor: Cursor, filters: Filters) -> str:
    data = {"t": cursor.created_at.isoformat(), "i": cursor.id, "f": filters.fingerprint()}
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def decode(token: str, filters: Filters) -> Cursor:
    """Checks all a forger could change, so that a tampered token is INVALID_ARGUMENT and
    never reaches Postgres (a time that overflows in UTC, a NUL in the id) and never
    costs more than a short parse (deep nesting in a long token)."""
    if len(token) > MAX_TOKEN:
        raise InvalidArgument(FIELD, "not a token this service issued")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        created_at = datetime.fromisoformat(data["t"])
        if created_at.tzinfo is None:
            raise ValueError("no time zone")
        cursor = Cursor(created_at=created_at.astimezone(UTC), id=data["i"])
        fingerprint = data["f"]
    except (binascii.Error, ValueError, OverflowError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidArgument(FIELD, "not a token this service issued") from exc
    if not isinstance(cursor.id, str) or not RECORD_ID.fullmatch(cursor.id):
        raise InvalidArgument(FIELD, "not a token this service issued")
    if fingerprint != filters.fingerprint():
        raise InvalidArgument(FIELD, "was issued for other filters; keep the filters of the first page")
    return cursor
