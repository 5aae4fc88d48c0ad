"""Page tokens (AIP-158): opaque to callers, they carry the position after the last
invoice of a page and a fingerprint of the filters, so a token cannot be replayed with
other filters. Not signed: a forged token can only move its holder within a list it
may read anyway."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from service.domain import Cursor, Filters, InvalidArgument

FIELD = "page_token"


def encode(cursor: Cursor, filters: Filters) -> str:
    data = {"t": cursor.created_at.isoformat(), "i": cursor.id, "f": filters.fingerprint()}
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def decode(token: str, filters: Filters) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        cursor = Cursor(created_at=datetime.fromisoformat(data["t"]), id=str(data["i"]))
        fingerprint = data["f"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(FIELD, "not a token this service issued") from exc
    if cursor.created_at.tzinfo is None:
        raise InvalidArgument(FIELD, "not a token this service issued")
    if fingerprint != filters.fingerprint():
        raise InvalidArgument(FIELD, "was issued for other filters; keep the filters of the first page")
    return cursor
