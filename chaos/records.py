"""What the failover scenario checks once its load has stopped, beside the storm's own
figures (chaos/storm.py): each order against Stripe's invoices and the audit trail; the
service's records of its Creates against the emulator's invoices, field by field, once
Stripe's events have completed them; and each watcher's changes against the change feed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import asyncpg

from chaos.creates import (
    Tally,
    charged_twice,
    database_state,
    expected_amount,
    invoices_by_order,
    most_invoices_per_order,
    stripe_invoices,
    without_their_one_item,
)
from chaos.load import Seen
from service.stripe_objects import invoice_from_stripe

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


async def _audit_counts(url: str) -> tuple[Counter[str], int]:
    """Per idempotency key, its Creates' `ok` audit rows; and how many (key, attempt) pairs
    have more than one row."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_key, attempt, count(*) AS n, count(*) FILTER (WHERE outcome = 'ok') AS ok"
            " FROM invoice_audit WHERE action = 'create' GROUP BY idempotency_key, attempt"
        )
    finally:
        await conn.close()
    ok: Counter[str] = Counter()
    for row in rows:
        ok[row["idempotency_key"]] += row["ok"]
    return ok, sum(1 for row in rows if row["n"] > 1)


async def orders(url: str, direct: str, tally: Tally, run: str, allowed: set[str]) -> dict[str, Any]:
    """Each order against Stripe and the database: one invoice with its one item, none
    charged twice, answers and key records naming it, one `ok` audit entry per answered
    Create; `allowed` the answers a Create may get besides 200."""
    invoices = await stripe_invoices(direct)
    keys, _ = await database_state(url)
    by_order, orphans = invoices_by_order(invoices, run)
    answered = tally.invoice_of
    stripe_id = {order: found[0]["id"] for order, found in by_order.items()}
    expected = {order: expected_amount(int(order.rsplit("-", 1)[1])) for order in [*answered, *tally.failed]}
    audited_ok, audit_doubled = await _audit_counts(url)
    figures = {
        "orders": len(answered) + len(tally.failed),
        "orders_answered": len(answered),
        "stripe_invoices": len(invoices),
        "stripe_invoices_per_order_max": most_invoices_per_order(by_order),
        "orders_charged_twice": len(charged_twice(by_order)),
        "invoices_without_one_order": orphans,
        "answers_naming_another_invoice": sum(1 for k, i in answered.items() if stripe_id.get(k) != i),
        "create_records_naming_another_invoice": sum(1 for k, i in answered.items() if keys.get(k) != i),
        "invoices_without_their_one_item": len(without_their_one_item(by_order, expected)),
        # Each answered order's Create has exactly one `ok` entry in the audit trail, and no
        # attempt has two.
        "orders_without_one_ok_audit_entry": sum(1 for k in answered if audited_ok[k] != 1),
        "audit_attempts_written_twice": audit_doubled,
        # What the Create callers got besides their invoice and "retry later" (a transport error).
        "create_answers_not_allowed": sorted(set(tally.answers) - {"200", *allowed}),
    }
    figures["orders_ok"] = (
        not tally.failed
        and len(invoices) == len(answered) == len(by_order)
        and figures["stripe_invoices_per_order_max"] == 1
        and not (figures["orders_charged_twice"] or orphans)
        and not (figures["answers_naming_another_invoice"] or figures["create_records_naming_another_invoice"])
        and not (figures["invoices_without_their_one_item"] or figures["create_answers_not_allowed"])
        and not (figures["orders_without_one_ok_audit_entry"] or figures["audit_attempts_written_twice"])
    )
    return figures


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
