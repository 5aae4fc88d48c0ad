"""Creates under Stripe faults: CHAOS_CREATES invoices created through Envoy while a
fault-injecting proxy (chaos/stripe_proxy.py) drops, fails or stalls CHAOS_FAULT_RATE of
the service's Stripe calls. In three phases:

1. the first half of the orders, each caller trying once (many are cut off mid-Create);
2. the emulator forgets its idempotency keys (Stripe's 24 hours, passed at once), then
   every order is sent, each caller retrying with its Idempotency-Key until it gets its
   invoice, as a careful client does: the first half's unfinished Creates resume;
3. CHAOS_KEYLESS orders sent without a key, each as a burst of identical requests at once,
   each caller retrying without a key, as the seed's callers do.

Afterwards Stripe must hold exactly one invoice, with exactly its one item, per order and
none charged twice; the service's record of each key must name that invoice; and the
invoices table, fed by the emulator's webhooks, must agree with Stripe. Prints the
figures as JSON; exits 1 if anything is doubled, lost or disagrees."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from bench.load import percentile
from chaos import API_KEY, STRIPE_LIKE_DELIVERIES, post_retrying, prepare, stack_env
from chaos.refunds import refund_some, refunded_once, refunds_at_stripe
from chaos.storm import applications_at, applied_once
from service import payments
from tools.customers import customer_with_card
from tools.stack import (
    LOCALSTRIPE_KEY,
    backend,
    free_port,
    register_webhook,
    start_localstripe,
    start_python,
    wait_until_routed,
)

SECRET = "whsec_chaos_creates"  # noqa: S105 - a local run's own secret
CUSTOMERS = 8
# A Create's calls time out after this; the proxy's stalls last longer. One SDK retry
# per call, so that a good share of the faults reaches the service and its callers.
STRIPE_TIMEOUT_S = 1.0
STRIPE_MAX_RETRIES = 1
# How long the proxy's stalls hold a call: past the SDK's timeout, so the caller gives up.
STALL_S = STRIPE_TIMEOUT_S * 2
# Identical keyless requests sent at once for one order (a caller's retries racing).
KEYLESS_BURST = 5


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    attempts: Counter[int] = field(default_factory=Counter)
    invoice_of: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    replays: int = 0
    replays_sent: int = 0
    replays_with_other_invoice: int = 0
    cut_off_then_resumed: int = 0


def expected_amount(n: int) -> int:
    return 100 + n % 900


async def create(
    http: httpx.AsyncClient,
    key: str | None,
    body: dict[str, Any],
    tally: Tally,
    deadline_s: float = 300,
    attempts: int = 1000,
    order: str = "",
) -> None:
    """One caller (chaos.post_retrying), always with the same key or always without one."""
    headers = {"Idempotency-Key": key} if key else {}
    order = order or str(key)
    started = time.monotonic()
    reply, attempt = await post_retrying(
        http, "/admin/api/invoices", body, headers, tally.answers, deadline_s=deadline_s, attempts=attempts
    )
    if reply is None:
        tally.failed[order] = "gave up after the deadline" if attempt < attempts else f"gave up after {attempt}"
    elif reply.status_code == 200:
        tally.invoice_of[order] = str(reply.json()["id"])
        tally.attempts[attempt] += 1
        tally.seconds.append(time.monotonic() - started)
    else:
        tally.failed[order] = f"{reply.status_code} {reply.text[:300]}"


def order_body(customers: list[tuple[str, str]], kind: str, n: int) -> dict[str, Any]:
    customer, method = customers[n % len(customers)]
    return {
        "items": [{"name": f"chaos {kind} {n}", "amount": expected_amount(n)}],
        "customer": customer,
        "paymentMethod": method,
    }


def forget_idempotency_keys(direct: str) -> None:
    """Stripe's 24 hours, passed at once: the emulator forgets every key it kept."""
    url = f"{direct}/_config/idempotency/forget"
    request = urllib.request.Request(url, data=b"", method="POST")  # noqa: S310 - the local emulator
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - the local emulator
        pass


async def create_all(
    base_url: str, direct: str, customers: list[tuple[str, str]], creates: int, keyless: int, run: str
) -> tuple[Tally, Tally]:
    tally, replayed, cut_off, bursts = Tally(), Tally(), Tally(), Tally()
    gate = asyncio.Semaphore(16)

    async def one(n: int, tally: Tally = tally, attempts: int = 1000) -> None:
        async with gate:
            await create(http, f"{run}-{n}", order_body(customers, "item", n), tally, attempts=attempts)

    async def burst(n: int) -> None:
        async with gate:
            body = order_body(customers, "keyless", n)
            await asyncio.gather(
                *(create(http, None, body, bursts, order=f"keyless-{n}-{i}") for i in range(KEYLESS_BURST))
            )

    timeout = httpx.Timeout(30)
    async with httpx.AsyncClient(base_url=base_url, headers={"Api-Key": API_KEY}, timeout=timeout) as http:
        await asyncio.gather(*(one(n, cut_off, attempts=1) for n in range(creates // 2)))
        tally.cut_off_then_resumed = len(cut_off.failed)
        # A stalled call the proxy still holds would reach the emulator after it forgot its
        # keys: a request held back for a day, which no network does. Let them land first.
        await asyncio.sleep(STALL_S + 1)
        await asyncio.to_thread(forget_idempotency_keys, direct)
        await asyncio.gather(*(one(n) for n in range(creates)))
        await asyncio.gather(*(burst(n) for n in range(keyless)))
        # A replay after success answers the same invoice without touching Stripe.
        replays = range(0, creates, max(1, creates // 10))
        await asyncio.gather(*(one(n, replayed) for n in replays))
    tally.replays = len(replayed.invoice_of)
    tally.replays_sent = len(replays)
    tally.failed |= {f"replay {k}": v for k, v in replayed.failed.items()}
    tally.replays_with_other_invoice = sum(1 for k, i in replayed.invoice_of.items() if tally.invoice_of.get(k) != i)
    return tally, bursts


async def stripe_invoices(direct: str) -> list[dict[str, Any]]:
    client = payments.client(LOCALSTRIPE_KEY, api_base=direct, timeout_s=30, max_retries=0)
    page = await client.v1.invoices.list_async({"limit": 100})
    return [invoice.to_dict(for_json=True) async for invoice in page.auto_paging_iter()]


async def database_state(url: str) -> tuple[dict[str, str | None], dict[str, tuple[str, int]]]:
    conn = await asyncpg.connect(url)
    try:
        keys = {r["idempotency_key"]: r["stripe_invoice_id"] for r in await conn.fetch("SELECT * FROM create_requests")}
        rows = {
            r["stripe_invoice_id"]: (r["status"], r["amount"])
            for r in await conn.fetch("SELECT stripe_invoice_id, status, amount FROM invoices")
        }
    finally:
        await conn.close()
    return keys, rows


def invoices_by_order(invoices: list[dict[str, Any]], run: str) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Stripe's invoices by the order their one item names (`order_body`'s description): keyed
    orders are `{run}-{n}`, keyless ones `keyless-{n}`; and how many name no one order."""
    by_order: dict[str, list[dict[str, Any]]] = {}
    orphans = 0
    for invoice in invoices:
        lines = invoice.get("lines", {}).get("data", [])
        names = {line.get("description", "") for line in lines}
        if len(names) != 1:
            orphans += 1  # a draft without its item, or an invoice with mixed items
            continue
        _, kind, n = next(iter(names)).split(" ")
        by_order.setdefault(f"{run}-{n}" if kind == "item" else f"keyless-{n}", []).append(invoice)
    return by_order, orphans


def charged_twice(by_order: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The orders more than one of whose Stripe invoices was paid."""
    return [k for k, found in by_order.items() if sum(1 for i in found if i.get("amount_paid")) > 1]


def most_invoices_per_order(by_order: dict[str, list[dict[str, Any]]]) -> int:
    return max((len(found) for found in by_order.values()), default=0)


def without_their_one_item(by_order: dict[str, list[dict[str, Any]]], expected: dict[str, int]) -> list[str]:
    """The orders whose invoice does not hold exactly its one item at its amount (lines
    added twice by a resumed Create would show here, not in the count of invoices)."""
    return [
        k
        for k, found in by_order.items()
        if len(found[0]["lines"]["data"]) != 1 or found[0]["total"] != expected.get(k)
    ]


def verify(
    invoices: list[dict[str, Any]],
    keys: dict[str, str | None],
    rows: dict[str, tuple[str, int]],
    tallies: tuple[Tally, Tally],
    run: str,
    counts: tuple[int, int],
) -> dict[str, Any]:
    """The figures, per order: keyed orders are `{run}-{n}`, keyless ones `keyless-{n}`."""
    tally, bursts = tallies
    creates, keyless = counts
    by_order, orphans = invoices_by_order(invoices, run)
    expected = {f"{run}-{n}": expected_amount(n) for n in range(creates)}
    expected |= {f"keyless-{n}": expected_amount(n) for n in range(keyless)}
    doubled = [k for k, found in by_order.items() if len(found) > 1]
    paid_twice = charged_twice(by_order)
    missing = [k for k in expected if k not in by_order]
    wrong_items = without_their_one_item(by_order, expected)
    stripe_id = {k: found[0]["id"] for k, found in by_order.items()}
    stripe_status = {inv["id"]: (inv["status"], inv["total"]) for inv in invoices}
    answered_other = [k for k, i in tally.invoice_of.items() if stripe_id.get(k) != i]
    answered_other += [k for k, i in bursts.invoice_of.items() if stripe_id.get(k.rsplit("-", 1)[0]) != i]
    recorded_other = [k for k in expected if k.startswith(run) and keys.get(k) != stripe_id.get(k)]
    disagree = [i for i, state in stripe_status.items() if rows.get(i) != state]
    figures = {
        "stripe_invoices": len(invoices),
        "orders": len(expected),
        "stripe_invoices_per_order_max": most_invoices_per_order(by_order),
        "orders_charged_twice": len(paid_twice),
        "keys_with_one_invoice": sum(1 for k, found in by_order.items() if len(found) == 1 and k.startswith(run)),
        "keys_with_several_invoices": len([k for k in doubled if k.startswith(run)]),
        "keyless_orders_with_one_invoice": sum(1 for k, f in by_order.items() if len(f) == 1 and k[:8] == "keyless-"),
        "keyless_orders_with_several_invoices": len([k for k in doubled if k.startswith("keyless-")]),
        "keys_without_invoice": len(missing),
        "invoices_without_their_one_item": orphans + len(wrong_items),
        "answers_naming_another_invoice": len(answered_other),
        "create_records_naming_another_invoice": len(recorded_other),
        "rows": len(rows),
        "rows_disagreeing_with_stripe": len(disagree),
        "stripe_statuses": dict(Counter(s for s, _ in stripe_status.values())),
    }
    figures["ok"] = (
        len(invoices) == len(expected)
        and not (doubled or paid_twice or missing or orphans or wrong_items)
        and not (answered_other or recorded_other or disagree)
        and len(rows) == len(expected)
        and not tally.failed
        and not bursts.failed
        and tally.replays_with_other_invoice == 0
        and tally.replays == tally.replays_sent > 0
        and tally.answers["500"] == 0
        and bursts.answers["500"] == 0
    )
    return figures


async def settle(url: str, direct: str, within_s: float = 120) -> tuple[list[dict[str, Any]], Any, Any]:
    """Stripe's state and the database's, once the webhooks in flight have landed."""
    deadline = time.monotonic() + within_s
    while True:
        invoices = await stripe_invoices(direct)
        keys, rows = await database_state(url)
        agree = all(rows.get(inv["id"]) == (inv["status"], inv["total"]) for inv in invoices)
        if agree or time.monotonic() > deadline:
            return invoices, keys, rows
        await asyncio.sleep(1)


async def customers_of(direct: str) -> list[tuple[str, str]]:
    client = payments.client(LOCALSTRIPE_KEY, api_base=direct, timeout_s=30, max_retries=0)
    return [await customer_with_card(client) for _ in range(CUSTOMERS)]


def _charged(order: str) -> int:
    """What a keyed order charged (its number is its key's last part)."""
    return expected_amount(int(order.rsplit("-", 1)[1]))


def main() -> None:
    creates = int(os.environ.get("CHAOS_CREATES", "1000"))
    keyless = int(os.environ.get("CHAOS_KEYLESS", str(creates // 10)))
    fault_rate = float(os.environ.get("CHAOS_FAULT_RATE", "0.3"))
    work, url = prepare("chaos-creates")
    run = f"chaos-{uuid.uuid4().hex[:8]}"
    stripe_port = free_port()
    with (work / "stack.log").open("w") as log:
        disorder = STRIPE_LIKE_DELIVERIES
        emulator = start_localstripe(stripe_port, fresh=True, log=log, webhook_retry_s=300, disorder=disorder)
        direct = f"http://127.0.0.1:{stripe_port}"
        proxy_args = ["--upstream", direct, "--fault-rate", str(fault_rate), "--stall-s", str(STALL_S)]
        argv = ["-m", "chaos.stripe_proxy", *proxy_args]
        proxy, proxy_ports = start_python("stripe-proxy", argv, dict(os.environ), log=log)
        proxy_port = proxy_ports["http"]
        env = stack_env(
            url,
            work,
            SECRET,
            STRIPE_API_KEY=LOCALSTRIPE_KEY,
            STRIPE_API_BASE=f"http://127.0.0.1:{proxy_port}",
            STRIPE_TIMEOUT_S=str(STRIPE_TIMEOUT_S),
            STRIPE_MAX_RETRIES=str(STRIPE_MAX_RETRIES),
        )
        try:
            with backend(env, work, log=log) as running:
                base = f"http://127.0.0.1:{running.gateway_port}"
                wait_until_routed(base, API_KEY)
                register_webhook(stripe_port, f"{base}/webhooks/stripe", SECRET)
                customers = asyncio.run(customers_of(direct))
                started = time.monotonic()
                tally, bursts = asyncio.run(create_all(base, direct, customers, creates, keyless, run))
                elapsed = time.monotonic() - started
                refunds = asyncio.run(refund_some(base, tally.invoice_of, run, _charged))
                with urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/_proxy/stats", timeout=5) as reply:
                    faults = json.load(reply)
                invoices, keys, rows = asyncio.run(settle(url, direct))
                at_stripe = asyncio.run(refunds_at_stripe(direct, refunds["asked"]))
        finally:
            proxy.stop()
            emulator.stop()
    figures: dict[str, Any] = {
        "creates": creates,
        "keyless_orders": keyless,
        "keyless_burst": KEYLESS_BURST,
        "cut_off_before_stripe_forgot_its_keys": tally.cut_off_then_resumed,
        "fault_rate": fault_rate,
        "stripe_calls_by_fault": faults,
        "answers": dict(tally.answers),
        "keyless_answers": dict(bursts.answers),
        "attempts_per_create": {str(k): v for k, v in sorted(tally.attempts.items())},
        "create_seconds_p50": round(percentile(tally.seconds, 0.5), 3),
        "create_seconds_p99": round(percentile(tally.seconds, 0.99), 3),
        "elapsed_s": round(elapsed, 1),
        "failed": dict(list(tally.failed.items())[:5]),
        "replays_after_success": tally.replays,
        "replays_naming_another_invoice": tally.replays_with_other_invoice,
    }
    figures |= verify(invoices, keys, rows, (tally, bursts), run, (creates, keyless))
    figures |= at_stripe
    figures |= {"refunds_answered": refunds["answered"], "refund_answers": refunds["answers"]}
    figures["ok"] = figures["ok"] and refunded_once(figures)
    # The emulator's webhooks, each applied once by the count its applying transaction kept.
    figures |= (counted := asyncio.run(applications_at(url)))
    figures["ok"] = figures["ok"] and applied_once(counted)
    print(json.dumps(figures))
    if not figures["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
