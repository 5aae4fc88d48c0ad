"""Load generators that run as their own processes, so the measured server never shares
an interpreter with its client: a multi-process asyncio gRPC client, and a webhook
sender for signed Stripe events. Each prints one JSON line of figures."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc


def percentile(values: list[float], q: float) -> float:
    """The value at fraction `q` of the sorted values (the nearest rank below); 0 for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summary(latencies_ms: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ordered = sorted(latencies_ms)

    def pct(p: float) -> float:
        return round(percentile(ordered, p), 3)

    return {
        "calls": len(ordered),
        "errors": errors,
        "rps": round(len(ordered) / seconds, 1),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
    }


def _requests(args: argparse.Namespace) -> list[Any]:
    if args.case == "get":
        return [pb.GetInvoiceRequest(id=i) for i in json.loads(args.ids)]
    if args.case == "list":
        return [pb.ListInvoicesRequest(page=1, limit=20)]
    if args.case == "list_deep_page":
        return [pb.ListInvoicesRequest(page=args.deep_page, limit=20)]
    return [pb.ListInvoicesRequest(limit=20, page_token=args.token)]


async def _grpc_worker(args: argparse.Namespace, out: Any) -> None:
    requests = _requests(args)
    metadata = (("api-key", args.api_key),)
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        call = stub.GetInvoice if args.case == "get" else stub.ListInvoices
        deadline = time.monotonic() + args.seconds

        async def loop(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)  # noqa: S311 - load shape, not secrets
            while time.monotonic() < deadline:
                request = requests[rng.randrange(len(requests))]
                start = time.perf_counter()
                try:
                    await call(request, metadata=metadata, timeout=10)
                    latencies.append((time.perf_counter() - start) * 1000)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(loop(i) for i in range(args.concurrency)))
    out.put((latencies, errors))


def _run_grpc_worker(args: argparse.Namespace, out: Any) -> None:
    asyncio.run(_grpc_worker(args, out))


def run_processes(target: Callable[..., None], argument_lists: list[tuple[Any, ...]]) -> tuple[list[Any], float]:
    """Runs `target(*arguments, queue)` in one process per argument list; returns what
    each put on the queue and the wall time."""
    queue: Any = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=target, args=(*arguments, queue)) for arguments in argument_lists]
    start = time.monotonic()
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return results, time.monotonic() - start


def grpc_main(args: argparse.Namespace) -> None:
    results, elapsed = run_processes(_run_grpc_worker, [(args,)] * args.processes)
    seconds = max(args.seconds, elapsed - 0.5)
    latencies = [x for r in results for x in r[0]]
    print(json.dumps(summary(latencies, sum(r[1] for r in results), seconds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--case", choices=["get", "list", "list_deep_page", "list_token"], required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--ids", default="[]")
    parser.add_argument("--token", default="")
    parser.add_argument("--deep-page", type=int, default=20_000)
    grpc_main(parser.parse_args())


if __name__ == "__main__":
    main()
