"""Postgres failover under load: the server and the sidecar run on a primary with a
synchronous streaming standby (tools/pgha.py), given one multi-host DATABASE_URL with
`target_session_attrs=read-write`. While REST readers, a direct gRPC reader (the README's
service config), writers of keyed Creates and a webhook storm (CHAOS_FAILOVER_INVOICES
invoices' events, 30% twice, each retried until answered 2xx, as Stripe does) run, the
primary is killed with SIGKILL and the standby promoted; the old primary is rewound and
rejoins as the new one's synchronous standby; later the new primary is killed too and the
old one promoted back. Nothing is restarted but Postgres.

Afterwards: every event recorded and applied once (so no acknowledged one was lost: the
sender never sends an acknowledged event again), each order one Stripe invoice with its
one item and none charged twice, one `ok` audit entry per answered Create, and every
failed call failed with 503 (REST) or UNAVAILABLE (gRPC) while a failover was under
way. Prints the figures, with how long after each kill each kind of call still failed,
as JSON; exits 1 if anything is lost, doubled or answered otherwise."""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import httpx

from bench.webhook_load import unique_events
from chaos import API_KEY, stack_env
from chaos.creates import (
    Tally,
    charged_twice,
    create,
    customers_of,
    database_state,
    expected_amount,
    invoices_by_order,
    most_invoices_per_order,
    order_body,
    stripe_invoices,
    without_their_one_item,
)
from chaos.storm import event_applications, events_recorded, verify
from service import storage
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.storage.connecting import CONNECTION_ERRORS
from tools.pgha import Pair
from tools.stack import (
    LOCALSTRIPE_KEY,
    ROOT,
    backend,
    direct_channel,
    free_port,
    start_localstripe,
    wait_for,
    wait_until_routed,
)

SECRET = "whsec_chaos_failover"  # noqa: S105 - a local run's own secret
# The failovers start when this share of the storm's events is recorded.
FAILOVER_AT = (0.15, 0.3)
# A failure counts as the failover's if it came from its kill until this long after the
# standby rejoined (or the next kill); any other failure fails the scenario.
SETTLED_S = 10.0
# The next failover waits this long after the last rejoin, so each one's recovery shows.
PAUSE_S = 3.0
# The storm's deliveries are spread over this long, so that both failovers (over by about
# 15 s here) strike it however fast the machine answers: sent as fast as answered, the
# storm of 500 invoices once ended on CI before the second one.
STORM_S = 30.0
# What a caller may be answered while Postgres fails over: "retry later", nothing else.
ALLOWED = {"rest": {"503"}, "grpc": {"UNAVAILABLE"}, "creates": {"503"}, "webhooks": {"503"}}


@dataclass
class Calls:
    """One kind of caller's answers, and the wall-clock time of each failure."""

    answers: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, str]] = field(default_factory=list)

    def record(self, answer: str, ok: bool) -> None:
        self.answers[answer] += 1
        if not ok:
            self.failures.append((time.time(), answer))


@dataclass
class Load:
    calls: dict[str, Calls] = field(default_factory=lambda: {kind: Calls() for kind in ("rest", "grpc", "creates")})
    orders: Tally = field(default_factory=Tally)


def _run_callers(base: str, target: str, customers: list[tuple[str, str]], run: str, stop: Any, out: Any) -> None:
    out.put(asyncio.run(_callers(base, target, customers, run, stop)))


async def _callers(base: str, target: str, customers: list[tuple[str, str]], run: str, stop: Any) -> Load:
    load = Load()
    numbers = itertools.count()

    async def rest() -> None:
        async with httpx.AsyncClient(base_url=base, headers={"Api-Key": API_KEY}, timeout=30) as http:
            while not stop.is_set():
                try:
                    reply = await http.get("/admin/api/invoices", params={"page": 1, "limit": 5})
                    load.calls["rest"].record(str(reply.status_code), reply.status_code == 200)
                except httpx.HTTPError as exc:
                    load.calls["rest"].record(type(exc).__name__, False)

    async def direct() -> None:
        async with direct_channel(target) as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            while not stop.is_set():
                try:
                    request = pb.ListInvoicesRequest(page=1, limit=5)
                    await stub.ListInvoices(request, metadata=[("api-key", API_KEY)], timeout=30)
                    load.calls["grpc"].record("OK", True)
                except grpc.aio.AioRpcError as exc:
                    load.calls["grpc"].record(exc.code().name, False)

    async def writes() -> None:
        async def seen(reply: httpx.Response) -> None:
            if reply.status_code != 200:
                load.calls["creates"].failures.append((time.time(), str(reply.status_code)))

        hooks: dict[str, list[Callable[..., Any]]] = {"response": [seen]}
        async with httpx.AsyncClient(
            base_url=base, headers={"Api-Key": API_KEY}, timeout=30, event_hooks=hooks
        ) as http:
            while not stop.is_set():
                n = next(numbers)
                # Each order until it is answered, always with its key, as a careful caller does.
                await create(http, f"{run}-{n}", order_body(customers, "item", n), load.orders)

    await asyncio.gather(rest(), rest(), direct(), writes(), writes())
    load.calls["creates"].answers = load.orders.answers
    return load


def _when(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    wait_for(lambda: condition() or None, what, timeout)


def _gaps(load: Load, webhooks: list[tuple[float, str]], failovers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per failover and kind of call: how many failed, with what, and until how long after the kill."""
    failures = {kind: calls.failures for kind, calls in load.calls.items()} | {"webhooks": webhooks}
    ends = [f["killed_at"] for f in failovers[1:]] + [float("inf")]
    windows = [(f["killed_at"], min(f["rejoined_at"] + SETTLED_S, end)) for f, end in zip(failovers, ends, strict=True)]
    for failover, (start, end) in zip(failovers, windows, strict=True):
        for kind, found in failures.items():
            inside = [(t, answer) for t, answer in found if start <= t < end]
            failover[kind] = {
                "failed": len(inside),
                "answers": dict(Counter(answer for _, answer in inside)),
                "failing_until_s": round(max((t for t, _ in inside), default=start) - start, 2),
            }
    outside = {
        kind: dict(Counter(a for t, a in found if not any(start <= t < end for start, end in windows)))
        for kind, found in failures.items()
    }
    disallowed = {kind: sorted({a for _, a in found} - ALLOWED[kind]) for kind, found in failures.items()}
    return {
        "failures_outside_failovers": {k: v for k, v in outside.items() if v},
        "answers_not_allowed": {k: v for k, v in disallowed.items() if v},
    }


async def _audit_counts(url: str) -> tuple[Counter[str], int]:
    """Per idempotency key, its Creates' `ok` audit rows; and how many (key, attempt) pairs
    have more than one row."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_key, attempt, count(*) AS n, count(*) FILTER (WHERE outcome = 'ok') AS ok"
            " FROM invoice_audit WHERE action = 'create' GROUP BY idempotency_key, attempt"
        )
    finally:
        await conn.close()
    ok: Counter[str] = Counter()
    for row in rows:
        ok[row["idempotency_key"]] += row["ok"]
    return ok, sum(1 for row in rows if row["n"] > 1)


async def _orders(url: str, direct: str, tally: Tally, run: str) -> dict[str, Any]:
    invoices = await stripe_invoices(direct)
    keys, _ = await database_state(url)
    by_order, orphans = invoices_by_order(invoices, run)
    answered = tally.invoice_of
    stripe_id = {order: found[0]["id"] for order, found in by_order.items()}
    expected = {order: expected_amount(int(order.rsplit("-", 1)[1])) for order in [*answered, *tally.failed]}
    audited_ok, audit_doubled = await _audit_counts(url)
    figures = {
        "orders": len(answered) + len(tally.failed),
        "orders_answered": len(answered),
        "stripe_invoices": len(invoices),
        "stripe_invoices_per_order_max": most_invoices_per_order(by_order),
        "orders_charged_twice": len(charged_twice(by_order)),
        "invoices_without_one_order": orphans,
        "answers_naming_another_invoice": sum(1 for k, i in answered.items() if stripe_id.get(k) != i),
        "create_records_naming_another_invoice": sum(1 for k, i in answered.items() if keys.get(k) != i),
        "invoices_without_their_one_item": len(without_their_one_item(by_order, expected)),
        # Each answered order's Create has exactly one `ok` entry in the audit trail, and no
        # attempt has two.
        "orders_without_one_ok_audit_entry": sum(1 for k in answered if audited_ok[k] != 1),
        "audit_attempts_written_twice": audit_doubled,
        # What the Create callers got besides their invoice and "retry later" (a transport error).
        "create_answers_not_allowed": sorted(set(tally.answers) - {"200", *ALLOWED["creates"]}),
    }
    figures["orders_ok"] = (
        not tally.failed
        and len(invoices) == len(answered) == len(by_order)
        and figures["stripe_invoices_per_order_max"] == 1
        and not (figures["orders_charged_twice"] or orphans)
        and not (figures["answers_naming_another_invoice"] or figures["create_records_naming_another_invoice"])
        and not (figures["invoices_without_their_one_item"] or figures["create_answers_not_allowed"])
        and not (figures["orders_without_one_ok_audit_entry"] or figures["audit_attempts_written_twice"])
    )
    return figures


def _fail_over_twice(pair: Pair, url: str, unique: int, sender: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Each failover once its share of the storm's events is recorded (and PAUSE_S after
    the last rejoin): SIGKILL to the primary, the standby promoted, the old primary
    rewound and rejoined; what happened when."""
    failovers: list[dict[str, Any]] = []
    for share in FAILOVER_AT:

        def reached(share: float = share, after: float = time.time() + PAUSE_S) -> bool:
            if time.time() < after:
                return False
            try:
                return asyncio.run(events_recorded(url)) >= unique * share or sender.poll() is not None
            except CONNECTION_ERRORS:
                return False

        _when(reached, f"{share:.0%} of the events recorded")
        failover: dict[str, Any] = {"storm_running": sender.poll() is None, "from": pair.primary.name}
        failover["killed_at"] = time.time()
        pair.kill_primary()
        pair.promote()
        failover["promoted_after_s"] = round(time.time() - failover["killed_at"], 2)
        pair.rejoin()
        failover["rejoined_at"] = time.time()
        failover["rejoined_after_s"] = round(failover["rejoined_at"] - failover["killed_at"], 2)
        failover |= {"to": pair.primary.name, "replication": pair.synchronous_state()}
        failovers.append(failover)
    return failovers


def main() -> None:
    invoices = int(os.environ.get("CHAOS_FAILOVER_INVOICES", "1500"))
    work = ROOT / ".build" / "chaos-failover"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pair = Pair(work / "pg")
    pair.start()
    run = f"failover-{uuid.uuid4().hex[:8]}"
    unique = unique_events(invoices, "long")
    stripe_port = free_port()
    try:
        url = asyncio.run(storage.fresh_database(pair.dsn(), "chaos_failover"))
        with (work / "stack.log").open("w") as log:
            emulator = start_localstripe(stripe_port, fresh=True, log=log)
            direct = f"http://127.0.0.1:{stripe_port}"
            env = stack_env(url, work, SECRET, STRIPE_API_KEY=LOCALSTRIPE_KEY, STRIPE_API_BASE=direct)
            env |= {"DB_COMMAND_TIMEOUT_S": "2"}
            try:
                with backend(env, work, log=log) as running:
                    base = f"http://127.0.0.1:{running.gateway_port}"
                    wait_until_routed(base, API_KEY)
                    customers = asyncio.run(customers_of(direct))
                    hook_url = f"{base}/webhooks/stripe"
                    options = ["--secret", SECRET, "--invoices", str(invoices), "--lifecycle", "long"]
                    options += ["--processes", "1", "--concurrency", "8", "--seconds", str(STORM_S)]
                    sender = subprocess.Popen(
                        [sys.executable, "-m", "bench.webhook_load", "--url", hook_url, *options, "--failure-times"],
                        cwd=ROOT,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    # The callers run in a process of their own: this one forks Postgres's
                    # tools, and a fork beside gRPC's threads may crash the child.
                    spawn = multiprocessing.get_context("spawn")
                    stop, results = spawn.Event(), spawn.Queue()
                    target = f"127.0.0.1:{running.grpc_port}"
                    callers = spawn.Process(
                        target=_run_callers, args=(base, target, customers, run, stop, results), daemon=True
                    )
                    try:
                        callers.start()
                        failovers = _fail_over_twice(pair, url, unique, sender)
                        out, _ = sender.communicate(timeout=600)
                        time.sleep(1)  # Creates and reads after the last failover, too
                        stop.set()
                        load: Load = results.get(timeout=120)
                        callers.join(timeout=30)
                    finally:  # a failure above must not leave the load running
                        stop.set()
                        if sender.poll() is None:
                            sender.kill()
                        if callers.is_alive():
                            callers.terminate()
                    storm = json.loads(out.strip().splitlines()[-1])
                    applications = event_applications(running.webhook_port)
                figures: dict[str, Any] = {"invoices": invoices, "deliveries": storm["deliveries"]}
                figures["webhook_answers"] = storm["answers"]
                figures |= asyncio.run(verify(url, invoices, applications))
                figures["acknowledged_events_lost"] = figures["events_expected"] - figures["events_recorded"]
                figures["answers"] = {kind: dict(calls.answers) for kind, calls in load.calls.items()}
                figures |= asyncio.run(_orders(url, direct, load.orders, run))
            finally:
                emulator.stop()
    finally:
        pair.stop()
    figures |= _gaps(load, [(t, a) for t, a in storm["failures_at"]], failovers)
    for failover in failovers:
        failover.pop("killed_at")
        failover.pop("rejoined_at")
    figures["failovers"] = failovers
    figures["ok"] = (
        figures["ok"]
        and figures["orders_ok"]
        and all(f["storm_running"] and f["webhooks"]["failed"] for f in failovers)
        and not figures["failures_outside_failovers"]
        and not figures["answers_not_allowed"]
        and all(calls.answers for calls in load.calls.values())
    )
    print(json.dumps(figures))
    if not figures["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
