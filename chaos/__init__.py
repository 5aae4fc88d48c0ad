"""`make chaos`: faults injected into the real stack, and proof that nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

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
