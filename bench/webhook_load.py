"""Sends signed Stripe invoice events to a webhook URL the way Stripe does: concurrently,
shuffled, with a share of duplicates, retrying any non-2xx with backoff. Prints one JSON
line: deliveries, retries, throughput and latency. With `--seconds` the deliveries are spread
over that long, so that a chaos scenario can strike a storm that is sure to be still running
however fast the machine answers."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.load import run_processes, summary
from tools.signing import sign

Step = tuple[str, str, int]
SHORT: list[list[Step]] = [
    [("invoice.created", "draft", 0), ("invoice.finalized", "open", 4200), ("invoice.paid", "paid", 4200)]
]
# Seven events per invoice, three endings; the last event of each says the final state.
LONG: list[list[Step]] = [
    [
        ("invoice.created", "draft", 0),
        ("invoice.updated", "draft", 4200),
        ("invoice.finalized", "open", 4200),
        ("invoice.updated", "open", 4200),
        ("invoice.payment_failed", "open", 4200),
        ("invoice.updated", "open", 4200),
        ("invoice.paid", "paid", 4200),
    ],
    [
        ("invoice.created", "draft", 0),
        ("invoice.updated", "draft", 4200),
        ("invoice.finalized", "open", 4200),
        ("invoice.payment_failed", "open", 4200),
        ("invoice.updated", "open", 4200),
        ("invoice.marked_uncollectible", "uncollectible", 4200),
        ("invoice.voided", "void", 4200),
    ],
    [
        ("invoice.created", "draft", 0),
        ("invoice.finalized", "open", 4200),
        ("invoice.updated", "open", 4200),
        ("invoice.payment_failed", "open", 4200),
        ("invoice.marked_uncollectible", "uncollectible", 4200),
        ("invoice.updated", "uncollectible", 4200),
        ("invoice.paid", "paid", 4200),
    ],
]
LIFECYCLES = {"short": SHORT, "long": LONG}
# An attempt answered later than this is listed with --failure-times (the longest wait in a fault).
SLOW_S = 0.5


def lifecycle(kind: str, n: int) -> list[Step]:
    variants = LIFECYCLES[kind]
    return variants[n % len(variants)]


def unique_events(invoices: int, kind: str = "short") -> int:
    """How many distinct events the storm of `invoices` invoices holds."""
    return sum(len(lifecycle(kind, n)) for n in range(invoices))


def events(invoices: int, duplicates: float, seed: int, kind: str = "short") -> list[str]:
    """Every lifecycle event of `invoices` invoices, plus `duplicates` of them again, shuffled."""
    rng = random.Random(seed)  # noqa: S311 - load shape, not secrets
    now = int(time.time())
    unique = []
    for n in range(invoices):
        for step, (kind_, status, total) in enumerate(lifecycle(kind, n)):
            obj: dict[str, Any] = {"id": f"in_bench{seed:02d}{n:07d}", "object": "invoice"}
            obj |= {"customer": f"cus_bench{n % 977}"}
            obj |= {"status": status, "total": total, "invoice_pdf": None, "metadata": {}, "customer_name": "Bench"}
            body = {
                "id": f"evt_bench{seed:02d}{n:07d}{step}",
                "type": kind_,
                "created": now + step,
                "data": {"object": obj},
            }
            unique.append(json.dumps(body))
    sent = unique + rng.sample(unique, int(len(unique) * duplicates / (1 - duplicates)))
    rng.shuffle(sent)
    return sent


async def _send(url: str, secret: str, payloads: list[str], concurrency: int, seconds: float, out: Any) -> None:
    """Delivers every payload, retrying non-2xx answers with capped exponential backoff
    until it is accepted or two minutes have passed for it, as Stripe retries. The n-th
    payload's first attempt starts no sooner than n * seconds / len(payloads) in."""
    latencies: list[float] = []
    retries = 0
    answers: Counter[str] = Counter()
    failed_at: list[tuple[float, str]] = []  # wall-clock time and answer of every failed delivery
    # Wall-clock time and seconds of every attempt that waited over SLOW_S for its answer.
    slow_at: list[tuple[float, float]] = []
    queue = list(reversed(payloads))
    begun = time.monotonic()
    interval = seconds / max(1, len(payloads))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal retries
        while queue:
            due = begun + (len(payloads) - len(queue)) * interval
            payload = queue.pop()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            give_up = time.monotonic() + 120
            attempt = 0
            while time.monotonic() < give_up:
                start = time.perf_counter()
                headers = {"Stripe-Signature": sign(payload, secret), "Content-Type": "application/json"}
                try:
                    async with session.post(url, data=payload.encode(), headers=headers) as reply:
                        await reply.read()
                        answer, ok = str(reply.status), 200 <= reply.status < 300
                except aiohttp.ClientError as exc:
                    answer, ok = type(exc).__name__, False
                answers[answer] += 1
                if (waited := time.perf_counter() - start) > SLOW_S:
                    slow_at.append((time.time(), waited))
                if ok:
                    latencies.append((time.perf_counter() - start) * 1000)
                    break
                failed_at.append((time.time(), answer))
                retries += 1
                attempt += 1
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    out.put((latencies, retries, dict(answers), failed_at, slow_at))


def _run(url: str, secret: str, payloads: list[str], concurrency: int, seconds: float, out: Any) -> None:
    asyncio.run(_send(url, secret, payloads, concurrency, seconds, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--invoices", type=int, default=1000)
    parser.add_argument("--duplicates", type=float, default=0.3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--lifecycle", choices=sorted(LIFECYCLES), default="short")
    parser.add_argument("--seconds", type=float, default=0.0, help="spread the deliveries over this long")
    parser.add_argument(
        "--failure-times", action="store_true", help="list each failed delivery's time and answer, and each slow one's"
    )
    args = parser.parse_args()
    if args.seconds < 0:
        parser.error("--seconds must not be negative")
    payloads = events(args.invoices, args.duplicates, seed=1, kind=args.lifecycle)
    shares = [payloads[i :: args.processes] for i in range(args.processes)]
    arguments = [(args.url, args.secret, share, args.concurrency, args.seconds) for share in shares]
    results, seconds = run_processes(_run, arguments)
    figures = summary([x for r in results for x in r[0]], 0, seconds)
    answers: Counter[str] = Counter()
    for r in results:
        answers.update(r[2])
    unique = unique_events(args.invoices, args.lifecycle)
    figures |= {"deliveries": len(payloads), "unique_events": unique, "answers": dict(answers)}
    figures |= {"retries": sum(r[1] for r in results), "seconds": round(seconds, 2)}
    if args.failure_times:
        figures["failures_at"] = sorted(f for r in results for f in r[3])
        figures["slow_at"] = sorted(f for r in results for f in r[4])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
