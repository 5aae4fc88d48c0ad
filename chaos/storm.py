"""The webhook storm: CHAOS_INVOICES invoices' events (seven each, three different endings),
30% of them delivered twice, shuffled, sent concurrently through Envoy by a sender that
retries every non-2xx with backoff as Stripe does. Halfway through, Postgres is stopped
for CHAOS_PG_DOWN_S seconds and started again. Afterwards every invoice must be in the
state of its newest event and every event recorded exactly once. Prints the figures as
JSON; exits 1 if anything is lost, doubled or wrong."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import asyncpg

from bench.webhook_load import lifecycle
from chaos import API_KEY, prepare, stack_env
from service import embedded
from tools.stack import ROOT, backend, wait_until_routed

SECRET = "whsec_chaos"  # noqa: S105 - a local test's own secret


async def _recorded(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM stripe_events"))
    finally:
        await conn.close()


async def _verify(url: str, invoices: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        events = await conn.fetch("SELECT id, count(*) OVER (PARTITION BY id) AS copies FROM stripe_events")
        rows = {
            r["stripe_invoice_id"]: r["status"]
            for r in await conn.fetch("SELECT stripe_invoice_id, status FROM invoices")
        }
        counted = await conn.fetchval("SELECT coalesce(sum(n), 0)::bigint FROM invoice_counts")
    finally:
        await conn.close()
    expected = {f"in_bench01{n:07d}": lifecycle("long", n)[-1][1] for n in range(invoices)}
    wrong = {k: (rows.get(k), v) for k, v in expected.items() if rows.get(k) != v}
    unique = sum(len(lifecycle("long", n)) for n in range(invoices))
    return {
        "events_recorded": len(events),
        "events_expected": unique,
        "events_doubled": sum(1 for e in events if e["copies"] > 1),
        "invoice_rows": len(rows),
        "invoices_in_wrong_state": len(wrong),
        "count_matches_rows": counted == len(rows),
        "ok": len(events) == unique and not wrong and len(rows) == invoices and counted == len(rows),
    }


def main() -> None:
    invoices = int(os.environ.get("CHAOS_INVOICES", "1000"))
    down_s = float(os.environ.get("CHAOS_PG_DOWN_S", "5"))
    work, url = prepare("chaos")
    pg_dir = work / "pg"
    env = stack_env(url, work, SECRET, DB_COMMAND_TIMEOUT_S="2")
    with (work / "stack.log").open("w") as log, backend(env, work, log=log) as running:
        wait_until_routed(f"http://127.0.0.1:{running.gateway_port}", API_KEY)
        url_arg = f"http://127.0.0.1:{running.gateway_port}/webhooks/stripe"
        options = ["--secret", SECRET, "--invoices", str(invoices), "--lifecycle", "long", "--concurrency", "16"]
        sender = subprocess.Popen(
            [sys.executable, "-m", "bench.webhook_load", "--url", url_arg, *options],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        unique = sum(len(lifecycle("long", n)) for n in range(invoices))
        while asyncio.run(_recorded(url)) < unique // 2 and sender.poll() is None:
            time.sleep(0.2)
        halfway = asyncio.run(_recorded(url))
        embedded.stop(pg_dir)
        time.sleep(down_s)
        embedded.restart(pg_dir)
        out, _ = sender.communicate(timeout=600)
        figures = json.loads(out.strip().splitlines()[-1])
        figures |= {"postgres_stopped_at_events": halfway, "postgres_down_s": down_s}
        figures |= asyncio.run(_verify(url, invoices))
    print(json.dumps(figures))
    if not figures["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
