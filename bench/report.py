"""`make bench`'s report: each case's label (written once: the run measures by them and
the ratios find cases by them), one row per case from the rounds, the ratios the targets are
judged by, and the table, JSON and chart written under results/."""

from __future__ import annotations

import json
import shutil
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.validation import DEFAULT_MAX_OFFSET

# Each case's label, written once: the report and the ratios find cases by these.
CEILING = "framework ceiling (bare grpc.aio)"
GET = "GetInvoice gRPC"
REST_GET = "GET /invoices/{id} via Envoy"
PEER_GET = "GET /invoices/{id}, FastAPI peer"
PAGE_1 = "ListInvoices page 1 + count"
PROXY_CEILING = "proxy ceiling (Envoy direct)"
GET_4_PROCS = "GetInvoice gRPC, 4 client procs"
GET_UNCACHED = "GetInvoice gRPC, RECORD_CACHE_SIZE=0"
WEBHOOKS = "webhooks via Envoy (30% dup)"
PAGE_SIZE = 20
DEEP_PAGE = 20_000
# Deeper numbered pages are refused (LIST_MAX_OFFSET): the deepest one served is measured.
DEEPEST_NUMBERED = DEFAULT_MAX_OFFSET // PAGE_SIZE + 1
DEEP_TOKEN = f"ListInvoices page {DEEP_PAGE:,} (token)"
DEEPEST_NUMBERED_PAGE = f"ListInvoices page {DEEPEST_NUMBERED:,} (page/limit, the deepest LIST_MAX_OFFSET allows)"


def _chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in results]
    fig, ax = plt.subplots(figsize=(11, 5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["p50_ms"] for r in results], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [r["p99_ms"] for r in results], width=0.4, label="p99")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("InvoiceService latency percentiles per case")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _collapse(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case: a case measured in rounds keeps its median round by req/s (the
    lower middle one for an even count) and lists every round under `rounds`."""
    rows: list[dict[str, Any]] = []
    for r in results:
        if "round" not in r:
            rows.append(r)
        elif not any(row["case"] == r["case"] for row in rows):
            runs = sorted((x for x in results if x["case"] == r["case"]), key=lambda x: x["rps"])
            keep = {k: v for k, v in runs[(len(runs) - 1) // 2].items() if k != "round"}
            order = sorted(runs, key=lambda x: x["round"])
            rows.append(keep | {"rounds": [{k: x[k] for k in ("rps", "p50_ms", "p99_ms")} for x in order]})
    return rows


def _paired(results: list[dict[str, Any]], a: str, b: str, figure: str) -> list[float]:
    """`a`'s figure over `b`'s, round by round."""
    rounds = sorted({r["round"] for r in results if "round" in r})
    value = {(r["case"], r["round"]): r[figure] for r in results if "round" in r}
    return [value[a, k] / value[b, k] for k in rounds]


def report(
    results: list[dict[str, Any]],
    data: dict[str, Any],
    machine: dict[str, Any],
    n: int,
    out_dir: Path,
    watches: list[dict[str, Any]],
    creates: list[dict[str, Any]],
) -> None:
    paired = {
        "REST get / gRPC get throughput (>= 0.8)": _paired(results, REST_GET, GET, "rps"),
        "REST get via Envoy / FastAPI peer throughput (>= 1.0)": _paired(results, REST_GET, PEER_GET, "rps"),
        "gRPC get / framework ceiling throughput (>= 0.7)": _paired(results, GET, CEILING, "rps"),
        # Both read Postgres: a page against one record's read (a cached Get reads none).
        "list page 1 p50 / uncached get p50 (<= 2)": _paired(results, PAGE_1, GET_UNCACHED, "p50_ms"),
        "gRPC get / uncached gRPC get throughput (the record cache)": _paired(results, GET, GET_UNCACHED, "rps"),
    }
    service_cases = {GET, REST_GET, PAGE_1, GET_4_PROCS, DEEP_TOKEN, DEEPEST_NUMBERED_PAGE}
    peak_rss = max(r["peak_rss_mb"] for r in results if r["case"] in service_cases)
    results = _collapse(results)
    by = {r["case"]: r for r in results}
    get, page1 = by[GET], by[PAGE_1]
    deep = by[DEEP_TOKEN]
    hooks = by[WEBHOOKS]
    ratios: dict[str, float | str] = {key: round(statistics.median(values), 2) for key, values in paired.items()}
    ratios |= {
        "deep token page p50 / page 1 p50 (<= 1.5)": round(deep["p50_ms"] / page1["p50_ms"], 2),
        "webhook events/s (>= 1000)": hooks["rps"],
        "server peak RSS MB (<= 200)": peak_rss,  # over every round
        "client check: 4 procs / 2 procs get rps (~1 = client not the bottleneck)": round(
            by[GET_4_PROCS]["rps"] / get["rps"], 2
        ),
    }
    for c in creates:
        ratios[f"Stripe calls per Create, {c['items']} items (4)"] = c["stripe_calls_per_create"]
        ratios[f"Create p50 / p99 ms, {c['items']} items"] = f"{c['p50_ms']} / {c['p99_ms']}"
    for w in watches:
        ratios[f"watch delay p50 / p99 ms, {w['watchers']} watchers"] = f"{w['delay_p50_ms']} / {w['delay_p99_ms']}"
        ratios[f"server peak RSS MB, {w['watchers']} watchers (<= 200)"] = w["server_peak_rss_mb"]
    per_round = {key: [round(v, 2) for v in values] for key, values in paired.items()}
    stamp = datetime.now(UTC)
    document = {
        "date": stamp.isoformat(timespec="seconds"),
        "invoices": n,
        "machine": machine,
        "load_s": data["load_s"],
    }
    document |= {"results": results, "ratios": ratios, "ratios_per_round": per_round, "plans": data["plans"]}
    document |= {"watches": watches, "creates": creates}
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench-{stamp:%Y%m%d-%H%M%S}"
    (out_dir / f"{name}.json").write_text(json.dumps(document, indent=2, default=str))
    _chart(results, out_dir / f"{name}.png")
    shutil.copyfile(out_dir / f"{name}.json", out_dir / "latest.json")
    shutil.copyfile(out_dir / f"{name}.png", out_dir / "latest.png")
    print(f"\n{'case':<36}{'tool':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'RSS MB':>9}")
    for r in results:
        print(
            f"{r['case']:<36}{r['tool']:<24}{r['rps']:>10.1f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['peak_rss_mb']:>9.1f}"
        )
    print("\nratios (paired cases: the median of the rounds' ratios; each round's in brackets):")
    for key, value in ratios.items():
        rounds = f"  {per_round[key]}" if key in per_round else ""
        print(f"  {key}: {value}{rounds}")
    print(
        f"\nwebhooks: {hooks.get('deliveries')} deliveries, {hooks.get('retries')} retries,"
        f" events recorded {hooks.get('events_recorded')}, invoices {hooks.get('invoices_recorded')}"
        f" (paid: {hooks.get('invoices_paid')}); nothing lost or doubled: {hooks.get('nothing_lost_or_doubled')}"
    )
    print(f"results: {out_dir / name}.json and .png")
