"""`make chaos`: faults injected into the real stack, and proof that nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from service import embedded, storage
from tools.stack import ROOT, local_env

API_KEY = "chaos-key"
# The emulator's deliveries as Stripe makes them (tools/localstripe/webhooks.py, Disorder):
# each event up to 3 s late, so that the events of one Create (made within a second or
# two) arrive in any order, and 30% of them sent twice.
STRIPE_LIKE_DELIVERIES = (3.0, 0.3)


def prepare(name: str) -> tuple[Path, str]:
    """A clean work folder `.build/<name>` and a migrated database on a temporary Postgres
    of the scenario's own (which it may stop and start)."""
    work = ROOT / ".build" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    url = asyncio.run(storage.fresh_database(embedded.start(work / "pg", temporary=True), name.replace("-", "_")))
    return work, url


def stack_env(url: str, work: Path, webhook_secret: str, **extra: str) -> dict[str, str]:
    """The server's and sidecar's environment: free ports, quiet logs, no drain wait."""
    return local_env(url, work, api_keys=API_KEY, webhook_secrets=webhook_secret, LOG_LEVEL="WARNING", **extra)


async def post_retrying(
    http: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    answers: Counter[str],
    *,
    deadline_s: float = 300,
    attempts: int = 1000,
) -> tuple[httpx.Response | None, int]:
    """A careful caller's POST: 429, 5xx and lost connections retried with capped, jittered
    backoff and the same headers (its Idempotency-Key, or none), until a final answer (200
    or another 4xx), the deadline or `attempts`. The answer (None when none came) and the
    attempts made; every answer and error counted in `answers`."""
    started, attempt = time.monotonic(), 0
    while time.monotonic() - started < deadline_s and attempt < attempts:
        attempt += 1
        try:
            reply = await http.post(path, json=body, headers=headers)
            answers[str(reply.status_code)] += 1
        except httpx.HTTPError as exc:
            answers[type(exc).__name__] += 1
        else:
            if reply.status_code == 200 or (reply.status_code < 500 and reply.status_code != 429):
                return reply, attempt
        if attempt < attempts:
            await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))  # noqa: S311 - jitter
    return None, attempt
