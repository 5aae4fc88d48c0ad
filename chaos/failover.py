"""Postgres failover under load, under a real manager: the server and the sidecar run on a
three-node Patroni cluster (tools/patroni.py: synchronous, etcd as its store), given one
multi-host DATABASE_URL with `target_session_attrs=read-write`. While REST readers, a
direct gRPC reader, writers of keyed Creates, watchers (chaos/load.py) and a webhook storm
(CHAOS_FAILOVER_INVOICES invoices' events, 30% twice, each retried until answered 2xx, as
Stripe does) run, each fault of CHAOS_FAILOVER_FAULTS (chaos/faults.py: the primary
killed, frozen past the leader ttl, cut off past it; etcd lost; the service's own hosts
cut from Postgres) strikes in turn, once the cluster is whole again after the one before.
Nothing is restarted but what a fault took.

Creates call Stripe through chaos/stripe_proxy.py, which holds Stripe's answers across the
moment each failover strikes: at least one Create is cut off between a Stripe call and its
answer, and must be resumed by its key to its one invoice. The emulator's webhooks reach
the sidecar, so the records are completed by Stripe's events and compared with Stripe's
invoices field by field at the end.

Afterwards: every event recorded and applied once, each order one Stripe invoice with its
one item and none charged twice, one `ok` audit entry per answered Create, every watcher
saw every change of the feed, the former primary is a standby holding nothing the leader
lacks, and every failed call failed with 503 (REST) or UNAVAILABLE (gRPC) while a fault
was under way. Prints the figures (per fault: until when each kind of call failed, the
longest any call waited) as JSON; exits 1 if anything is lost, doubled or answered
otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import asyncpg

from chaos import API_KEY, STRIPE_LIKE_DELIVERIES, stack_env
from chaos.creates import customers_of
from chaos.faults import FAULTS, born_in, remove_cgroup, strike
from chaos.load import Load, run_callers
from chaos.records import feed, orders, records_against_stripe, watched
from chaos.storm import STORM_PREFIX, applied_once, event_applications, events_recorded, verify
from service import storage
from service.dblink import DEFAULT_BUDGET_S
from service.storage.connecting import CONNECTION_ERRORS
from tools.patroni import CGROUPS, Cluster
from tools.stack import (
    LOCALSTRIPE_KEY,
    ROOT,
    Backend,
    backend,
    free_port,
    register_webhook,
    start_localstripe,
    start_python,
    wait_for,
    wait_until_routed,
)

SECRET = "whsec_chaos_failover"  # noqa: S105 - a local run's own secret
DATABASE = "chaos_failover"
# A failure counts as the fault's if it came from its strike until this long after the
# cluster was whole again (or the next strike); any other failure fails the scenario.
SETTLED_S = 10.0
# The first fault strikes this long after the storm began, each next one this long after
# the cluster was whole again, so that each one's recovery shows.
PAUSE_S = 3.0
# The storm's deliveries are spread over this long per fault, so that every fault (a
# failover is over in about 40 s here, a freeze or a cut lasts 30 s) strikes it.
STORM_S_PER_FAULT = 50.0
# What a caller may be answered while Postgres fails over: "retry later", nothing else.
ALLOWED = {"rest": {"503"}, "grpc": {"UNAVAILABLE"}, "creates": {"503"}, "webhooks": {"503"}}
# The emulator retries a webhook delivery the sidecar did not take (a fault under way) for
# this long, as Stripe does for days: sent once, 6 records in the first run were never
# completed by their events.
WEBHOOK_RETRY_S = 300.0
# The rule for every call: its answer ("retry later" at worst) within the service's
# DB_COMMAND_TIMEOUT_S plus this margin (the gateway's hop, a loaded 2-core machine), never
# Envoy's 504 after 15 s. A direct gRPC read retries UNAVAILABLE (docs/grpc-clients.md's service
# config: 5 attempts, backoffs 0.1 s doubling to 1 s) and may wait those out as well.
WAIT_MARGIN_S = 2.0
WAIT_BOUND_S = {"rest": DEFAULT_BUDGET_S + WAIT_MARGIN_S, "creates": DEFAULT_BUDGET_S + WAIT_MARGIN_S}
WAIT_BOUND_S |= {"webhooks": DEFAULT_BUDGET_S + WAIT_MARGIN_S, "grpc": DEFAULT_BUDGET_S + 1.5 + WAIT_MARGIN_S}
# The faults after which another node leads: each must cut off a Create mid-Stripe-call.
FAILOVERS = {"kill", "freeze", "cut"}
# The figures the scenario is judged by, with the value each must have.
ZERO = (
    "acknowledged_events_lost",
    "events_doubled",
    "events_uncounted",
    "invoices_not_created_once",
    "invoices_in_wrong_state",
    "orders_charged_twice",
    "watchers_that_missed_a_change",
    "changes_seen_twice",
)


def _gaps(load: Load, storm: dict[str, Any], faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fault and kind of call: how many failed, with what, until how long after the
    strike, and the longest any call waited before its answer."""
    failures = {kind: [(t, a) for t, a, _ in calls.failures] for kind, calls in load.calls.items()}
    failures["webhooks"] = [(t, a) for t, a in storm["failures_at"]]
    slow = {kind: calls.slow for kind, calls in load.calls.items()} | {"webhooks": storm["slow_at"]}
    ends = [f["struck_at"] for f in faults[1:]] + [float("inf")]
    windows = [(f["struck_at"], min(f["rejoined_at"] + SETTLED_S, end)) for f, end in zip(faults, ends, strict=True)]
    for fault, (start, end) in zip(faults, windows, strict=True):
        for kind, found in failures.items():
            inside = [(t, answer) for t, answer in found if start <= t < end]
            fault[kind] = {
                "failed": len(inside),
                "answers": dict(Counter(answer for _, answer in inside)),
                "failing_until_s": round(max((t for t, _ in inside), default=start) - start, 2),
                "longest_wait_s": round(max((s for t, s in slow[kind] if start <= t < end), default=0.0), 2),
            }
    outside = {
        kind: dict(Counter(a for t, a in found if not any(start <= t < end for start, end in windows)))
        for kind, found in failures.items()
    }
    disallowed = {kind: sorted({a for _, a in found} - ALLOWED[kind]) for kind, found in failures.items()}
    return {
        "failures_outside_faults": {k: v for k, v in outside.items() if v},
        "answers_not_allowed": {k: v for k, v in disallowed.items() if v},
        "longest_wait_s": max((s for found in slow.values() for _, s in found), default=0.0),
    }


def _proxy(proxy: str, verb: str) -> list[str]:
    """Holds or releases Stripe's answers at the proxy (or reads what it holds): the
    Idempotency-Keys of the calls held."""
    method = "GET" if verb == "held" else "POST"
    url = f"{proxy}/_proxy/{verb}"
    request = urllib.request.Request(url, data=None if method == "GET" else b"", method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - the run's own proxy
        held: list[str] = json.load(reply).get("held", [])
    return held


def _holding(proxy: str, fault: str, held: list[str]) -> tuple[Callable[[], None], Callable[[], None]]:
    """For a failover: Stripe's answers held from just before the strike (once one is held)
    to just after it, their Creates' keys kept in `held`. Nothing for the store's loss."""

    def before() -> None:
        if fault in FAILOVERS:
            _proxy(proxy, "hold")
            wait_for(lambda: _proxy(proxy, "held") or None, "a Stripe answer held", 60, 0.05)

    def after() -> None:
        if fault in FAILOVERS:
            # The service's Stripe key is `invoice-service:<Create's key>:<generation>:<step>`.
            held.extend(key.split(":")[1] for key in _proxy(proxy, "release") if key.count(":") == 3)

    return before, after


def _strike_each(
    cluster: Cluster, faults: list[str], url: str, proxy: str, sender: subprocess.Popen[str], run: str
) -> list[dict[str, Any]]:
    """Each fault once the cluster is whole again after the last (and PAUSE_S on), while
    the storm runs."""
    records: list[dict[str, Any]] = []
    for fault in faults:
        after = time.time() + PAUSE_S

        def recorded(after: float = after) -> bool:
            try:
                return time.time() >= after and (asyncio.run(events_recorded(url)) > 0 or sender.poll() is not None)
            except CONNECTION_ERRORS:
                return False

        wait_for(lambda: recorded() or None, "the storm under way", 300)
        held: list[str] = []
        # Whether the fault struck the storm: asked as it strikes, not once the cluster is
        # whole again (a slow rejoin outlasted the storm once, in a fault that struck it).
        storm_running = sender.poll() is None
        record = strike(cluster, fault, DATABASE, f"chaos-{run}", _holding(proxy, fault, held), f"chaos-{run}-service")
        record["storm_running"] = storm_running
        record["held_creates"] = sorted(set(held))
        records.append(record)
    return records


def _cut_off(load: Load, faults: list[dict[str, Any]]) -> None:
    """Per fault, the Creates whose Stripe answer was held across the strike and that were
    then answered a failure: cut off between a Stripe call and its answer."""
    failed_after: dict[str, float] = {}
    for t, _, key in load.calls["creates"].failures:
        failed_after[key] = max(failed_after.get(key, 0.0), t)
    for fault in faults:
        held = fault.pop("held_creates")
        cut = [k for k in held if failed_after.get(k, 0.0) >= fault["struck_at"]]
        fault["creates_held_across_the_strike"] = len(held)
        fault["creates_cut_off_after_stripe"] = len(cut)
        fault["cut_off_resumed_to_one_invoice"] = sum(1 for k in cut if k in load.orders.invoice_of)


@contextlib.contextmanager
def _service(env: dict[str, str], work: Path, log: IO[str], cgroup: str) -> Iterator[Backend]:
    """The stack (tools.stack.backend), its processes born in `cgroup` for the isolate fault."""
    try:
        with contextlib.ExitStack() as stack:
            with born_in(cgroup):
                running = stack.enter_context(backend(env, work, log=log))
            yield running
    finally:
        if (CGROUPS / cgroup).is_dir():
            remove_cgroup(cgroup)


def _storm(hook_url: str, invoices: int, seconds: float) -> subprocess.Popen[str]:
    options = ["--secret", SECRET, "--invoices", str(invoices), "--lifecycle", "long", "--failure-times"]
    options += ["--processes", "1", "--concurrency", "8", "--seconds", str(seconds)]
    argv = [sys.executable, "-m", "bench.webhook_load", "--url", hook_url, *options]
    # A session of its own, so that stopping it stops its worker processes too: a worker
    # left behind keeps the pipe open and make chaos waiting (a fresh clone's run did).
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)


async def _storm_figures(url: str, invoices: int, applications: int) -> dict[str, Any]:
    """The storm's figures (chaos/storm.py), with the storm's own events told apart from
    those the emulator sent for the Creates."""
    figures = await verify(url, invoices, applications)
    conn = await asyncpg.connect(url)
    try:
        ours = await conn.fetchval(
            "SELECT count(*) FROM stripe_events WHERE stripe_invoice_id LIKE $1", f"{STORM_PREFIX}%"
        )
    finally:
        await conn.close()
    figures["storm_events_recorded"] = ours
    figures["acknowledged_events_lost"] = figures["events_expected"] - ours
    return figures


def main() -> None:
    invoices = int(os.environ.get("CHAOS_FAILOVER_INVOICES", "1500"))
    faults = [f for f in os.environ.get("CHAOS_FAILOVER_FAULTS", ",".join(FAULTS)).split(",") if f]
    work = ROOT / ".build" / "chaos-failover"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cluster = Cluster(work / "pg")
    run = f"failover-{uuid.uuid4().hex[:8]}"
    stripe_port = free_port()
    started = time.monotonic()
    try:
        cluster.start()
        asyncio.run(storage.fresh_database(cluster.dsn(first=cluster.leader()), DATABASE))
        cluster.replicated(DATABASE)
        url = cluster.dsn(DATABASE)
        with (work / "stack.log").open("w") as log:
            emulator = start_localstripe(
                stripe_port, fresh=True, log=log, webhook_retry_s=WEBHOOK_RETRY_S, disorder=STRIPE_LIKE_DELIVERIES
            )
            direct = f"http://127.0.0.1:{stripe_port}"
            argv = ["-m", "chaos.stripe_proxy", "--upstream", direct, "--fault-rate", "0"]
            proxy_part, proxy_ports = start_python("stripe-proxy", argv, dict(os.environ), log=log)
            proxy = f"http://127.0.0.1:{proxy_ports['http']}"
            env = stack_env(url, work, SECRET, STRIPE_API_KEY=LOCALSTRIPE_KEY, STRIPE_API_BASE=proxy)
            try:
                with _service(env, work, log, f"chaos-{run}-service") as running:
                    base = f"http://127.0.0.1:{running.gateway_port}"
                    wait_until_routed(base, API_KEY)
                    register_webhook(stripe_port, f"{base}/webhooks/stripe", SECRET)
                    customers = asyncio.run(customers_of(direct))
                    spawn = multiprocessing.get_context("spawn")
                    watching, stop, inbox, outbox = spawn.Event(), spawn.Event(), spawn.Queue(), spawn.Queue()
                    target = f"127.0.0.1:{running.grpc_port}"
                    args = (base, target, customers, run, (watching, stop), (inbox, outbox))
                    callers = spawn.Process(target=run_callers, args=args, daemon=True)
                    sender: subprocess.Popen[str] | None = None
                    try:
                        callers.start()
                        if not watching.wait(90):
                            raise RuntimeError("the watchers did not start")
                        sender = _storm(f"{base}/webhooks/stripe", invoices, STORM_S_PER_FAULT * len(faults))
                        struck = _strike_each(cluster, faults, url, proxy, sender, run)
                        out, _ = sender.communicate(timeout=900)
                        time.sleep(1)  # Creates and reads after the last fault, too
                        stop.set()
                        # Until every record agrees with Stripe: the emulator's late events
                        # have landed, so the feed read next is the whole of it.
                        asyncio.run(records_against_stripe(url, direct))
                        expected = asyncio.run(feed(url))
                        inbox.put(len(expected))
                        load: Load = outbox.get(timeout=300)
                        callers.join(timeout=30)
                        # Compared again once the callers are done: a Create still in flight
                        # when they were told to stop made an invoice after the first
                        # comparison (make test on a fresh clone: 868 answered, 867 compared).
                        figures: dict[str, Any] = asyncio.run(records_against_stripe(url, direct))
                    finally:  # a failure above must not leave the load running
                        stop.set()
                        if sender is not None:
                            with contextlib.suppress(ProcessLookupError):
                                os.killpg(sender.pid, signal.SIGKILL)
                        if callers.is_alive():
                            callers.terminate()
                    storm = json.loads(out.strip().splitlines()[-1])
                    applications = event_applications(running.webhook_port)
                figures |= {
                    "invoices": invoices,
                    "deliveries": storm["deliveries"],
                    "webhook_answers": storm["answers"],
                }
                figures |= asyncio.run(_storm_figures(url, invoices, applications))
                figures["answers"] = {kind: dict(calls.answers) for kind, calls in load.calls.items()}
                figures |= asyncio.run(orders(url, direct, load.orders, run, ALLOWED["creates"]))
                figures |= watched(expected, load.watched)
                figures["watch_stream_ends"] = dict(load.watch_ends)
            finally:
                proxy_part.stop()
                emulator.stop()
    finally:
        cluster.stop()
    figures |= _gaps(load, storm, struck)
    _cut_off(load, struck)
    for fault in struck:
        fault.pop("struck_at")
        fault.pop("rejoined_at")
    figures["faults"] = struck
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["wait_bound_s"] = WAIT_BOUND_S
    figures["ok"] = _judge(figures, load)
    print(json.dumps(figures))
    if not figures["ok"]:
        sys.exit(1)


def _judge(figures: dict[str, Any], load: Load) -> bool:
    faults = figures["faults"]
    failovers = [f for f in faults if f["fault"] in FAILOVERS]
    isolations = [f for f in faults if f["fault"] == "isolate"]
    return bool(
        all(figures[k] == 0 for k in ZERO)
        and figures["storm_events_recorded"] == figures["events_expected"]
        and applied_once(figures)
        and figures["invoice_rows"] == figures["invoices"]
        and figures["count_matches_rows"]
        and figures["orders_ok"]
        and not figures["record_fields_disagreeing_with_stripe"]
        and all(f["storm_running"] and f["rest"]["failed"] and f["webhooks"]["failed"] for f in failovers)
        and all(f["creates_cut_off_after_stripe"] > 0 for f in failovers)
        and all(f["leader_kept"] and f["rest"]["failed"] and f["webhooks"]["failed"] for f in isolations)
        and all(f[kind]["longest_wait_s"] <= bound for f in faults for kind, bound in WAIT_BOUND_S.items())
        and all(f.get("rows_only_on_former_primary", 0) == 0 for f in faults)
        and all(f.get("former_primary_in_recovery", True) for f in faults)
        and all(len(set(f["timelines"].values())) == 1 for f in faults)
        and not figures["failures_outside_faults"]
        and not figures["answers_not_allowed"]
        and all(calls.answers for calls in load.calls.values())
    )


if __name__ == "__main__":
    main()
