"""The callers the failover scenario keeps running while it strikes Postgres, in a process
of their own (the scenario forks Postgres's tools and Patroni; a fork beside gRPC's
threads may crash the child): two REST readers, a direct gRPC reader (docs/grpc-clients.md's service
config), two writers of keyed Creates retried with their keys until answered, and three
watchers that resume with their last token. Each kind of call keeps its answers, the time
and answer of every failure, and the time and length of every call that waited over
SLOW_S; each watcher every change it saw."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from bench.webhook_load import SLOW_S
from chaos import API_KEY
from chaos.creates import Tally, create, order_body
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tools.stack import direct_channel

AUTH = [("api-key", API_KEY)]
WATCHERS = 3
# What a watcher keeps of a change: what it was, of which invoice, and the state it left.
Seen = tuple[str, str, str]


@dataclass
class Calls:
    """One kind of caller's answers, the wall-clock time of each failure (and the Create's
    key), and of each slow call with how long it waited."""

    answers: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, str, str]] = field(default_factory=list)
    slow: list[tuple[float, float]] = field(default_factory=list)

    def record(self, answer: str, ok: bool, started: float, key: str = "") -> None:
        self.answers[answer] += 1
        if not ok:
            self.failures.append((time.time(), answer, key))
        if (waited := time.monotonic() - started) > SLOW_S:
            self.slow.append((time.time(), waited))


@dataclass
class Load:
    calls: dict[str, Calls] = field(default_factory=lambda: {kind: Calls() for kind in ("rest", "grpc", "creates")})
    orders: Tally = field(default_factory=Tally)
    watched: list[list[Seen]] = field(default_factory=list)
    watch_ends: Counter[str] = field(default_factory=Counter)


def seen(event: pb.InvoiceEvent) -> Seen:
    kind = pb.InvoiceEvent.Kind.Name(event.kind).removeprefix("KIND_").lower()
    return kind, event.invoice.invoice_id, event.invoice.status


class Watcher:
    """A WatchInvoices caller as the contract asks: whenever its stream ends (a failover, no
    server), it opens another with the last resume_token it received."""

    def __init__(self, target: str, ends: Counter[str]) -> None:
        self.target, self.ends = target, ends
        self.token = ""
        self.changes: list[Seen] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with direct_channel(self.target) as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            while True:
                try:
                    request = pb.WatchInvoicesRequest(resume_token=self.token)
                    async for event in stub.WatchInvoices(request, metadata=AUTH):
                        self.token = event.resume_token
                        if event.kind != pb.InvoiceEvent.KIND_BOOKMARK:
                            self.changes.append(seen(event))
                    self.ends["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    self.ends[exc.code().name] += 1
                    await asyncio.sleep(0.1)


async def _until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def run_callers(
    base: str, target: str, customers: list[tuple[str, str]], run: str, events: tuple[Any, Any], queues: tuple[Any, Any]
) -> None:
    """The process's entry: `events` are (set once every watcher watches, set to stop the
    calls); `queues` (in: how many changes the watchers must see before they end, once the
    calls stopped; out: the Load)."""
    inbox, outbox = queues
    outbox.put(asyncio.run(_callers(base, target, customers, run, events, inbox)))


async def _callers(
    base: str, target: str, customers: list[tuple[str, str]], run: str, events: tuple[Any, Any], inbox: Any
) -> Load:
    watching, stop = events
    load = Load()
    numbers = itertools.count()
    watchers = [Watcher(target, load.watch_ends) for _ in range(WATCHERS)]
    # Every watcher holds a token (its first bookmark) before any change: none may miss one.
    if not await _until(lambda: all(w.token for w in watchers), 60):
        raise RuntimeError("the watchers never got their first bookmark")
    watching.set()

    async def rest() -> None:
        async with httpx.AsyncClient(base_url=base, headers={"Api-Key": API_KEY}, timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    reply = await http.get("/admin/api/invoices", params={"page": 1, "limit": 5})
                    load.calls["rest"].record(str(reply.status_code), reply.status_code == 200, started)
                except httpx.HTTPError as exc:
                    load.calls["rest"].record(type(exc).__name__, False, started)

    async def direct() -> None:
        async with direct_channel(target) as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await stub.ListInvoices(pb.ListInvoicesRequest(page=1, limit=5), metadata=AUTH, timeout=60)
                    load.calls["grpc"].record("OK", True, started)
                except grpc.aio.AioRpcError as exc:
                    load.calls["grpc"].record(exc.code().name, False, started)

    async def writes() -> None:
        async def began(request: httpx.Request) -> None:
            request.extensions["started"] = time.monotonic()

        async def answered(reply: httpx.Response) -> None:
            key = reply.request.headers.get("Idempotency-Key", "")
            started = reply.request.extensions.get("started", time.monotonic())
            load.calls["creates"].record(str(reply.status_code), reply.status_code == 200, started, key)

        hooks: dict[str, list[Callable[..., Any]]] = {"request": [began], "response": [answered]}
        async with httpx.AsyncClient(
            base_url=base, headers={"Api-Key": API_KEY}, timeout=60, event_hooks=hooks
        ) as http:
            while not stop.is_set():
                n = next(numbers)
                # Each order until it is answered, always with its key, as a careful caller does.
                await create(http, f"{run}-{n}", order_body(customers, "item", n), load.orders)

    await asyncio.gather(rest(), rest(), direct(), writes(), writes())
    load.calls["creates"].answers = load.orders.answers
    # The watchers go on until they have seen every change the feed holds (or a minute).
    changes = await asyncio.to_thread(inbox.get, True, 600)
    await _until(lambda: all(len(w.changes) >= changes for w in watchers), 60)
    for w in watchers:
        w.task.cancel()
    load.watched = [w.changes for w in watchers]
    return load
