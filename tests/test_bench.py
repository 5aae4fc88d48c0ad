"""The benchmark at a small size, so that it never rots: it runs every case against the
real stack and writes its files. Timings are not asserted here (machines are noisy);
the webhook case's correctness is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from service.storage import Storage
from tests.helpers import API_KEY, Stack, make_invoice, save_invoice
from tools.stack import ROOT, free_port, start_python


def test_the_benchmark_runs_every_case_and_writes_its_results(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_INVOICES": "2000", "BENCH_SECONDS": "1", "BENCH_WEBHOOK_INVOICES": "60"}
    env["BENCH_ROUNDS"] = "2"
    env |= {"BENCH_WATCHERS": "1,20", "BENCH_WATCH_EVENTS": "10", "BENCH_CREATES": "2"}
    env["BENCH_RESULTS"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "bench.run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    document = json.loads((tmp_path / "latest.json").read_text())
    cases = {r["case"] for r in document["results"]}
    assert len(cases) == 11
    assert all(r["calls"] > 0 for r in document["results"])
    assert (tmp_path / "latest.png").stat().st_size > 1000
    webhooks = next(r for r in document["results"] if r["case"].startswith("webhooks"))
    assert webhooks["nothing_lost_or_doubled"] is True
    assert "Index" in document["plans"]["deep page_token"]
    assert "ratios (paired cases" in run.stdout
    # A Create is 4 Stripe calls however many items it has (#11), and every watcher saw every change.
    assert [(c["items"], c["stripe_calls_per_create"]) for c in document["creates"]] == [(1, 4), (10, 4), (100, 4)]
    assert [(w["watchers"], w["received"] == w["expected"]) for w in document["watches"]] == [(1, True), (20, True)]
    # The compared cases ran in both rounds, and each ratio is the median of its rounds'.
    assert [len(r.get("rounds", [])) for r in document["results"]].count(2) == 6
    for key, values in document["ratios_per_round"].items():
        assert len(values) == 2
        assert min(values) <= document["ratios"][key] <= max(values)


async def test_the_peer_answers_the_gateways_json_and_refuses_as_it_does(
    http: httpx.AsyncClient, stack: Stack, stack_store: Storage, tmp_path: Path
) -> None:
    """The comparison is fair only if the peer does the same work: the same record JSON,
    the same key check, the same errors."""
    invoice = await save_invoice(stack_store, make_invoice(7))
    port = free_port()
    argv = ["-m", "bench.peer", "--dsn", stack.database, "--port", str(port), "--api-keys", API_KEY]
    with (tmp_path / "peer.log").open("w") as log:
        peer, _ = start_python("peer", argv, dict(os.environ), log=log)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as direct:
                for path in (f"/admin/api/invoices/{invoice.stripe_invoice_id}", f"/admin/api/invoices/{invoice.id}"):
                    ours, theirs = await http.get(path), await direct.get(path, headers={"Api-Key": API_KEY})
                    assert (theirs.status_code, theirs.json()) == (ours.status_code, ours.json())
                assert (await direct.get(f"/admin/api/invoices/{invoice.id}")).status_code == 401
                missing = await direct.get("/admin/api/invoices/in_nope", headers={"Api-Key": API_KEY})
                assert (missing.status_code, missing.json()["code"]) == (404, 5)
        finally:
            peer.stop()
