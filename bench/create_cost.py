"""What a Create costs: Stripe calls per Create (counted at the emulator, which is the
Stripe this machine has) and the Create's latency through the gRPC server, for invoices of
1, 10 and 100 items, one Create at a time with a key each. The emulator answers in
milliseconds where Stripe takes hundreds, so the latency is the service's own share plus
the emulator's; the call count is what real Stripe would see. Prints one JSON line.

`python -m bench.create_cost --grpc HOST:PORT --api-key K --stripe URL [--creates 20]`
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
from service import payments
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tools.customers import customer_with_card
from tools.stack import LOCALSTRIPE_KEY

ITEMS = (1, 10, 100)


async def measure(grpc_target: str, api_key: str, stripe: str, creates: int) -> list[dict[str, Any]]:
    client = payments.client(LOCALSTRIPE_KEY, api_base=stripe, timeout_s=30, max_retries=0)
    customer, method = await customer_with_card(client)
    rows = []
    async with grpc.aio.insecure_channel(grpc_target) as channel, httpx.AsyncClient(base_url=stripe) as emulator:
        stub = pb_grpc.InvoiceServiceStub(channel)
        for items in ITEMS:
            await emulator.delete("/_config/calls")
            seconds = []
            for n in range(creates):
                request = pb.CreateInvoiceRequest(
                    items=[pb.InvoiceItem(name=f"line {i}", amount=100 + i) for i in range(items)],
                    customer=customer,
                    payment_method=method,
                )
                metadata = (("api-key", api_key), ("idempotency-key", f"cost-{uuid.uuid4().hex}-{n}"))
                started = time.perf_counter()
                await stub.CreateInvoice(request, metadata=metadata, timeout=60)
                seconds.append(time.perf_counter() - started)
            calls = (await emulator.get("/_config/calls")).json()["calls"]
            rows.append(
                {
                    "items": items,
                    "creates": creates,
                    "stripe_calls_per_create": round(sum(calls.values()) / creates, 2),
                    "stripe_calls": calls,
                    "p50_ms": round(percentile(seconds, 0.5) * 1000, 1),
                    "p99_ms": round(percentile(seconds, 0.99) * 1000, 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.create_cost", description=__doc__)
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--stripe", required=True, help="the emulator's base URL")
    parser.add_argument("--creates", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.grpc, args.api_key, args.stripe, args.creates))), flush=True)


if __name__ == "__main__":
    main()
