"""`make chaos`, scenario "cluster": the service from its images as deploy/overlays/local
says (tools/cluster), reached only through the gateway's published port on 127.0.0.1 and,
for direct gRPC, through the Services' DNS on the run's own network. First the seed's flow
(a Create paid by the emulator's signed webhook, then list and get), a REST watch that
sees it, and its audit trail; then every server pod (server and sidecar) and every Envoy
pod replaced as the Deployments' strategy says, under REST reads, keyed Creates, direct
gRPC reads (docs/grpc-clients.md's service config over `dns:///invoice-service-grpc`), watchers that
resume and signed webhook deliveries (tests/test_rolling.py's callers). The rule: no failed
call of any kind, every delivery recorded once, every watcher seeing every change once, in
order. Prints its figures as JSON (the last line) and exits 1 when the rule is broken."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from service import payments
from tests.helpers import API_KEY, REQUEST, WEBHOOK_SECRET, wait_for_status
from tests.test_rolling import Rolled, _async_callers, _creates, _reads, _recorded
from tools.cluster import images
from tools.cluster.cluster import GATEWAY, SERVER, Cluster, Secrets
from tools.customers import customer_with_card
from tools.stack import LOCALSTRIPE_KEY, ROOT, wait_until_routed

WATCH = "/admin/api/invoices:watch"


async def _seed_flow(base: str, localstripe: str) -> dict[str, Any]:
    """Create -> the emulator's signed webhook -> paid, seen by a REST watch, then list,
    get and the audit trail: each answer's status."""
    stripe = payments.client(LOCALSTRIPE_KEY, api_base=localstripe, timeout_s=10, max_retries=0)
    customer, method = await customer_with_card(stripe)
    seen: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base, headers={"Api-Key": API_KEY}, timeout=20) as http:
        async with http.stream("GET", WATCH, timeout=httpx.Timeout(20, read=60)) as watch:
            lines = watch.aiter_lines()
            first = json.loads(await anext(lines))  # the bookmark: from now on no change is missed
            body = {**REQUEST, "customer": customer, "paymentMethod": method}
            created = await http.post("/admin/api/invoices", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            invoice = created.json()["id"]
            paid = await wait_for_status(http, invoice, "paid")
            async for line in lines:
                if line.strip():
                    seen.append(json.loads(line))
                    if seen[-1].get("invoice", {}).get("status") == "paid":
                        break
        listed = await http.get("/admin/api/invoices", params={"page": 1, "limit": 5})
        got = await http.get(f"/admin/api/invoices/{invoice}")
        audit = await http.get(f"/admin/api/invoices/{invoice}/audit")
    return {
        "create": created.status_code,
        "paid_by_webhook": paid["status"] == "paid",
        "watch": [first["kind"], *(e["invoice"]["status"] for e in seen if "invoice" in e)],
        "list": [listed.status_code, invoice in {i["invoiceId"] for i in listed.json().get("invoices", [])}],
        "get": [got.status_code, got.json().get("status")],
        "audit": [audit.status_code, [e.get("outcome") for e in audit.json().get("entries", [])]],
    }


def _delivered(watched: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(invoice, status) for invoice, status in watched if invoice.startswith("in_roll")]


def _under_load(cluster: Cluster, base: str, target: str) -> tuple[Rolled, list[dict[str, int]]]:
    client = payments.client(LOCALSTRIPE_KEY, api_base=cluster.localstripe, timeout_s=10, max_retries=0)
    customer, method = asyncio.run(customer_with_card(client))
    out, stop, ready = Rolled(), threading.Event(), threading.Event()
    workers = [threading.Thread(target=_reads, args=(f"{base}/admin/api/invoices?page=1&limit=5", stop, out.reads))]
    workers += [threading.Thread(target=_creates, args=(base, customer, method, stop, out.writes))]
    callers = threading.Thread(target=lambda: asyncio.run(_async_callers(target, base, ready, stop, out)))
    callers.start()
    exits: list[dict[str, int]] = []
    try:
        if not ready.wait(30):
            raise RuntimeError("the watchers did not start")
        for worker in workers:
            worker.start()
        time.sleep(1)  # load on every path before the first pod goes
        for workload in (SERVER, GATEWAY):
            exits += cluster.roll(workload)
        time.sleep(1)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        callers.join(timeout=90)
    return out, exits


def main() -> None:
    workdir = ROOT / ".build" / "cluster"
    cluster = Cluster(workdir, Secrets(api_key=API_KEY, webhook_secret=WEBHOOK_SECRET))
    figures: dict[str, Any] = {}
    try:
        figures["test_image_build_s"] = images.build(cluster.podman, workdir)
        cluster.up()
        base = f"http://127.0.0.1:{cluster.front.port}"
        wait_until_routed(base, API_KEY)
        figures["seed_flow"] = asyncio.run(_seed_flow(base, cluster.localstripe))
        # The headless Service's name, asked of the run's own DNS (dns://server/name).
        target = f"dns://{cluster.static['dns'][0]}:53/invoice-service-grpc:50051"
        started = {kind: list(seconds) for kind, seconds in cluster.start_s.items()}
        rolled, exits = _under_load(cluster, base, target)
        recorded = asyncio.run(_recorded(cluster.owner_dsn))
        figures |= {
            "rounds": 1,
            "rest_reads": dict(rolled.reads),
            "creates": dict(rolled.writes),
            "direct_grpc_reads": dict(rolled.direct),
            "deliveries": dict(rolled.deliveries),
            "events_sent": len(rolled.sent),
            "events_recorded": len(recorded),
            # The deliveries' invoices (the Creates' own are watched too, and not counted here).
            "changes_seen_per_watcher": [len(_delivered(w)) for w in rolled.watched],
            "watchers_in_order": [_delivered(w) == [(i, "paid") for i in rolled.sent] for w in rolled.watched],
            "exit_codes": exits,
            "start_s": started,
            "replaced_start_s": {k: v[len(started.get(k, [])) :] for k, v in cluster.start_s.items()},
        }
    finally:
        cluster.down()
    print(json.dumps(figures))
    if "CHAOS_FIGURES" in os.environ:
        Path(os.environ["CHAOS_FIGURES"]).write_text(json.dumps(figures))
    problems = _broken(figures, rolled.sent, recorded)
    if problems:
        sys.exit("; ".join(problems))


def _broken(f: dict[str, Any], sent: list[str], recorded: list[str]) -> list[str]:
    seed = f["seed_flow"]
    problems = []
    if (
        seed["create"] != 200
        or not seed["paid_by_webhook"]
        or seed["get"] != [200, "paid"]
        or seed["list"] != [200, True]
    ):
        problems.append(f"the seed's flow: {seed}")
    if seed["watch"][0] != "KIND_BOOKMARK" or seed["watch"][-1] != "paid" or seed["audit"][0] != 200:
        problems.append(f"the watch or the audit: {seed}")
    for kind, good in (("rest_reads", "200"), ("creates", "200"), ("direct_grpc_reads", "OK")):
        counted = Counter(f[kind])
        if set(counted) != {good}:
            problems.append(f"{kind}: {dict(counted)}")
    if f["deliveries"] != {"200": len(sent)}:
        problems.append(f"deliveries {f['deliveries']} for {len(sent)} events")
    if recorded != sorted(sent):
        problems.append(f"{len(recorded)} events recorded of {len(sent)} sent")
    if not all(f["watchers_in_order"]):
        problems.append(
            f"watchers saw {f['changes_seen_per_watcher']} of {len(sent)}, in order: {f['watchers_in_order']}"
        )
    if any(code != 0 for pod in f["exit_codes"] for code in pod.values()):
        problems.append(f"a replaced container exited non-zero: {f['exit_codes']}")
    return problems


if __name__ == "__main__":
    main()
