"""`make chaos` at a reduced size: the webhook storm with Postgres stopped halfway, Creates
through a fault-injecting Stripe proxy, and the Patroni cluster's primary killed, frozen
and cut off under load. The full size (1,000 invoices and 10,000 deliveries; 1,000
Creates; 1,500 invoices' events through those three faults and the loss of etcd) is
`make chaos`; restarts under load are tests/test_restart.py and tests/test_rolling.py."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from chaos import stripe_proxy
from tools.stack import ROOT

if TYPE_CHECKING:
    from _typeshed import SupportsLenAndGetItem

T = TypeVar("T")


def _scenario(module: str, timeout: float = 300, **sizes: str) -> dict[str, Any]:
    """Runs `python -m chaos.<module>` with reduced sizes; its figures, once it passed."""
    env = {**os.environ, **sizes}
    argv = [sys.executable, "-m", f"chaos.{module}"]
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return figures


def test_a_webhook_storm_through_a_postgres_restart_loses_and_doubles_nothing() -> None:
    figures = _scenario("storm", CHAOS_INVOICES="100", CHAOS_PG_DOWN_S="2")
    assert figures["deliveries"] == 1000
    assert figures["events_recorded"] == figures["events_expected"] == 700
    # Each event applied exactly once, by the count its applying transaction kept (a double
    # would show as 2 whatever it was answered), each invoice created by one event.
    assert figures["events_doubled"] == figures["events_uncounted"] == 0
    assert figures["event_applications"] == figures["event_applications_max"] * 700 == 700
    # The answers agree with the count but for those lost with Postgres (a delivery applied,
    # its answer failed, retried and then found `duplicate`).
    failed_answers = sum(n for status, n in figures["answers"].items() if status != "200")
    assert 0 <= figures["events_applied_unanswered"] <= failed_answers
    assert figures["invoices_not_created_once"] == 0
    assert figures["invoices_in_wrong_state"] == 0
    assert figures["count_matches_rows"] is True
    # Postgres really was away while deliveries arrived: some were answered 503 and retried.
    assert figures["answers"].get("503", 0) > 0
    assert figures["retries"] >= figures["answers"]["503"]


def test_creates_under_stripe_faults_make_exactly_one_invoice_per_key() -> None:
    figures = _scenario("creates", CHAOS_CREATES="40", CHAOS_KEYLESS="4", CHAOS_FAULT_RATE="0.4")
    assert figures["stripe_invoices"] == figures["orders"] == figures["rows"] == 44
    assert figures["keys_with_one_invoice"] == 40
    assert figures["keyless_orders_with_one_invoice"] == 4
    assert figures["stripe_invoices_per_order_max"] == 1
    assert figures["orders_charged_twice"] == 0
    assert figures["keys_with_several_invoices"] == figures["invoices_without_their_one_item"] == 0
    # Some Creates were cut off before the emulator forgot its keys, and resumed after.
    assert figures["cut_off_before_stripe_forgot_its_keys"] > 0
    assert figures["answers_naming_another_invoice"] == figures["create_records_naming_another_invoice"] == 0
    assert figures["rows_disagreeing_with_stripe"] == 0
    assert figures["replays_naming_another_invoice"] == 0
    # Every fifth keyed order refunded by half through the same faults: one credit note each,
    # for the amount asked, none refunded twice.
    assert figures["refunds_asked"] == figures["refunds_answered"] == figures["credit_notes"] == 8
    assert figures["credit_notes_per_refund_max"] == 1
    assert figures["orders_refunded_twice"] == figures["refunds_not_as_asked"] == figures["credit_notes_not_asked"] == 0
    # The emulator's webhooks, each applied once by the count its applying transaction kept.
    assert figures["events_doubled"] == figures["events_uncounted"] == 0
    assert figures["event_applications"] == figures["events_recorded"] > 0
    # The faults really struck calls (the proxy counts a fault once it struck, a stall only
    # if its caller timed out meanwhile), before and after Stripe did the work, and some
    # reached callers.
    faults = figures["stripe_calls_by_fault"]
    assert all(faults.get(fault, 0) > 0 for fault in stripe_proxy.FAULTS), faults
    assert figures["answers"].get("503", 0) > 0
    # The stalls had an effect: the service timed out and sent those calls again.
    assert faults["stalled_calls_retried"] > 0


@pytest.mark.skipif(
    os.environ.get("CHAOS_SCENARIO_TESTS") != "1",
    reason="make chaos runs it (scenario `stripe stalls`, in CI too): make test keeps to 10 minutes",
)
def test_creates_under_stripe_stalls_alone_time_out_and_still_make_one_invoice_per_key() -> None:
    """Stalls only, so what callers see is theirs: the service's Stripe calls time out
    (the SDK's one retry too, often), Creates fail and are retried, and the result is
    still the one without faults."""
    figures = _scenario(
        "creates",
        CHAOS_CREATES="10",
        CHAOS_KEYLESS="1",
        CHAOS_FAULT_RATE="0.5",
        CHAOS_STRIPE_FAULTS="stall_before,stall_after",
    )
    faults = figures["stripe_calls_by_fault"]
    assert set(faults) <= {"stall_before", "stall_after", "forwarded_clean", "stalled_calls_retried"}, faults
    assert faults.get("stall_before", 0) > 0
    assert faults.get("stall_after", 0) > 0
    assert faults["stalled_calls_retried"] > 0
    # Observable at the callers: Creates answered 503 and needed more than one attempt.
    assert figures["answers"].get("503", 0) > 0
    assert sum(n for attempts, n in figures["attempts_per_create"].items() if int(attempts) > 1) > 0
    # ...and the result is the no-fault one.
    assert figures["stripe_invoices"] == figures["orders"] == figures["rows"] == 11
    assert figures["keys_with_one_invoice"] == 10
    assert figures["keyless_orders_with_one_invoice"] == 1
    assert figures["orders_charged_twice"] == figures["rows_disagreeing_with_stripe"] == 0


def test_postgres_faults_under_patroni_under_load_lose_and_double_nothing() -> None:
    """The Patroni cluster's primary frozen past the leader ttl and cut off past it,
    mid-storm (make chaos also kills it, loses etcd and cuts the service off): another node
    leads each time, the former one rejoins as a standby
    holding nothing the leader lacks, and the server and the sidecar follow through their
    multi-host DATABASE_URL without a restart."""
    figures = _scenario("failover", timeout=900, CHAOS_FAILOVER_INVOICES="200", CHAOS_FAILOVER_FAULTS="freeze,cut")
    assert figures["storm_events_recorded"] == figures["events_expected"] == 1400
    assert figures["acknowledged_events_lost"] == figures["events_doubled"] == figures["events_uncounted"] == 0
    # Each event (the storm's and the emulator's for the Creates) applied once by its own count.
    assert figures["event_applications"] == figures["events_recorded"]
    assert figures["invoices_not_created_once"] == figures["invoices_in_wrong_state"] == 0
    assert figures["stripe_invoices_per_order_max"] == 1
    assert figures["orders_charged_twice"] == figures["answers_naming_another_invoice"] == 0
    assert figures["orders_answered"] == figures["stripe_invoices"] == figures["records_compared"] > 0
    assert figures["invoices_without_their_one_item"] == 0
    assert figures["create_answers_not_allowed"] == []
    assert figures["orders_without_one_ok_audit_entry"] == figures["audit_attempts_written_twice"] == 0
    # Every record, completed by the emulator's events, agrees with Stripe field by field.
    assert figures["record_fields_disagreeing_with_stripe"] == {}
    # Every watcher saw every change of the feed, once.
    assert figures["changes"] > 0
    assert figures["watchers_that_missed_a_change"] == figures["changes_seen_twice"] == 0
    # Callers were told "retry later" and nothing else, and only while a fault was under way.
    assert figures["answers_not_allowed"] == figures["failures_outside_faults"] == {}
    faults = figures["faults"]
    assert [f["fault"] for f in faults] == ["freeze", "cut"]
    timelines = [set(f["timelines"].values()) for f in faults]
    # Each fault made another node the leader, on a new timeline every node follows.
    assert [len(t) for t in timelines] == [1, 1]
    assert [t.pop() for t in timelines] == [2, 3]
    for fault in faults:
        assert fault["to"] != fault["from"], fault
        assert fault["roles"][fault["from"]] in {"replica", "sync_standby"}
        # The former primary is a standby and holds no row the new leader lacks.
        assert fault["former_primary_in_recovery"] is True
        assert fault["rows_only_on_former_primary"] == 0
        # Each fault struck the storm and the callers: it was not a quiet moment.
        assert fault["storm_running"]
        assert fault["webhooks"]["failed"] > 0 and fault["rest"]["failed"] > 0
        # ...and cut off a Create between a Stripe call and its answer, resumed by its key.
        assert fault["creates_cut_off_after_stripe"] > 0
        assert fault["cut_off_resumed_to_one_invoice"] == fault["creates_cut_off_after_stripe"]


class _Rigged(random.Random):
    """The proxy's random source, rigged: the first `calls` calls get `fault`, later ones none."""

    def __init__(self, fault: str, calls: int = 1_000_000) -> None:
        super().__init__()
        self.fault = fault
        self.calls = calls

    def random(self) -> float:
        self.calls -= 1
        return 0.0 if self.calls >= 0 else 1.0

    def choice(self, seq: SupportsLenAndGetItem[T]) -> T:
        return next(seq[i] for i in range(len(seq)) if seq[i] == self.fault)


STALL_S = 0.5


async def _through_proxy(
    fault: str, *, calls: int = 1, faulty: int = 1_000_000, timeout_s: float = STALL_S / 5
) -> tuple[list[int | None], list[int], list[float], Counter[str]]:
    """`calls` identical calls (one Idempotency-Key) through a proxy whose first `faulty`
    calls get `fault`, each given up after `timeout_s`: each call's status (None: no
    answer), how many calls Stripe had seen when each ended, how long each took, and the
    proxy's stats once its handlers finished."""
    hits: list[str] = []
    got: list[int | None] = []
    seen: list[int] = []
    took: list[float] = []

    async def upstream(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"id": "in_1"})

    stripe_app = web.Application()
    stripe_app.router.add_post("/v1/invoices", upstream)
    async with TestServer(stripe_app) as stripe_server:
        proxy = stripe_proxy.init(str(stripe_server.make_url("")), fault_rate=1.0, stall_s=STALL_S)
        proxy[stripe_proxy.RANDOM] = _Rigged(fault, faulty)
        async with TestServer(proxy) as server:
            for _ in range(calls):
                started = time.monotonic()
                timeout = aiohttp.ClientTimeout(total=timeout_s)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    try:
                        headers = {"Idempotency-Key": "k-1"}
                        async with http.post(server.make_url("/v1/invoices"), data=b"{}", headers=headers) as reply:
                            got.append(reply.status)
                    except (aiohttp.ClientError, TimeoutError):
                        got.append(None)
                seen.append(len(hits))
                took.append(time.monotonic() - started)
            # A stalled handler goes on after its caller left; it counts when it is done.
            await asyncio.sleep(STALL_S + 0.2)
    return got, seen, took, proxy[stripe_proxy.STATS]


@pytest.mark.parametrize(
    ("fault", "status", "forwarded"),
    [
        ("drop_before", None, 0),
        ("drop_after", None, 1),
        ("error_before", 500, 0),
        ("error_after", 500, 1),
        ("stall_before", None, 0),
        ("stall_after", None, 1),
    ],
)
async def test_each_proxy_fault_strikes_at_its_moment(fault: str, status: int | None, forwarded: int) -> None:
    """A fault `_before` strikes before the call reaches Stripe; one `_after` once it has,
    and its caller cannot tell. A stall strikes a caller whose timeout is shorter: it gets
    no answer. The proxy counts the fault as having struck."""
    got, seen, _, stats = await _through_proxy(fault)
    assert (got, seen) == ([status], [forwarded])
    assert stats == {fault: 1}


@pytest.mark.parametrize("fault", ["stall_before", "stall_after"])
async def test_a_stall_a_patient_caller_waits_out_is_slow_but_did_not_strike(fault: str) -> None:
    got, seen, took, stats = await _through_proxy(fault, timeout_s=STALL_S * 4)
    assert (got, seen) == ([200], [1])
    assert took[0] >= STALL_S
    assert stats == {f"{fault}_waited_out": 1}


@pytest.mark.parametrize("fault", ["stall_before", "stall_after"])
async def test_a_call_sent_again_after_a_stall_struck_it_is_counted(fault: str) -> None:
    got, _, _, stats = await _through_proxy(fault, calls=2, faulty=1)
    assert got == [None, 200]
    assert stats == {fault: 1, "stalled_calls_retried": 1, "forwarded_clean": 1}
