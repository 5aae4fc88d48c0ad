"""A fault-injecting HTTP proxy for the Stripe API: forwards calls to an upstream (the
emulator) and, on a share of them, misbehaves the ways networks and Stripe do. Half the
faults strike before the call reaches Stripe, half after Stripe has done the work, which
is the case idempotency keys exist for: the caller cannot tell the two apart.

`python -m chaos.stripe_proxy --upstream URL [--port 0] [--fault-rate 0.3] [--stall-s 2]`
announces its port (service/announce.py) and serves `GET /_proxy/stats` (faults by kind)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from service import announce

# drop: the connection closes with no answer; error: a Stripe-shaped 500; stall: the
# answer comes after the caller's timeout. `_after` means Stripe did the work first.
FAULTS = ("drop_before", "drop_after", "error_before", "error_after", "stall_before", "stall_after")
# Hop-by-hop headers a proxy must not forward (RFC 9110 7.6.1), plus those aiohttp sets itself.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "content-encoding"}

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
STATS = web.AppKey("stats", Counter[str])
RATE = web.AppKey("rate", float)
STALL_S = web.AppKey("stall_s", float)
RANDOM = web.AppKey("random", random.Random)


class Dropped(Exception):
    """Raised after the connection was closed on purpose, so aiohttp writes nothing."""


def _error() -> web.Response:
    body = {"error": {"type": "api_error", "message": "An unknown error occurred (injected by chaos.stripe_proxy)."}}
    return web.json_response(body, status=500)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
    raise Dropped


async def _forward(request: web.Request) -> web.Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    body = await request.read()
    async with request.app[SESSION].request(request.method, url, headers=headers, data=body) as upstream:
        payload = await upstream.read()
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        return web.Response(status=upstream.status, body=payload, headers=kept)


async def _strike(request: web.Request, fault: str | None, when: str) -> web.Response | None:
    """Carries out `fault` if it strikes at `when` (before or after forwarding): drops the
    connection, returns the 500 to answer instead, or stalls and lets the call go on."""
    if fault is None or not fault.endswith(f"_{when}"):
        return None
    kind = fault.removesuffix(f"_{when}")
    if kind == "drop":
        _drop(request)
    if kind == "error":
        return _error()
    await asyncio.sleep(request.app[STALL_S])
    return None


async def proxy(request: web.Request) -> web.StreamResponse:
    app = request.app
    fault = app[RANDOM].choice(FAULTS) if app[RANDOM].random() < app[RATE] else None
    app[STATS][fault or "forwarded_clean"] += 1
    if (early := await _strike(request, fault, "before")) is not None:
        return early
    response = await _forward(request)
    late = await _strike(request, fault, "after")
    return response if late is None else late


async def stats(request: web.Request) -> web.Response:
    counts: Counter[str] = request.app[STATS]
    return web.json_response(dict(counts))


@web.middleware
async def swallow_drops(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Dropped:
        # aiohttp needs a response object; the transport is gone, so none is sent.
        return web.Response(status=499)


async def _session(app: web.Application) -> AsyncIterator[None]:
    # One connection per call: a dropped or stalled call never poisons a pooled one.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        app[SESSION] = session
        yield


def init(upstream: str, *, fault_rate: float, stall_s: float, seed: int | None = None) -> web.Application:
    app = web.Application(middlewares=[swallow_drops], client_max_size=16 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app[STATS] = Counter()
    app[RATE] = fault_rate
    app[STALL_S] = stall_s
    app[RANDOM] = random.Random(seed)  # noqa: S311 - fault choice, not security
    app.cleanup_ctx.append(_session)
    app.router.add_get("/_proxy/stats", stats)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


async def _serve(args: argparse.Namespace) -> None:
    app = init(args.upstream, fault_rate=args.fault_rate, stall_s=args.stall_s, seed=args.seed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(f"Stripe proxy listening on {runner.addresses[0][1]}", flush=True)
    announce.listening("stripe-proxy", http=runner.addresses[0][1])
    print(json.dumps({"faults": list(FAULTS), "fault_rate": args.fault_rate, "stall_s": args.stall_s}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m chaos.stripe_proxy", description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--stall-s", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=None)
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
