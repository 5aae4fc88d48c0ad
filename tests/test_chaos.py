"""`make chaos` at a reduced size: the webhook storm with Postgres stopped halfway. The
full size (1,000 invoices, 10,000 deliveries) is `make chaos`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tools.stack import ROOT


def test_a_webhook_storm_through_a_postgres_restart_loses_and_doubles_nothing() -> None:
    env = {**os.environ, "CHAOS_INVOICES": "100", "CHAOS_PG_DOWN_S": "2"}
    run = subprocess.run(
        [sys.executable, "-m", "chaos.storm"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["deliveries"] == 1000
    assert figures["events_recorded"] == figures["events_expected"] == 700
    assert figures["events_doubled"] == 0
    assert figures["invoices_in_wrong_state"] == 0
    assert figures["count_matches_rows"] is True
    # Postgres really was away while deliveries arrived: some were answered 503 and retried.
    assert figures["answers"].get("503", 0) > 0
    assert figures["retries"] >= figures["answers"]["503"]
