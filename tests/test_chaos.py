"""`make chaos` at a reduced size: the webhook storm with Postgres stopped halfway, and
Creates through a fault-injecting Stripe proxy. The full size (1,000 invoices and 10,000
deliveries; 1,000 Creates) is `make chaos`; restart under load is tests/test_restart.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tools.stack import ROOT


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
    figures = _scenario("creates", CHAOS_CREATES="60", CHAOS_FAULT_RATE="0.4")
    assert figures["stripe_invoices"] == figures["keys_with_one_invoice"] == figures["rows"] == 60
    assert figures["keys_with_several_invoices"] == figures["invoices_without_their_one_item"] == 0
    assert figures["answers_naming_another_invoice"] == figures["create_records_naming_another_invoice"] == 0
    assert figures["rows_disagreeing_with_stripe"] == 0
    assert figures["replays_naming_another_invoice"] == 0
    # The faults really happened, before and after Stripe did the work, and some reached callers.
    faults = figures["stripe_calls_by_fault"]
    assert faults.get("drop_after", 0) + faults.get("error_after", 0) + faults.get("stall_after", 0) > 0
    assert faults.get("drop_before", 0) + faults.get("error_before", 0) + faults.get("stall_before", 0) > 0
    assert figures["answers"].get("503", 0) > 0
