"""How long a change takes to reach its watchers: N WatchInvoices streams open on the
server, then signed Stripe events delivered one at a time through Envoy to the webhook
sidecar, which records each in Postgres (the trigger stamps the change just before its
commit, the event's `change_time`). Each watcher notes when each change arrives; the delay
is arrival minus change_time, over every (watcher, change). The watchers run in this one
process on the same machine, so their own reading is in the figure. Prints one JSON line.

`python -m bench.watch_delay --grpc HOST:PORT --webhook-url URL --secret whsec_... --api-key K`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import httpx

from bench.load import percentile
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tools.signing import sign

# Streams per channel (one HTTP/2 connection each), well under any concurrent-stream limit.
STREAMS_PER_CHANNEL = 100


def _event(invoice_id: str, created: int) -> str:
    obj = {
        "id": invoice_id,
        "object": "invoice",
        "customer": "cus_watchbench",
        "customer_name": "Bench",
        "status": "open",
        "total": 4200,
        "currency": "eur",
        "created": created,
        "invoice_pdf": f"https://pay.stripe.com/invoice/{invoice_id}/pdf",
        "metadata": {},
    }
    body = {"id": f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "type": "invoice.finalized", "created": created}
    return json.dumps({**body, "data": {"object": obj}})


async def measure(
    grpc_target: str, webhook_url: str, secret: str, api_key: str, watchers: int, events: int, rate: float
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    wanted = {f"in_wd{run}{n:05d}" for n in range(events)}
    delays: list[float] = []
    counts = [0] * watchers
    opened = asyncio.Event()
    open_count = 0
    channels = [
        grpc.aio.insecure_channel(grpc_target)
        for _ in range((watchers + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    ]

    async def watch(i: int) -> None:
        nonlocal open_count
        stub = pb_grpc.InvoiceServiceStub(channels[i // STREAMS_PER_CHANNEL])
        call = stub.WatchInvoices(pb.WatchInvoicesRequest(), metadata=(("api-key", api_key),))
        async for event in call:
            if event.kind == pb.InvoiceEvent.KIND_BOOKMARK:
                if counts[i] == 0 and not event.HasField("invoice"):
                    open_count += 1
                    if open_count == watchers:
                        opened.set()
                continue
            if event.invoice.invoice_id in wanted:
                delays.append(time.time() - event.change_time.ToMicroseconds() / 1e6)
                counts[i] += 1
                if counts[i] == events:
                    call.cancel()
                    return

    tasks = [asyncio.create_task(watch(i)) for i in range(watchers)]
    await asyncio.wait_for(opened.wait(), 60)
    now = int(time.time())
    async with httpx.AsyncClient(timeout=30) as http:
        started = time.monotonic()
        for n, invoice_id in enumerate(sorted(wanted)):
            payload = _event(invoice_id, now)
            reply = await http.post(webhook_url, content=payload, headers={"Stripe-Signature": sign(payload, secret)})
            reply.raise_for_status()
            await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
    _, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    for channel in channels:
        await channel.close()
    return {
        "watchers": watchers,
        "changes": events,
        "received": len(delays),
        "expected": watchers * events,
        "complete_watchers": sum(c == events for c in counts),
        "delay_p50_ms": round(percentile(delays, 0.5) * 1000, 1),
        "delay_p99_ms": round(percentile(delays, 0.99) * 1000, 1),
        "delay_max_ms": round(max(delays, default=0.0) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.watch_delay", description=__doc__)
    parser.add_argument("--grpc", required=True, help="the server, HOST:PORT")
    parser.add_argument("--webhook-url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--watchers", type=int, default=1)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="deliveries per second")
    args = parser.parse_args()
    figures = asyncio.run(
        measure(args.grpc, args.webhook_url, args.secret, args.api_key, args.watchers, args.events, args.rate)
    )
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
