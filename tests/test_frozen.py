"""A frozen Postgres (SIGSTOP of its processes: its connections stay open, nothing
answers) under the running stack, at a reduced size: REST reads through Envoy, direct gRPC
reads, keyed Creates and signed webhook deliveries keep coming before, during and after.
Every answer is 200/OK or 503/UNAVAILABLE, within DB_COMMAND_TIMEOUT_S plus MARGIN_S
(never Envoy's 504, never a hang); after SIGCONT each kind is served again, every
webhook event is recorded and applied exactly once (by the count its applying transaction
keeps), and each Create's key makes one invoice in Stripe. The Postgres is this module's own, never the session's.

`make chaos` runs it as make run would meet it (its scenario `frozen postgres`): frozen
for CHAOS_FROZEN_S=20 with every DB_* setting at its default, figures written to
CHAOS_FIGURES."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
import stripe

from service import embedded, storage
from service.app import SERVICE_ROLE
from service.dblink import DEFAULT_BUDGET_S
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from tests.create_helpers import stripe_invoices
from tests.helpers import API_KEY, deliver, event, sign, stack_env
from tools.customers import customer_with_card
from tools.freeze import frozen
from tools.stack import backend, wait_until_routed

AT_DEFAULTS = "CHAOS_FROZEN_S" in os.environ
BUDGET_S = DEFAULT_BUDGET_S if AT_DEFAULTS else 2.0  # DB_COMMAND_TIMEOUT_S
# What a call may take beyond the budget: the event loop's turn after the deadline, Envoy's
# hop and this 2-core machine's other tests. Measured: at most 0.1 s over (docs/reliability.md).
MARGIN_S = 1.0
FREEZE_S = float(os.environ.get("CHAOS_FROZEN_S", "8"))
UNAVAILABLE = ("503", "UNAVAILABLE")
SERVED = ("200", "OK")


@dataclass
class Answer:
    kind: str
    status: str
    started: float
    took: float


@dataclass
class Frozen:
    stack_dir: Path
    pg_dir: Path
    database: str  # the owner's DSN, for the checks
    base_url: str
    grpc_port: int


@pytest.fixture(scope="module")
def stack_on_own_postgres(localstripe: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Frozen]:
    tmp = tmp_path_factory.mktemp("frozen")
    admin = embedded.start(tmp / "pg", temporary=True)
    try:
        asyncio.run(storage.ensure_login_role(admin, SERVICE_ROLE))
        database = asyncio.run(storage.fresh_database(admin, "frozen", grant_to=SERVICE_ROLE))
        env = stack_env(database, tmp, localstripe)
        if not AT_DEFAULTS:
            env |= {"DB_COMMAND_TIMEOUT_S": str(BUDGET_S), "DB_CONNECT_TIMEOUT_S": "1"}
        with (tmp / "stack.log").open("w") as log, backend(env, tmp, log=log) as running:
            base_url = f"http://127.0.0.1:{running.gateway_port}"
            wait_until_routed(base_url, API_KEY)
            yield Frozen(tmp, tmp / "pg", database, base_url, running.grpc_port)
    finally:
        embedded.stop(tmp / "pg")


async def _keep_calling(
    kind: str, call: Callable[[], Awaitable[str]], answers: list[Answer], done: asyncio.Event
) -> None:
    """Calls until `done`, then until one is served (at most 200 calls, each bounded by
    the client's own 20 s, past Envoy's 15 s route timeout, so that a hang would show)."""
    loop = asyncio.get_running_loop()
    for _ in range(200):
        started = loop.time()
        try:
            status = await asyncio.wait_for(call(), 20)
        except Exception as exc:
            status = type(exc).__name__
        answers.append(Answer(kind, status, started, loop.time() - started))
        if done.is_set() and status in SERVED:
            return
        await asyncio.sleep(0.1)  # pacing, so four callers leave the 2 cores to the stack


async def test_a_frozen_postgres_answers_unavailable_within_the_budget(
    stack_on_own_postgres: Frozen, stripe_client: stripe.StripeClient
) -> None:
    stack = stack_on_own_postgres
    customer, method = await customer_with_card(stripe_client)
    keys: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> body
    events: dict[str, str] = {}  # id -> payload
    invoice_ids = (f"in_frozen{n:06d}" for n in itertools.count())

    async with (
        httpx.AsyncClient(base_url=stack.base_url, headers={"Api-Key": API_KEY}, timeout=20) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel,
    ):
        stub = pb_grpc.InvoiceServiceStub(channel)

        async def rest_list() -> str:
            return str((await http.get("/admin/api/invoices", params={"page": 1, "limit": 5})).status_code)

        async def grpc_read() -> str:
            try:
                await stub.ListInvoices(pb.ListInvoicesRequest(page=1, limit=5), metadata=(("api-key", API_KEY),))
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return "OK"

        async def create() -> str:
            key = f"frozen-{uuid.uuid4().hex[:12]}"
            keys[key] = body = {"items": [{"name": key, "amount": 1200}], "customer": customer, "paymentMethod": method}
            return str(
                (await http.post("/admin/api/invoices", json=body, headers={"Idempotency-Key": key})).status_code
            )

        async def webhook() -> str:
            payload = event(next(invoice_ids), "invoice.created", "draft", int(time.time()))
            event_id = json.loads(payload)["id"]
            events[event_id] = payload
            reply = await deliver(http, payload)
            if reply.status_code != 200:
                return str(reply.status_code)
            outcome = str(reply.json()["outcome"])
            return "200" if outcome in ("created", "duplicate") else outcome

        calls = {"rest list": rest_list, "grpc list": grpc_read, "create": create, "webhook": webhook}
        for kind, call in calls.items():  # served before the fault, or the test proves nothing
            assert await call() in SERVED, kind

        answers: list[Answer] = []
        done = asyncio.Event()
        callers = [asyncio.create_task(_keep_calling(k, c, answers, done)) for k, c in calls.items()]
        loop = asyncio.get_running_loop()
        with frozen(stack.pg_dir):
            frozen_at = loop.time()
            await asyncio.sleep(FREEZE_S)  # the fault's length, not an ordering
        thawed_at = loop.time()
        done.set()
        await asyncio.gather(*callers)

        strange = [a for a in answers if a.status not in SERVED + UNAVAILABLE]
        assert not strange, strange
        slowest = max(a.took for a in answers)
        assert slowest <= BUDGET_S + MARGIN_S, [a for a in answers if a.took > BUDGET_S + MARGIN_S]
        for kind in calls:
            during = [a for a in answers if a.kind == kind and frozen_at <= a.started < thawed_at - BUDGET_S]
            assert any(a.status in UNAVAILABLE for a in during), (kind, during)
            assert [a for a in answers if a.kind == kind][-1].status in SERVED, kind
        figures = _figures(answers, frozen_at, thawed_at, calls)
        print(f"frozen {FREEZE_S:.0f} s: {figures}", file=sys.stderr)
        _write(figures)

        await _redeliver(http, events)
        made = await _retry_creates(http, keys)

    await _check_events(stack.database, events)
    # One invoice per key, in the service and in Stripe (the customer is this test's own).
    # (At make chaos's 20 s, over a hundred: a page of Stripe's list holds 100.)
    assert len(set(made.values())) == len(keys) == len(await stripe_invoices(stripe_client, customer))


def _figures(answers: list[Answer], frozen_at: float, thawed_at: float, kinds: dict[str, Any]) -> dict[str, Any]:
    """Per kind of call: its answers, the longest any waited, and when after the thaw it was
    last refused (0 if it never was after the thaw)."""
    per_kind = {}
    for kind in kinds:
        mine = [a for a in answers if a.kind == kind]
        refused = [a.started + a.took - thawed_at for a in mine if a.status not in SERVED]
        per_kind[kind] = {
            "answers": dict(sorted(Counter(a.status for a in mine).items())),
            "longest_wait_s": round(max(a.took for a in mine), 2),
            "refused": sum(1 for a in mine if a.status not in SERVED),
            # from the thaw until the last refusal ended: how long until it was served again
            "served_again_after_thaw_s": round(max([0.0, *refused]), 2),
        }
    return {"frozen_s": FREEZE_S, "budget_s": BUDGET_S, "bound_s": BUDGET_S + MARGIN_S, "calls": per_kind}


def _write(figures: dict[str, Any]) -> None:
    if "CHAOS_FIGURES" in os.environ:  # make chaos prints them
        Path(os.environ["CHAOS_FIGURES"]).write_text(json.dumps(figures))


async def _redeliver(http: httpx.AsyncClient, events: dict[str, str]) -> None:
    """What Stripe does: every event not acknowledged is sent again until it is (here:
    every event, so that each has a redelivery to be recognised as a duplicate)."""
    for payload in events.values():
        await _until_served(partial(deliver, http, payload, sign(payload)))


async def _retry_creates(http: httpx.AsyncClient, keys: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every Create sent again with its key, as its caller would after a 503 or to be sure:
    the invoice each key answers."""
    made = {}
    for key, body in keys.items():
        post = partial(http.post, "/admin/api/invoices", json=body, headers={"Idempotency-Key": key})
        reply = await _until_served(post)
        made[key] = str(reply.json()["id"])
    return made


async def _until_served(call: Callable[[], Awaitable[httpx.Response]], timeout_s: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await call()
        if reply.status_code == 200 or time.monotonic() > deadline:
            assert reply.status_code == 200, reply.text
            return reply
        await asyncio.sleep(0.2)


async def _check_events(database: str, events: dict[str, str]) -> None:
    """Every event sent is recorded, with its invoice, and applied exactly once by the count
    its applying transactions kept (migration 0009), whatever the answers said: an answer
    lost in the freeze could hide a second application, the count cannot."""
    conn = await asyncpg.connect(database)
    try:
        applied = {r["id"]: r["applications"] for r in await conn.fetch("SELECT id, applications FROM stripe_events")}
        records = {r["stripe_invoice_id"] for r in await conn.fetch("SELECT stripe_invoice_id FROM invoices")}
    finally:
        await conn.close()
    assert {e: applied.get(e) for e in events if applied.get(e) != 1} == {}
    assert {json.loads(p)["data"]["object"]["id"] for p in events.values()} <= records
