"""`make chaos` at a reduced size: the webhook storm with Postgres stopped halfway, and
Creates through a fault-injecting Stripe proxy. The full size (1,000 invoices and 10,000
deliveries; 1,000 Creates) is `make chaos`; restart under load is tests/test_restart.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
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


def _scenario(module: str, **sizes: str) -> dict[str, Any]:
    """Runs `python -m chaos.<module>` with reduced sizes; its figures, once it passed."""
    env = {**os.environ, **sizes}
    argv = [sys.executable, "-m", f"chaos.{module}"]
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return figures


def test_a_webhook_storm_through_a_postgres_restart_loses_and_doubles_nothing() -> None:
    figures = _scenario("storm", CHAOS_INVOICES="100", CHAOS_PG_DOWN_S="2")
    assert figures["deliveries"] == 1000
    assert figures["events_recorded"] == figures["events_expected"] == 700
    assert figures["events_doubled"] == 0
    assert figures["invoices_in_wrong_state"] == 0
    assert figures["count_matches_rows"] is True
    # Postgres really was away while deliveries arrived: some were answered 503 and retried.
    assert figures["answers"].get("503", 0) > 0
    assert figures["retries"] >= figures["answers"]["503"]


def test_creates_under_stripe_faults_make_exactly_one_invoice_per_key() -> None:
    figures = _scenario("creates", CHAOS_CREATES="60", CHAOS_KEYLESS="6", CHAOS_FAULT_RATE="0.4")
    assert figures["stripe_invoices"] == figures["orders"] == figures["rows"] == 66
    assert figures["keys_with_one_invoice"] == 60
    assert figures["keyless_orders_with_one_invoice"] == 6
    assert figures["stripe_invoices_per_order_max"] == 1
    assert figures["orders_charged_twice"] == 0
    assert figures["keys_with_several_invoices"] == figures["invoices_without_their_one_item"] == 0
    # Some Creates were cut off before the emulator forgot its keys, and resumed after.
    assert figures["cut_off_before_stripe_forgot_its_keys"] > 0
    assert figures["answers_naming_another_invoice"] == figures["create_records_naming_another_invoice"] == 0
    assert figures["rows_disagreeing_with_stripe"] == 0
    assert figures["replays_naming_another_invoice"] == 0
    # The faults really happened, before and after Stripe did the work, and some reached callers.
    faults = figures["stripe_calls_by_fault"]
    assert faults.get("drop_after", 0) + faults.get("error_after", 0) + faults.get("stall_after", 0) > 0
    assert faults.get("drop_before", 0) + faults.get("error_before", 0) + faults.get("stall_before", 0) > 0
    assert figures["answers"].get("503", 0) > 0


class _Always(random.Random):
    """The proxy's random source, rigged: every call gets `fault`."""

    def __init__(self, fault: str) -> None:
        super().__init__()
        self.fault = fault

    def random(self) -> float:
        return 0.0

    def choice(self, seq: SupportsLenAndGetItem[T]) -> T:
        return seq[stripe_proxy.FAULTS.index(self.fault)]


@pytest.mark.parametrize(
    ("fault", "status", "forwarded"),
    [
        ("drop_before", None, 0),
        ("drop_after", None, 1),
        ("error_before", 500, 0),
        ("error_after", 500, 1),
        ("stall_before", 200, 1),
        ("stall_after", 200, 1),
    ],
)
async def test_each_proxy_fault_strikes_at_its_moment(fault: str, status: int | None, forwarded: int) -> None:
    """A fault `_before` never reaches Stripe; one `_after` does, and its caller cannot tell."""
    hits: list[str] = []

    async def upstream(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"id": "in_1"})

    stripe_app = web.Application()
    stripe_app.router.add_post("/v1/invoices", upstream)
    async with TestServer(stripe_app) as stripe_server:
        proxy = stripe_proxy.init(str(stripe_server.make_url("")), fault_rate=1.0, stall_s=0.05)
        proxy[stripe_proxy.RANDOM] = _Always(fault)
        async with TestServer(proxy) as server, aiohttp.ClientSession() as http:
            try:
                async with http.post(server.make_url("/v1/invoices"), data=b"{}") as reply:
                    got: int | None = reply.status
            except aiohttp.ClientError:
                got = None
    assert (got, len(hits)) == (status, forwarded)
