"""`make bench`: builds a database of BENCH_INVOICES invoices (COPY, realistic spread),
starts the real stack on it (server, webhook sidecar, Envoy) plus a bare grpc.aio
ceiling server, measures every case in one run on this machine, and writes a table to
stdout, JSON and a PNG chart under results/ (git-ignored)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.ceiling import CONSTANT
from bench.dataset import load
from bench.report import (
    CEILING,
    DEEP_TOKEN,
    DEEPEST_NUMBERED,
    DEEPEST_NUMBERED_PAGE,
    GET,
    GET_4_PROCS,
    GET_UNCACHED,
    PAGE_1,
    PAGE_SIZE,
    PEER_GET,
    PROXY_CEILING,
    REST_GET,
    WEBHOOKS,
    report,
)
from bench.webhook_load import lifecycle
from chaos.storm import applications_counted, applied_once, event_applications
from service import embedded
from service.domain import Outcome
from tools.stack import (
    LOCALSTRIPE_KEY,
    ROOT,
    Part,
    backend,
    free_port,
    local_env,
    start_localstripe,
    start_python,
    start_service,
    wait_until_routed,
    wait_until_serving,
)

API_KEY = "bench-admin-key"
SECRET = "whsec_bench"  # noqa: S105 - a local benchmark's own secret
# Webhook deliveries per second while watchers are measured: a steady trickle, so each
# delay is one change's, not a queue's.
WATCH_RATE = 10.0


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


class PeakRss:
    """Samples a process's resident memory while a case runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.1)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _wrk(url: str, seconds: float, connections: int, threads: int = 2) -> dict[str, Any]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, int(seconds))}s", "--latency"]
    out = subprocess.run([*argv, "-H", f"Api-Key: {API_KEY}", url], capture_output=True, text=True, check=True).stdout
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def latency(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        return round(float(m[1]) * scale[m[2]], 3) if m else 0.0

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    calls = re.search(r"(\d+) requests in", out)
    return {
        "calls": int(calls[1]) if calls else 0,
        "errors": int(non2xx[1]) if non2xx else 0,
        "rps": float(rps[1]) if rps else 0.0,
        "p50_ms": latency("50"),
        "p90_ms": latency("90"),
        "p99_ms": latency("99"),
    }


def _grpc_load(target: str, case: str, seconds: float, processes: int, **extra: Any) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.load", "--target", target, "--case", case, "--seconds", str(seconds)]
    argv += ["--processes", str(processes), "--concurrency", "16", "--api-key", API_KEY]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _proxy_ceiling_route(config: str) -> str:
    """The same listener, one more route: Envoy answering an invoice-sized body itself."""
    body = json.dumps(json.dumps({"_id": CONSTANT.id, "invoiceId": CONSTANT.invoice_id, "pdf": CONSTANT.invoice_pdf}))
    route = (
        "                        - match: {path: /bench/fixed}\n"
        f"                          direct_response: {{status: 200, body: {{inline_string: {body}}}}}\n"
        "                          typed_per_filter_config:\n"
        "                            envoy.filters.http.grpc_json_transcoder:\n"
        '                              "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig\n'
        "                              disabled: true\n"
    )
    anchor = "                        - match: {path: /webhooks/stripe}\n"
    return config.replace(anchor, route + anchor, 1)


@contextmanager
def _stopped_after(part: Part) -> Iterator[None]:
    try:
        yield
    finally:
        part.stop()


def main() -> None:
    n = int(_env("BENCH_INVOICES", 1_000_000))
    seconds = _env("BENCH_SECONDS", 10)
    hooks = int(_env("BENCH_WEBHOOK_INVOICES", 2000))
    rounds = int(_env("BENCH_ROUNDS", 3))
    watcher_counts = [int(w) for w in os.environ.get("BENCH_WATCHERS", "1,1000").split(",")]
    watch_events = int(_env("BENCH_WATCH_EVENTS", 100))
    creates = int(_env("BENCH_CREATES", 20))
    if rounds < 1:
        raise SystemExit("BENCH_ROUNDS must be at least 1")
    out_dir = Path(os.environ.get("BENCH_RESULTS", ROOT / "results"))
    work = ROOT / ".build" / "bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    machine = {"nproc": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    print(f"bench: {n:,} invoices, {seconds:g} s per case, {rounds} rounds, machine {machine}", flush=True)

    dsn = embedded.start(work / "pg", temporary=True)
    data = asyncio.run(load(dsn, n))
    print(f"loaded {n:,} invoices in {data['load_s']} s", flush=True)
    log = (work / "stack.log").open("w")
    # Creates go to the Stripe emulator (the case that measures what a Create costs).
    stripe_port = free_port()
    emulator = start_localstripe(stripe_port, fresh=True, log=log)
    stripe_url = f"http://127.0.0.1:{stripe_port}"
    # The default configuration, as deployed: INFO logs (a line per RPC), metrics on.
    env = local_env(
        data["url"],
        work,
        api_keys=API_KEY,
        webhook_secrets=SECRET,
        STRIPE_API_KEY=LOCALSTRIPE_KEY,
        STRIPE_API_BASE=stripe_url,
    )
    results: list[dict[str, Any]] = []
    ceiling, ceiling_ports = start_python("ceiling", ["-m", "bench.ceiling"], env, log=log)
    peer_port = free_port()
    peer_args = ["-m", "bench.peer", "--dsn", data["url"], "--port", str(peer_port), "--api-keys", API_KEY]
    peer, _ = start_python("peer", peer_args, env, log=log)
    with (
        _stopped_after(emulator),
        _stopped_after(ceiling),
        _stopped_after(peer),
        backend(env, work, log=log, edit_config=_proxy_ceiling_route) as running,
        ExitStack() as later,
    ):
        service, webhooks, envoy = running.parts
        base = f"http://127.0.0.1:{running.gateway_port}"
        wait_until_routed(base, API_KEY)
        direct = f"127.0.0.1:{running.grpc_port}"
        # The same Gets from a second server without the record cache (started once the
        # first has migrated): what each costs when it reads Postgres (a record not read
        # lately, or the cache not serving).
        uncached, uncached_port = start_service(env | {"RECORD_CACHE_SIZE": "0"}, log=log)
        later.callback(uncached.stop)
        ids = json.dumps(data["ids"])
        some_id = data["ids"][0]

        def measure(name: str, tool: str, run: Any, pid: int) -> dict[str, Any]:
            with PeakRss(pid) as rss:
                figures = run()
            r = {"case": name, "tool": tool, **figures, "peak_rss_mb": round(rss.peak / 2**20, 1)}
            print(
                f"  {name:<34} {r['rps']:>9.1f}/s  p50 {r['p50_ms']:>8.2f} ms  p99 {r['p99_ms']:>8.2f} ms", flush=True
            )
            return r

        def case(name: str, tool: str, run: Any, pid: int) -> None:
            results.append(measure(name, tool, run, pid))

        pid = service.process.pid
        # The cases the target ratios compare run in alternating rounds: this machine's speed
        # drifts over seconds, and a pair measured side by side drifts together.
        paired = [
            (
                CEILING,
                "bench.load gRPC x2",
                lambda: _grpc_load(f"127.0.0.1:{ceiling_ports['grpc']}", "get", seconds, 2, ids=ids),
                ceiling.process.pid,
            ),
            (GET, "bench.load gRPC x2", lambda: _grpc_load(direct, "get", seconds, 2, ids=ids), pid),
            (
                GET_UNCACHED,
                "bench.load gRPC x2",
                lambda: _grpc_load(f"127.0.0.1:{uncached_port}", "get", seconds, 2, ids=ids),
                uncached.process.pid,
            ),
            (REST_GET, "wrk -t2 -c32", lambda: _wrk(f"{base}/admin/api/invoices/{some_id}", seconds, 32), pid),
            (
                PEER_GET,
                "wrk -t2 -c32",
                lambda: _wrk(f"http://127.0.0.1:{peer_port}/admin/api/invoices/{some_id}", seconds, 32),
                peer.process.pid,
            ),
            (PAGE_1, "bench.load gRPC x2", lambda: _grpc_load(direct, "list", seconds, 2), pid),
        ]
        wait_until_serving(uncached_port)
        for round_ in range(rounds):
            print(f"round {round_ + 1} of {rounds}", flush=True)
            # Every other round in reverse (ABBA), so no case always runs first or last.
            for name, tool, run, part in paired if round_ % 2 == 0 else paired[::-1]:
                results.append(measure(name, tool, run, part) | {"round": round_ + 1})
        case(
            PROXY_CEILING,
            "wrk -t2 -c32",
            lambda: _wrk(f"{base}/bench/fixed", seconds, 32),
            envoy.process.pid,
        )
        case(
            GET_4_PROCS,
            "bench.load gRPC x4",
            lambda: _grpc_load(direct, "get", seconds, 4, ids=ids),
            pid,
        )
        case(
            DEEP_TOKEN,
            "bench.load gRPC x2",
            lambda: _grpc_load(direct, "list_token", seconds, 2, token=data["token"]),
            pid,
        )
        case(
            DEEPEST_NUMBERED_PAGE,
            "bench.load gRPC x2",
            lambda: _grpc_load(
                direct,
                "list_deep_page",
                seconds,
                2,
                deep_page=DEEPEST_NUMBERED if n >= DEEPEST_NUMBERED * PAGE_SIZE else 2,
            ),
            pid,
        )
        hook_args = [sys.executable, "-m", "bench.webhook_load", "--url", f"{base}/webhooks/stripe", "--secret", SECRET]
        hook_args += ["--invoices", str(hooks)]

        def webhooks_case() -> dict[str, Any]:
            out = subprocess.run(hook_args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            return dict(json.loads(out.strip().splitlines()[-1]))

        case(WEBHOOKS, "bench.webhook_load x2", webhooks_case, webhooks.process.pid)
        results[-1] |= asyncio.run(_webhook_rows(data["url"], hooks, running.webhook_port))
        watch_args = [sys.executable, "-m", "bench.watch_delay", "--grpc", direct, "--api-key", API_KEY]
        watch_args += ["--webhook-url", f"{base}/webhooks/stripe", "--secret", SECRET]
        watch_args += ["--events", str(watch_events), "--rate", str(WATCH_RATE)]
        watches = []
        for watchers in watcher_counts:
            with PeakRss(pid) as rss:
                argv = [*watch_args, "--watchers", str(watchers)]
                out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            watches.append(figures | {"server_peak_rss_mb": round(rss.peak / 2**20, 1)})
            print(f"  watch, {watchers} watchers: {watches[-1]}", flush=True)
        cost_args = [sys.executable, "-m", "bench.create_cost", "--grpc", direct, "--api-key", API_KEY]
        cost_args += ["--stripe", stripe_url, "--creates", str(creates)]
        out = subprocess.run(cost_args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        create_costs = json.loads(out.strip().splitlines()[-1])
        print(f"  creates: {create_costs}", flush=True)
    log.close()
    report(results, data, machine, n, out_dir, watches, create_costs)


async def _webhook_rows(url: str, invoices: int, webhook_port: int) -> dict[str, Any]:
    """Nothing lost: every event recorded, every invoice paid for its amount. Nothing
    doubled: each event applied once by the count its applying transaction kept, each
    invoice created by one event, and (no fault here) every application answered."""
    answered = event_applications(webhook_port)
    conn = await asyncpg.connect(url)
    try:
        counted = await applications_counted(conn, "evt_bench%")
        paid = await conn.fetchval(
            "SELECT count(*) FROM invoices WHERE stripe_invoice_id LIKE 'in_bench%' AND status = 'paid'"
            " AND amount = $1",
            lifecycle("short", 0)[-1][2],
        )
        rows = await conn.fetchval("SELECT count(*) FROM invoices WHERE stripe_invoice_id LIKE 'in_bench%'")
        created_once = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM stripe_events WHERE id LIKE 'evt_bench%'"
            " GROUP BY stripe_invoice_id HAVING count(*) FILTER (WHERE outcome = $1) = 1) AS once",
            Outcome.CREATED.value,
        )
    finally:
        await conn.close()
    events = counted["events_recorded"]
    return {
        "invoices_recorded": rows,
        "invoices_paid": paid,
        **counted,
        "event_applications_answered": answered,
        "invoices_created_once": created_once,
        # No fault here, so every event applied was answered, and counted: exactly once each.
        "nothing_lost_or_doubled": events == invoices * 3 == answered
        and applied_once(counted)
        and rows == invoices == paid == created_once,
    }


if __name__ == "__main__":
    main()
