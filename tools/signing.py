"""Stripe-Signature headers for webhook payloads, as Stripe computes them (HMAC-SHA256 of
`t.payload` with the endpoint's secret): for the tests and the benchmark's sender."""

from __future__ import annotations

import hashlib
import hmac
import time


def sign(payload: str, secret: str, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{at}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"
