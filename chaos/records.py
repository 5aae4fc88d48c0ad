"""What the failover scenario checks once its load has stopped, beside the storm's own
figures (chaos/storm.py): the service's records of its Creates against the emulator's
invoices, field by field, once Stripe's events have completed them; and each watcher's
changes against the change feed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import asyncpg

from chaos.creates import stripe_invoices
from chaos.load import Seen
from service.payments import invoice_from_stripe

# Each field of a record as Stripe's invoice gives it (the service's own reading of an
# invoice object), and the record's column that must hold it.
FIELDS = {
    "status": "status",
    "amount": "amount",
    "invoice_pdf": "invoice_pdf",
    "user_id": "user_id",
    "user_name": "user_name",
    "currency": "currency",
}


def _expected(invoice: dict[str, Any]) -> dict[str, Any]:
    read = invoice_from_stripe(invoice)
    values = {"status": read.status, "amount": read.amount, "invoice_pdf": read.invoice_pdf}
    return values | {"user_id": read.user.id, "user_name": read.user.name, "currency": read.currency}


async def _records(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        columns = ", ".join(FIELDS.values())  # FIELDS' own names
        query = f"SELECT stripe_invoice_id, {columns} FROM invoices WHERE stripe_invoice_id = ANY($1)"  # noqa: S608
        rows = await conn.fetch(query, ids)
    finally:
        await conn.close()
    return {r["stripe_invoice_id"]: dict(r) for r in rows}


def _disagreements(invoices: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> Counter[str]:
    wrong: Counter[str] = Counter()
    for invoice in invoices:
        record = records.get(invoice["id"])
        if record is None:
            wrong["no record"] += 1
            continue
        for field, value in _expected(invoice).items():
            if record[FIELDS[field]] != value:
                wrong[field] += 1
    return wrong


async def records_against_stripe(url: str, direct: str, within_s: float = 120) -> dict[str, Any]:
    """Every Stripe invoice's record, field by field, once the emulator's events in flight
    have landed (polled until they agree, or `within_s`): which fields disagree, how often."""
    deadline = time.monotonic() + within_s
    while True:
        invoices = await stripe_invoices(direct)
        wrong = _disagreements(invoices, await _records(url, [i["id"] for i in invoices]))
        if not wrong or time.monotonic() > deadline:
            return {"records_compared": len(invoices), "record_fields_disagreeing_with_stripe": dict(wrong)}
        await asyncio.sleep(1)


async def feed(url: str) -> list[Seen]:
    """The change feed, in its order: what each watcher must have seen."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT kind, stripe_invoice_id, status FROM invoice_changes ORDER BY xact, seq")
    finally:
        await conn.close()
    return [(r["kind"], r["stripe_invoice_id"], r["status"]) for r in rows]


def watched(expected: list[Seen], watchers: list[list[Seen]]) -> dict[str, Any]:
    """Per watcher, the feed's changes it never got and those it got twice."""
    missed = [sum((Counter(expected) - Counter(seen)).values()) for seen in watchers]
    twice = [sum((Counter(seen) - Counter(expected)).values()) for seen in watchers]
    return {
        "changes": len(expected),
        "changes_seen_per_watcher": [len(seen) for seen in watchers],
        "watchers_that_missed_a_change": sum(1 for n in missed if n),
        "changes_missed": sum(missed),
        "changes_seen_twice": sum(twice),
    }
