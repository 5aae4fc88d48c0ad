"""The webhook storm: CHAOS_INVOICES invoices' events (seven each, three different endings),
30% of them delivered twice, shuffled, sent concurrently through Envoy by a sender that
retries every non-2xx with backoff as Stripe does. Halfway through, Postgres is stopped
for CHAOS_PG_DOWN_S seconds and started again. Afterwards every invoice must be in the
state (and amount) of its newest event, every event recorded, and every event's effect
applied exactly once. Prints the figures as JSON; exits 1 if anything is lost, doubled
or wrong.

Doubling is counted by the apply itself: the transaction that applies an event's effect adds
one to the event's `applications` (migration 0009), and a redelivery recognised as applied
adds nothing. So an event applied twice shows as 2 in the database, whatever its deliveries
were answered (a row per event id cannot show it: the primary key keeps one). The sidecar's
own count of deliveries answered with an effect (its webhook metrics) is kept beside it:
the applications whose answer got lost with Postgres are the difference."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from bench.webhook_load import lifecycle, unique_events
from chaos import API_KEY, prepare, stack_env
from service import embedded
from service.domain import Outcome
from service.metrics import WEBHOOK_OUTCOMES
from tools.stack import ROOT, backend, wait_until_routed

SECRET = "whsec_chaos"  # noqa: S105 - a local test's own secret
# The ids bench.webhook_load gives the storm's invoices (its seed is 1).
STORM_PREFIX = "in_bench01"


async def events_recorded(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM stripe_events"))
    finally:
        await conn.close()


# The outcomes of a delivery that acted on its event (recorded it and applied it to the
# invoice); a `duplicate` found the event recorded before and changed nothing.
ACTED = frozenset(WEBHOOK_OUTCOMES.values()) - {WEBHOOK_OUTCOMES[Outcome.DUPLICATE]}


def event_applications(webhook_port: int) -> int:
    """How many deliveries the sidecar answered with an effect (its metrics, by outcome)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{webhook_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "invoice_webhook_events"
            for sample in family.samples
            if sample.name == "invoice_webhook_events_total" and sample.labels.get("outcome") in ACTED
        )
    )


# Per event, as its applying transactions counted it. NULL: recorded by a replica from before
# migration 0009, which does not count (none in these runs: the figure must be 0).
_APPLICATIONS = """
    SELECT count(*) AS events, coalesce(sum(applications), 0)::bigint AS applications,
        count(*) FILTER (WHERE applications > 1) AS doubled, coalesce(max(applications), 0) AS most,
        count(*) FILTER (WHERE applications IS NULL) AS uncounted
    FROM stripe_events WHERE id LIKE $1"""


async def applications_counted(conn: asyncpg.Connection, events_like: str = "%") -> dict[str, int]:
    """The events (ids LIKE `events_like`) applied more than once, from the count each
    applying transaction kept: the one reader of it for the storm, the failovers, the
    Creates and the benchmark."""
    (row,) = await conn.fetch(_APPLICATIONS, events_like)  # an aggregate: always one row
    return {
        "events_recorded": row["events"],
        "event_applications": row["applications"],
        "events_doubled": row["doubled"],
        "event_applications_max": row["most"],
        "events_uncounted": row["uncounted"],
    }


def applied_once(counted: dict[str, int]) -> bool:
    """Every event recorded was applied exactly once, by its own count."""
    doubled_or_uncounted = counted["events_doubled"] or counted["events_uncounted"]
    return not doubled_or_uncounted and counted["event_applications"] == counted["events_recorded"]


async def applications_at(url: str, events_like: str = "%") -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return await applications_counted(conn, events_like)
    finally:
        await conn.close()


async def verify(url: str, invoices: int, answered: int) -> dict[str, Any]:
    """The storm's figures, from the database; `answered` is the sidecar's count of
    deliveries answered with an effect."""
    conn = await asyncpg.connect(url)
    try:
        counted = await applications_counted(conn)
        recorded = counted["events_recorded"]
        created = {
            r["stripe_invoice_id"]: r["n"]
            for r in await conn.fetch(
                "SELECT stripe_invoice_id, count(*) FILTER (WHERE outcome = $1) AS n FROM stripe_events"
                " GROUP BY stripe_invoice_id",
                Outcome.CREATED.value,
            )
        }
        # The storm's invoices (another scenario may create some of its own alongside).
        rows = {
            r["stripe_invoice_id"]: (r["status"], r["amount"])
            for r in await conn.fetch(
                "SELECT stripe_invoice_id, status, amount FROM invoices WHERE stripe_invoice_id LIKE $1",
                f"{STORM_PREFIX}%",
            )
        }
        all_rows = await conn.fetchval("SELECT count(*) FROM invoices")
        in_counters = await conn.fetchval("SELECT coalesce(sum(n), 0)::bigint FROM invoice_counts")
    finally:
        await conn.close()
    expected = {f"{STORM_PREFIX}{n:07d}": lifecycle("long", n)[-1][1:] for n in range(invoices)}
    wrong = {k: (rows.get(k), v) for k, v in expected.items() if rows.get(k) != v}
    not_created_once = [k for k in expected if created.get(k, 0) != 1]
    unique = unique_events(invoices, "long")
    figures = {
        "events_expected": unique,
        **counted,
        "event_applications_answered": answered,
        # Applied, but answered otherwise (the commit's answer lost with Postgres, retried and
        # then found `duplicate`). Below 0, the sidecar would have claimed an effect it never
        # committed.
        "events_applied_unanswered": counted["event_applications"] - answered,
        "invoices_not_created_once": len(not_created_once),
        "invoice_rows": len(rows),
        "invoices_in_wrong_state": len(wrong),
        "count_matches_rows": in_counters == all_rows,
    }
    figures["ok"] = (
        recorded == unique
        and applied_once(counted)
        and figures["events_applied_unanswered"] >= 0
        and not not_created_once
        and not wrong
        and len(rows) == invoices
        and in_counters == all_rows
    )
    return figures


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
        unique = unique_events(invoices, "long")
        while asyncio.run(events_recorded(url)) < unique // 2 and sender.poll() is None:
            time.sleep(0.2)
        halfway = asyncio.run(events_recorded(url))
        embedded.stop(pg_dir)
        time.sleep(down_s)
        embedded.restart(pg_dir)
        out, _ = sender.communicate(timeout=600)
        figures = json.loads(out.strip().splitlines()[-1])
        figures |= {"postgres_stopped_at_events": halfway, "postgres_down_s": down_s}
        figures |= asyncio.run(verify(url, invoices, event_applications(running.webhook_port)))
    print(json.dumps(figures))
    if not figures["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
