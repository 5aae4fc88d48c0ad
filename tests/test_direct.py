"""Direct gRPC callers (those that skip Envoy and name every replica) through a roll:
docs/grpc-clients.md documents the settings tools/direct.py gives them, and the roll's pace
(tools.stack.wait_until_available) lets such a caller see a restarted replica before the
next one goes down, even when the caller had backed far off from the restarted one.

The second case forces the interleaving that failed a read in `make chaos` on c300cbf: the
caller's connection attempts at a replica that is down fail a few times (its reconnect
backoff grows), the replica comes back, and the other replica starts draining."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path

import grpc

from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import GrpcServer, start_grpc
from service.metrics import Metrics
from service.storage import Storage
from tests.helpers import API_KEY, AUTH, poll_until
from tools.direct import DIRECT_CHANNEL_OPTIONS, DIRECT_SERVICE_CONFIG, direct_channel
from tools.stack import wait_until_available

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "grpc-clients.md"
# Failed connection attempts forced on the caller before the replica comes back. gRPC's
# default backoff then waits 4.1 s ± 20% before the next (1, 1.6, 2.56, 4.1 s): longer than
# the roll's hold plus the retries' backoff, so without the caller's cap the case fails.
FAILED_ATTEMPTS = 4


def test_the_guide_gives_direct_callers_the_settings_the_roll_relies_on() -> None:
    section = GUIDE.read_text().split("## Direct gRPC callers and replicas")[1].split("\n## ")[0]
    config, options = re.findall(r"```json\n(.*?)```", section, re.S)[:2]
    assert json.loads(config) == json.loads(DIRECT_SERVICE_CONFIG)
    assert json.loads(options) == {k: v for k, v in DIRECT_CHANNEL_OPTIONS if k != "grpc.service_config"}


class Refuser:
    """Holds a replica's port while it is down and closes every connection at once, so that
    each of the caller's connection attempts fails as against a restarting replica; counts them."""

    def __init__(self, enough: int) -> None:
        self.attempts = 0
        self.enough = enough
        self.reached = asyncio.Event()

    async def refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        self.attempts += 1
        if self.attempts >= self.enough:
            self.reached.set()


def answered(running: GrpcServer) -> float:
    """How many InvoiceService calls this server answered."""
    assert running.metrics is not None
    families = running.metrics.registry.collect()
    return sum(
        s.value for f in families if f.name == "invoice_rpc_calls" for s in f.samples if s.name.endswith("_total")
    )


async def test_a_roll_takes_the_next_replica_down_only_once_direct_callers_see_the_restarted_one(
    store: Storage,
) -> None:
    async def start(port: int = 0) -> GrpcServer:
        return await start_grpc(store, [API_KEY], f"127.0.0.1:{port}", metrics=Metrics())

    first, second = await start(), await start()
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def calls(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InvoiceServiceStub(channel)
        while not stop.is_set():
            try:
                await stub.ListInvoices(pb.ListInvoicesRequest(page=1, limit=5), metadata=AUTH, timeout=10)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[f"{exc.code().name} {exc.details()}"] += 1

    async def until_answered(running: GrpcServer, more_than: float, what: str) -> None:
        await poll_until(lambda: _true_if(answered(running) > more_than), what)

    async with direct_channel(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}") as channel:
        caller = asyncio.ensure_future(calls(channel))
        try:
            await until_answered(first, 0, "the first replica answering")
            await until_answered(second, 0, "the second replica answering")
            port = first.port
            await first.stop(grace=5, drain_delay=0.2)
            refuser = Refuser(FAILED_ATTEMPTS)
            holder = await asyncio.start_server(refuser.refuse, "127.0.0.1", port, reuse_address=True)
            await asyncio.wait_for(refuser.reached.wait(), 60)
            holder.close()
            await holder.wait_closed()
            first = await start(port)
            await asyncio.to_thread(wait_until_available, port)
            assert answered(first) > 0, "the next replica would go down before the caller saw this one"
            await second.stop(grace=5, drain_delay=0.5)
            answered_alone = answered(first)
            await until_answered(first, answered_alone + 20, "the restarted replica answering alone")
        finally:
            stop.set()
            await caller
            for running in (first, second):
                await running.server.stop(None)
    assert outcomes["OK"] > 0 and set(outcomes) == {"OK"}, outcomes


async def _true_if(condition: bool) -> bool | None:
    return True if condition else None
