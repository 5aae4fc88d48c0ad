"""`make chaos`: faults injected into the real stack, and proof that nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from service import embedded, storage
from tools.stack import ROOT

API_KEY = "chaos-key"


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
    env = {**os.environ, "DATABASE_URL": url, "ADMIN_API_KEYS": API_KEY, "STRIPE_WEBHOOK_SECRETS": webhook_secret}
    env |= {
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "METRICS_PORT": "0",
        "WEBHOOK_HOST": "127.0.0.1",
        "WEBHOOK_PORT": "0",
    }
    env |= {"LOG_LEVEL": "WARNING", "SHUTDOWN_DRAIN_S": "0", "DATA_DIR": str(work)}
    return env | extra
