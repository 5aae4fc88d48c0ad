"""Webhook deliveries counted while in flight, and retried as Stripe retries them when asked
(`--webhook-retry-s`).

Counted: localstripe sends each event a second after the call that made it answered, so a
test that empties its tables could still receive the events of the test before it (seen in
CI: two invoices of an earlier test recorded into a pagination test's emptied table).
GET /_config/deliveries says how many are still on their way; fixtures wait for none.

Retried:
localstripe sends each event once and forgets it when the endpoint answers anything but
2xx or cannot be reached, so an event that struck a sidecar while its Postgres failed over
was lost for good, which Stripe never does (it retries with backoff for up to three days).
Here each delivery is retried with capped exponential backoff for the window given, each
attempt signed anew with the time it is sent (as Stripe signs), until the endpoint answers
2xx. Off by default: the test session's emulator outlives the tests, and a retried event
would land in a later test's emptied tables."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp

from tools.localstripe import version

BACKOFF_S = (0.5, 10.0)
log = logging.getLogger("aiohttp.access")


async def _deliver(url: str, secret: str, event_type: str, payload: bytes, retry_for_s: float) -> None:
    give_up, attempt = time.monotonic() + retry_for_s, 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while True:
            now = int(time.time())
            signature = hmac.new(secret.encode(), b"%d.%s" % (now, payload), hashlib.sha256).hexdigest()
            headers = {"Content-Type": "application/json; charset=utf-8", "Stripe-Signature": f"t={now},v1={signature}"}
            try:
                async with session.post(url, data=payload, headers=headers) as reply:
                    if 200 <= reply.status < 300:
                        return
                    failure = f"answered {reply.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = f"failed: {type(exc).__name__}"
            attempt += 1
            if time.monotonic() > give_up:
                log.warning('webhook "%s" %s; given up after %d attempts', event_type, failure, attempt)
                return
            await asyncio.sleep(min(BACKOFF_S[1], BACKOFF_S[0] * 2**attempt))


class Deliveries:
    """localstripe's `_send_webhook`, each delivery retried for `retry_for_s` (0: sent once,
    as localstripe sends), and counted from the moment it is scheduled until it is done."""

    def __init__(self, retry_for_s: float) -> None:
        self.retry_for_s = retry_for_s
        self.in_flight = 0

    def send(self, event: Any) -> Coroutine[Any, Any, None]:
        """Called synchronously by localstripe's schedule_webhook, so the count rises before
        the API call that made the event answers."""
        self.in_flight += 1
        return self._send(event)

    async def _send(self, event: Any) -> None:
        try:
            payload = json.dumps(event._export(), indent=2, sort_keys=True).encode()
            await asyncio.sleep(1)  # localstripe's: an event arrives a moment after its call answered
            webhooks: Any = importlib.import_module("localstripe.webhooks")
            for webhook in list(webhooks._webhooks.values()):
                if webhook.events is None or event.type in webhook.events:
                    await _deliver(webhook.url, webhook.secret, event.type, payload, self.retry_for_s)
        finally:
            self.in_flight -= 1


DELIVERIES = Deliveries(0.0)


def patch(retry_for_s: float) -> None:
    """From now on, every delivery goes through DELIVERIES, retried for `retry_for_s`
    (localstripe's schedule_webhook looks `_send_webhook` up in its module at each call)."""
    version.check()
    DELIVERIES.retry_for_s = retry_for_s
    webhooks: Any = importlib.import_module("localstripe.webhooks")
    webhooks._send_webhook = DELIVERIES.send
