"""A fault-injecting HTTP proxy for the Stripe API: forwards calls to an upstream (the
emulator) and, on a share of them, misbehaves the ways networks and Stripe do. Half the
faults strike before the call reaches Stripe, half after Stripe has done the work, which
is the case idempotency keys exist for: the caller cannot tell the two apart.

`python -m chaos.stripe_proxy --upstream URL [--port 0] [--fault-rate 0.3] [--stall-s 2]
[--faults drop_before,...]` announces its port (service/announce.py) and serves
`GET /_proxy/stats`: the faults that struck a call, by kind. A drop or an error always
strikes; a stall only if the caller gave up (timed out and closed the connection) while
it lasted, otherwise it counts as `<kind>_waited_out` (the call was merely slow). Also
`stalled_calls_retried`: calls a stall struck that the caller then sent again (the same
Idempotency-Key, or the same request), the caller's visible answer to its timeout.
--faults (default: CHAOS_STRIPE_FAULTS, else all) limits the faults chosen from.

`POST /_proxy/hold` holds every answer from then on once Stripe has given it (the work is
done, the caller does not know yet), until `POST /_proxy/release` or HOLD_LIMIT_S;
`GET /_proxy/held` lists the Idempotency-Keys of the calls held since the last hold. The
failover scenario holds answers across the moment it strikes Postgres, so that Creates
are cut off between a Stripe call and its answer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
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
CHOSEN_FROM = web.AppKey("chosen_from", tuple[str, ...])
# What identifies a call again when its caller retries it, for the calls a stall struck.
STALLED = web.AppKey("stalled", set[str])
# Open while answers pass; cleared by a hold. A held answer is let go after this at the latest.
PASSING = web.AppKey("passing", asyncio.Event)
HELD = web.AppKey("held", list[str])
HOLD_LIMIT_S = 60.0


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


def _call_id(request: web.Request, body: bytes) -> str:
    """The call as its caller would send it again: Stripe's SDK retries with the same
    Idempotency-Key; a call without one is known by its method, path and body."""
    key = request.headers.get("Idempotency-Key")
    if key:
        return f"key {key}"
    return f"{request.method} {request.rel_url.path_qs} {hashlib.sha256(body).hexdigest()}"


# How often a stall looks whether its caller is still there.
_STALL_POLL_S = 0.02


async def _stall(request: web.Request, fault: str, call: str) -> None:
    """Holds the call for STALL_S. It struck once the caller went away meanwhile (timed
    out): counted then, so that the caller's retry, which may come while the stall still
    lasts, is known for one."""
    app = request.app
    struck = False

    def strike() -> None:
        nonlocal struck
        if not struck:
            struck = True
            app[STATS][fault] += 1
            app[STALLED].add(call)

    end = asyncio.get_running_loop().time() + app[STALL_S]
    try:
        while (left := end - asyncio.get_running_loop().time()) > 0:
            if request.transport is None or request.transport.is_closing():
                strike()
            await asyncio.sleep(min(left, _STALL_POLL_S))
    except asyncio.CancelledError:  # a server that cancels the handlers of callers gone
        strike()
        raise
    if request.transport is None or request.transport.is_closing():
        strike()
    if not struck:
        app[STATS][f"{fault}_waited_out"] += 1


async def _strike(request: web.Request, fault: str | None, when: str, call: str) -> web.Response | None:
    """Carries out `fault` if it strikes at `when` (before or after forwarding): drops the
    connection, returns the 500 to answer instead, or stalls and lets the call go on.
    Counts the fault once it struck."""
    if fault is None or not fault.endswith(f"_{when}"):
        return None
    kind = fault.removesuffix(f"_{when}")
    if kind == "stall":
        await _stall(request, fault, call)
        return None
    request.app[STATS][fault] += 1
    if kind == "drop":
        _drop(request)
    return _error()


async def proxy(request: web.Request) -> web.StreamResponse:
    app = request.app
    faults: tuple[str, ...] = app[CHOSEN_FROM]
    fault = app[RANDOM].choice(faults) if app[RANDOM].random() < app[RATE] else None
    call = _call_id(request, await request.read())
    if call in app[STALLED]:
        app[STALLED].discard(call)
        app[STATS]["stalled_calls_retried"] += 1
    if fault is None:
        app[STATS]["forwarded_clean"] += 1
    if (early := await _strike(request, fault, "before", call)) is not None:
        return early
    response = await _forward(request)
    if not app[PASSING].is_set():
        app[HELD].append(request.headers.get("Idempotency-Key", ""))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app[PASSING].wait(), HOLD_LIMIT_S)
    late = await _strike(request, fault, "after", call)
    return response if late is None else late


async def stats(request: web.Request) -> web.Response:
    counts: Counter[str] = request.app[STATS]
    return web.json_response(dict(counts))


async def hold(request: web.Request) -> web.Response:
    request.app[HELD].clear()
    request.app[PASSING].clear()
    return web.json_response({"holding": True})


async def release(request: web.Request) -> web.Response:
    request.app[PASSING].set()
    return web.json_response({"held": request.app[HELD]})


async def held(request: web.Request) -> web.Response:
    return web.json_response({"held": request.app[HELD]})


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


def init(
    upstream: str, *, fault_rate: float, stall_s: float, seed: int | None = None, faults: tuple[str, ...] = FAULTS
) -> web.Application:
    if not faults or set(faults) - set(FAULTS):
        raise ValueError(f"faults must be some of {', '.join(FAULTS)}")
    app = web.Application(middlewares=[swallow_drops], client_max_size=16 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app[STATS] = Counter()
    app[RATE] = fault_rate
    app[STALL_S] = stall_s
    app[RANDOM] = random.Random(seed)  # noqa: S311 - fault choice, not security
    app[CHOSEN_FROM] = faults
    app[STALLED] = set()
    app[PASSING] = asyncio.Event()
    app[PASSING].set()
    app[HELD] = []
    app.cleanup_ctx.append(_session)
    app.router.add_get("/_proxy/stats", stats)
    app.router.add_post("/_proxy/hold", hold)
    app.router.add_post("/_proxy/release", release)
    app.router.add_get("/_proxy/held", held)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


async def _serve(args: argparse.Namespace) -> None:
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    app = init(args.upstream, fault_rate=args.fault_rate, stall_s=args.stall_s, seed=args.seed, faults=faults)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(f"Stripe proxy listening on {runner.addresses[0][1]}", flush=True)
    announce.listening("stripe-proxy", http=runner.addresses[0][1])
    print(json.dumps({"faults": list(faults), "fault_rate": args.fault_rate, "stall_s": args.stall_s}), flush=True)
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
    parser.add_argument("--faults", default=os.environ.get("CHAOS_STRIPE_FAULTS") or ",".join(FAULTS))
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
