"""Refunds under Stripe faults, for the Creates scenario (chaos/creates.py): every
REFUND_EVERY-th paid order refunded in part through the same faulty proxy (errors, drops and
stalls before and after Stripe ran the call), each caller retrying with its key until it is
answered, and then, at Stripe: each order's credit notes are at most the one its key asked,
for the amount asked, and no order is refunded twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from chaos import API_KEY, post_retrying
from tools.stack import LOCALSTRIPE_KEY

REFUND_EVERY = 5
DEADLINE_S = 300.0


async def _refund(http: httpx.AsyncClient, invoice_id: str, key: str, amount: int, answers: Counter[str]) -> bool:
    """One caller, retrying as a Create's does, with its key (chaos.post_retrying)."""
    path, headers = f"/admin/api/invoices/{invoice_id}:refund", {"Idempotency-Key": key}
    reply, _ = await post_retrying(http, path, {"amount": amount}, headers, answers, deadline_s=DEADLINE_S)
    return reply is not None and reply.status_code == 200


async def refund_some(
    base_url: str, invoice_of: dict[str, str], run: str, charged: Callable[[str], int]
) -> dict[str, Any]:
    """Refunds half of what every REFUND_EVERY-th keyed order the Creates answered was
    `charged`; what was asked, by invoice."""
    orders = sorted(o for o in invoice_of if o.startswith(f"{run}-"))[::REFUND_EVERY]
    asked = {invoice_of[o]: charged(o) // 2 for o in orders}
    answers: Counter[str] = Counter()
    gate = asyncio.Semaphore(16)

    async def one(order: str) -> bool:
        async with gate:
            invoice = invoice_of[order]
            return await _refund(http, invoice, f"{order}-refund", asked[invoice], answers)

    async with httpx.AsyncClient(base_url=base_url, headers={"Api-Key": API_KEY}, timeout=30) as http:
        done = await asyncio.gather(*(one(o) for o in orders))
    return {"asked": asked, "answered": sum(done), "answers": dict(answers)}


async def refunds_at_stripe(direct: str, asked: dict[str, int]) -> dict[str, Any]:
    """Every credit note the emulator holds, against what was asked."""
    notes: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    async with httpx.AsyncClient(base_url=direct, timeout=30) as http:
        while True:
            reply = await http.get(
                "/v1/credit_notes", params=params, headers={"Authorization": f"Bearer {LOCALSTRIPE_KEY}"}
            )
            page = reply.json()
            notes += page["data"]
            if not page["has_more"] or not page["data"]:
                break
            params = {"limit": 100, "starting_after": page["data"][-1]["id"]}
    per_invoice = Counter(str(n["invoice"]) for n in notes)
    refunded: Counter[str] = Counter()
    for note in notes:
        refunded[str(note["invoice"])] += sum(r["amount_refunded"] for r in note.get("refunds") or [])
    return {
        "refunds_asked": len(asked),
        "credit_notes": len(notes),
        "credit_notes_per_refund_max": max(per_invoice.values(), default=0),
        "orders_refunded_twice": sum(1 for n in per_invoice.values() if n > 1),
        "refunds_not_as_asked": sum(1 for i, amount in asked.items() if refunded.get(i) != amount),
        "credit_notes_not_asked": sum(1 for i in per_invoice if i not in asked),
    }


def refunded_once(figures: dict[str, Any]) -> bool:
    """Every refund asked answered, and at Stripe as asked: one note each, nothing else."""
    return bool(
        figures["refunds_answered"] == figures["refunds_asked"] > 0
        and figures["credit_notes_per_refund_max"] == 1
        and figures["orders_refunded_twice"] == figures["refunds_not_as_asked"] == 0
        and figures["credit_notes_not_asked"] == 0
    )
