"""`make chaos`: every scenario at full size, one after another, each in its own process
(its own Postgres, emulator and stack): the webhook storm through a Postgres restart,
Creates under Stripe faults, faults on a Patroni Postgres cluster under load (its primary
killed, frozen, cut off; its store lost; the service cut from it), make run's lone Postgres
frozen for 20 s, SIGTERM to the lone server under load, a rolling
restart of two servers and two sidecars, and the same callers against the service run from
its images under podman while every pod is replaced (the cluster). Prints each one's
figures and exits 1 if any scenario fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools.stack import ROOT

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
SCENARIOS = {
    "webhook storm": [sys.executable, "-m", "chaos.storm"],
    "creates under Stripe faults": [sys.executable, "-m", "chaos.creates"],
    "postgres faults": [sys.executable, "-m", "chaos.failover"],
    "restart under load": [*PYTEST, "tests/test_restart.py"],
    # make run's single embedded Postgres frozen for 20 s, every DB_* setting at its default.
    "frozen postgres": [*PYTEST, "tests/test_frozen.py"],
    # Three rounds: each server and each sidecar restarted three times (make test: once).
    "rolling restart": [
        *PYTEST,
        "tests/test_rolling.py::test_a_rolling_restart_under_load_fails_no_call_and_loses_nothing",
    ],
    # The same callers, against the service run from its images (make image) under podman.
    "cluster": [sys.executable, "-m", "chaos.cluster"],
    # Creates under Stripe stalls alone (make test leaves it here, to keep to 10 minutes).
    "stripe stalls": [
        *PYTEST,
        "tests/test_chaos.py::test_creates_under_stripe_stalls_alone_time_out_and_still_make_one_invoice_per_key",
    ],
}
ENV = {"CHAOS_ROLLING_ROUNDS": "3", "CHAOS_FROZEN_S": "20", "CHAOS_SCENARIO_TESTS": "1"}


def _figures(out: str, written: Path) -> dict[str, Any] | str:
    """The scenario's figures: those a test wrote to `written`, else its last line if that
    is JSON, else that line as it is."""
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        figures: dict[str, Any] = json.loads(written.read_text() if written.exists() else last)
    except ValueError:
        return last
    return figures


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _failover_table(f: dict[str, Any]) -> list[str]:
    def again(kinds: tuple[str, ...], o: dict[str, Any]) -> str:
        failed = sum(o[k]["failed"] for k in kinds)
        return f"{max(o[k]['failing_until_s'] for k in kinds)} s ({failed})" if failed else "never failed"

    header = ["fault", "new leader after", "whole again after", "reads OK again", "Creates OK again"]
    header += ["webhooks OK again", "longest wait", "answers", "Creates cut off after Stripe"]
    lines = [_row(*header), _row(*["---"] * len(header))]
    for o in f["faults"]:
        kinds = ("rest", "grpc", "creates", "webhooks")
        answers = sorted({a for k in kinds for a in o[k]["answers"]}) or ["none failed"]
        lines.append(
            _row(
                f"{o['fault']} {o['from']} (-> {o['to']})",
                f"{o['promoted_after_s']} s" if "promoted_after_s" in o else "no failover",
                f"{o['rejoined_after_s']} s",
                again(("rest", "grpc"), o),
                again(("creates",), o),
                again(("webhooks",), o),
                f"{max(o[k]['longest_wait_s'] for k in kinds)} s",
                " / ".join(answers),
                o["creates_cut_off_after_stripe"],
            )
        )
    lines.append(
        f"acknowledged events lost {f['acknowledged_events_lost']}, applied twice {f['events_doubled']}"
        f" ({f['storm_events_recorded']} of {f['events_expected']} recorded); Creates {f['orders_answered']},"
        f" Stripe invoices per order at most {f['stripe_invoices_per_order_max']},"
        f" charged twice {f['orders_charged_twice']}; watchers that missed a change"
        f" {f['watchers_that_missed_a_change']} (of {f['changes']} changes); record fields disagreeing"
        f" with Stripe {f['record_fields_disagreeing_with_stripe'] or 0}"
    )
    return lines


def _frozen_table(f: dict[str, Any]) -> list[str]:
    header = ("call", "answers", "longest wait", "served again after the thaw")
    lines = [_row(*header), _row(*["---"] * len(header))]
    for kind, c in f["calls"].items():
        answers = " + ".join(f"{n:,} {answer}" for answer, n in c["answers"].items())
        lines.append(_row(kind, answers, f"{c['longest_wait_s']} s", f"{c['served_again_after_thaw_s']} s"))
    lines.append(f"frozen {f['frozen_s']:.0f} s; bound on any wait {f['bound_s']} s (DB_COMMAND_TIMEOUT_S + margin)")
    return lines


def _rolling_table(f: dict[str, Any]) -> list[str]:
    def answers(counted: dict[str, int]) -> str:
        return " + ".join(f"{n:,} {answer}" for answer, n in counted.items())

    header = ("rounds", "REST reads", "Creates", "direct gRPC reads", "deliveries", "events", "seen per watcher")
    kinds = ("rest_reads", "creates", "direct_grpc_reads", "deliveries")
    watched = ", ".join(f"{n:,}" for n in f["changes_seen_per_watcher"])
    return [
        _row(*header),
        _row(*["---"] * len(header)),
        _row(f["rounds"], *(answers(f[k]) for k in kinds), f"{f['events_sent']:,}", watched),
    ]


def _cluster_table(f: dict[str, Any]) -> list[str]:
    """The rolling table, then each kind's seconds from `podman run` to ready (first start;
    the replacements under load)."""

    def seconds(values: list[float]) -> str:
        return ", ".join(f"{s}" for s in values) or "-"

    starts = [_row("container", "start to ready, s", "replaced under load, s"), _row("---", "---", "---")]
    starts += [_row(k, seconds(v), seconds(f["replaced_start_s"].get(k, []))) for k, v in f["start_s"].items()]
    return [*_rolling_table(f), "", *starts]


# The scenarios whose figures are also printed as docs/reliability.md's tables.
TABLES = {
    "postgres faults": _failover_table,
    "frozen postgres": _frozen_table,
    "rolling restart": _rolling_table,
    "cluster": _cluster_table,
}


def main() -> None:
    """`python -m chaos [NAME ...]`: the named scenarios (CI runs some this way; `-` for a
    space: `postgres-faults`), or all."""
    chosen = [name.replace("-", " ") for name in sys.argv[1:]] or list(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        sys.exit(f"no such scenario: {', '.join(unknown)}; there are: {', '.join(SCENARIOS)}")
    failed = []
    for name in chosen:
        argv = SCENARIOS[name]
        print(f"== {name}", flush=True)
        started = time.monotonic()
        written = ROOT / ".build" / f"chaos-{name.replace(' ', '-')}.json"
        written.unlink(missing_ok=True)
        env = os.environ | ENV | {"CHAOS_FIGURES": str(written)}
        run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        figures = _figures(run.stdout, written)
        print(json.dumps(figures, indent=2) if isinstance(figures, dict) else figures)
        if isinstance(figures, dict) and name in TABLES:
            try:
                print("\n".join(TABLES[name](figures)))
            except KeyError as missing:  # a scenario that failed before it had every figure
                print(f"(no table: the figures lack {missing})")
        print(
            f"-- {name}: {'ok' if run.returncode == 0 else 'FAILED'} in {time.monotonic() - started:.0f} s", flush=True
        )
        if run.returncode != 0:
            failed.append(name)
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
