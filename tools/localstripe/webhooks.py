"""Webhook deliveries counted while in flight, and, when asked, retried as Stripe retries
them (`--webhook-retry-s`) and late, out of order and doubled as Stripe sends them
(`--webhook-late-s`, `--webhook-duplicates`: Disorder).

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
from dataclasses import dataclass, field
from random import Random
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


@dataclass
class Disorder:
    """Deliveries as Stripe makes them, not as localstripe does (each event once, a second
    later, in the order made): Stripe "doesn't guarantee delivery of events in the order in
    which they're generated" and endpoints "might occasionally receive the same event more
    than once" (https://docs.stripe.com/webhooks, event ordering and duplicate events).
    Each event waits up to `late_s` more (so events made within that span arrive in any
    order), and a share `duplicates` of them is sent again up to `late_s` after the first.
    Seeded, so that a failing run can be repeated."""

    late_s: float = 0.0
    duplicates: float = 0.0
    seed: int = 0
    random: Random = field(init=False)

    def __post_init__(self) -> None:
        if self.late_s < 0 or not 0 <= self.duplicates <= 1:
            raise ValueError("late_s must be >= 0 and duplicates within [0, 1]")
        self.random = Random(self.seed)  # noqa: S311 - disorder for tests, not secrets

    def delay(self) -> float:
        return self.random.uniform(0, self.late_s)

    def again(self) -> bool:
        return self.random.random() < self.duplicates


class Deliveries:
    """localstripe's `_send_webhook`, each delivery retried for `retry_for_s` (0: sent once,
    as localstripe sends), late and duplicated by `disorder`, and counted from the moment it
    is scheduled until it is done (its duplicate included)."""

    def __init__(self, retry_for_s: float, disorder: Disorder | None = None) -> None:
        self.retry_for_s = retry_for_s
        self.disorder = disorder or Disorder()
        self.in_flight = 0
        # What a test needs to know the disorder happened: events sent before one made
        # earlier, and events sent twice.
        self.scheduled = self.latest_sent = 0
        self.out_of_order = self.doubled = 0

    def send(self, event: Any) -> Coroutine[Any, Any, None]:
        """Called synchronously by localstripe's schedule_webhook, so the count rises before
        the API call that made the event answers."""
        self.in_flight += 1
        self.scheduled += 1
        return self._send(event, self.scheduled)

    def counts(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "out_of_order": self.out_of_order, "doubled": self.doubled}

    async def _send(self, event: Any, made: int) -> None:
        try:
            payload = json.dumps(event._export(), indent=2, sort_keys=True).encode()
            # localstripe's second: an event arrives a moment after its call answered.
            await asyncio.sleep(1 + self.disorder.delay())
            copies = 2 if self.disorder.again() else 1
            for copy in range(copies):
                if copy:
                    await asyncio.sleep(self.disorder.delay())
                    self.doubled += 1
                elif made < self.latest_sent:
                    self.out_of_order += 1
                self.latest_sent = max(self.latest_sent, made)
                webhooks: Any = importlib.import_module("localstripe.webhooks")
                for webhook in list(webhooks._webhooks.values()):
                    if webhook.events is None or event.type in webhook.events:
                        await _deliver(webhook.url, webhook.secret, event.type, payload, self.retry_for_s)
        finally:
            self.in_flight -= 1


DELIVERIES = Deliveries(0.0)


def patch(retry_for_s: float, disorder: Disorder | None = None) -> None:
    """From now on, every delivery goes through DELIVERIES, retried for `retry_for_s` and
    made late and doubled by `disorder` (localstripe's schedule_webhook looks
    `_send_webhook` up in its module at each call)."""
    version.check()
    DELIVERIES.retry_for_s = retry_for_s
    DELIVERIES.disorder = disorder or Disorder()
    webhooks: Any = importlib.import_module("localstripe.webhooks")
    webhooks._send_webhook = DELIVERIES.send
