"""Stripe's idempotency keys, which stock localstripe ignores: every POST /v1/... with an
Idempotency-Key is replayed, or refused with idempotency_error when its parameters
differ, as Stripe does (kept in memory only)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.typedefs import Handler

from tools.localstripe.errors import VALIDATION_FAILED, error_response

# Stripe keeps idempotency keys for at least 24 hours; older ones may be reused.
IDEMPOTENCY_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Remembered:
    at: float
    endpoint: str
    params: str
    status: int
    body: bytes


class Idempotency:
    """Stripe's idempotency for POST /v1/...: the first response to a key, once the call
    started running, is replayed for the same endpoint and parameters for 24 hours,
    without running it again; other parameters are a 400 idempotency_error. "Stripe saves
    the status code and body of the first request made with a given idempotency key after
    endpoint execution begins ... regardless of whether it succeeds or fails", 500s
    included; "if incoming parameters fail validation, or the request conflicts with
    another that's executing concurrently, no idempotent result is saved"
    (https://docs.stripe.com/api/idempotent_requests, docs.stripe.com/idempotency). So a
    2xx, a 402 decline, a 404 and a 400 refusal of a request that ran (an invoice already
    paid, a payment method not attached) are saved; a 400 of failed parameter validation
    (errors.invalid_param), a 405 and a 409 are not. In memory: a restart forgets."""

    def __init__(self) -> None:
        self.seen: dict[str, Remembered] = {}
        self.running: set[str] = set()

    @staticmethod
    async def params_of(request: web.Request) -> str:
        """The request's parameters, independent of their order (aiohttp caches the body for the handler)."""
        body = await request.read()
        text = body.decode("utf-8", "replace")
        form: Any
        if request.content_type == "application/json" and body:
            try:
                form = json.loads(text)
            except ValueError:
                form = text
        else:
            form = sorted(parse_qsl(text, keep_blank_values=True))
        return json.dumps([form, sorted(parse_qsl(request.query_string, keep_blank_values=True))], sort_keys=True)

    @staticmethod
    def saved(response: web.StreamResponse) -> bool:
        """Whether Stripe would save this answer: every one of a request that ran."""
        return response.status not in (405, 409) and not response.get(VALIDATION_FAILED, False)

    def forget(self) -> int:
        """Forgets every key, as Stripe does 24 hours after each was first used."""
        count = len(self.seen)
        self.seen.clear()
        return count

    def forget_expired(self, now: float) -> None:
        for key, remembered in list(self.seen.items()):  # insertion order is time order
            if remembered.at > now - IDEMPOTENCY_TTL_S:
                break
            del self.seen[key]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not key or not request.path.startswith("/v1/"):
            return await handler(request)
        if len(key) > 255:
            return error_response(400, {"type": "invalid_request_error", "message": "Idempotency-Key is too long."})
        endpoint, params, now = f"{request.method} {request.path}", await self.params_of(request), time.time()
        self.forget_expired(now)
        seen = self.seen.get(key)
        if seen is not None:
            if seen.endpoint != endpoint:
                message = (
                    "Keys for idempotent requests can only be used for the same endpoint they were first used for "
                    f"('{seen.endpoint}' vs '{endpoint}'). Try using a key other than '{key}' if you meant to "
                    "execute a different request."
                )
                return error_response(400, {"type": "idempotency_error", "message": message})
            if seen.params != params:
                message = (
                    "Keys for idempotent requests can only be used with the same parameters they were first used "
                    f"with. Try using a key other than '{key}' if you meant to execute a different request."
                )
                return error_response(400, {"type": "idempotency_error", "message": message})
            headers = {"Idempotency-Key": key, "Idempotent-Replayed": "true"}
            return web.Response(
                body=seen.body, status=seen.status, content_type="application/json", charset="utf-8", headers=headers
            )
        if key in self.running:
            message = (
                "There is currently another in-progress request using this Idempotent Key (that probably means "
                f"you submitted twice, and the other request is still going through): '{key}'. Please try again later."
            )
            return error_response(409, {"type": "idempotency_error", "message": message})
        self.running.add(key)
        try:
            response = await handler(request)
        finally:
            self.running.discard(key)
        body = response.body if isinstance(response, web.Response) else None
        if isinstance(body, bytes) and self.saved(response):
            self.seen[key] = Remembered(now, endpoint, params, response.status, body)
        response.headers["Idempotency-Key"] = key
        return response
