"""The benchmark at a small size, so that it never rots: it runs every case against the
real stack and writes its files. Timings are not asserted here (machines are noisy);
the webhook case's correctness is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tools.stack import ROOT


def test_the_benchmark_runs_every_case_and_writes_its_results(tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_INVOICES": "2000", "BENCH_SECONDS": "1", "BENCH_WEBHOOK_INVOICES": "60"}
    env["BENCH_ROUNDS"] = "2"
    env["BENCH_RESULTS"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "bench.run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    document = json.loads((tmp_path / "latest.json").read_text())
    cases = {r["case"] for r in document["results"]}
    assert len(cases) == 9
    assert all(r["calls"] > 0 for r in document["results"])
    assert (tmp_path / "latest.png").stat().st_size > 1000
    webhooks = next(r for r in document["results"] if r["case"].startswith("webhooks"))
    assert webhooks["nothing_lost_or_doubled"] is True
    assert "Index" in document["plans"]["deep page_token"]
    assert "ratios (paired cases" in run.stdout
    # The compared cases ran in both rounds, and each ratio is the median of its rounds'.
    assert [len(r.get("rounds", [])) for r in document["results"]].count(2) == 4
    for key, values in document["ratios_per_round"].items():
        assert len(values) == 2
        assert min(values) <= document["ratios"][key] <= max(values)
