"""What the tests share besides fixtures (those are in conftest.py): the keys and secrets
the stack runs with, records and Stripe events to feed it, signing, delivering, watching, waiting,
and the JSON shape checks of the REST contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx

from service import storage
from service.app import SERVICE_ROLE
from service.domain import Invoice, User, new_record_id
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.storage import Storage
from service.storage.postgres import INSERT_RECORD, record_time
from tools import signing
from tools.stack import LOCALSTRIPE_KEY, local_env, wait_for

T = TypeVar("T")

# checkov has a venv of its own, made by `make install` (it pins packaging<24, pytest 9
# needs >=24); the Makefile's CHECKOV_VERSION says which.
CHECKOV = next((Path(__file__).resolve().parent.parent / ".tools").glob("checkov-*/bin/checkov"), None)


def checkov(directory: Path, framework: str) -> dict[str, Any]:
    """checkov's JSON report on the files of one `framework` in `directory` (one run: it
    takes seconds to start)."""
    assert CHECKOV is not None, "checkov is missing: `make install` puts it under .tools/"
    command = [str(CHECKOV), "--directory", str(directory), "--framework", framework]
    command += ["--output", "json", "--soft-fail", "--skip-download"]
    # LOG_LEVEL is also checkov's own logging setting.
    env = {**os.environ, "LOG_LEVEL": "ERROR"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    # One framework: one report object (several would be a list of them).
    assert isinstance(report, dict), result.stdout[:2000]
    return report


API_KEY = "test-admin-key-current"
ROTATED_KEY = "test-admin-key-next"
# A named key that may only read (List, Get, Watch), as a watching service holds.
READER = "provisioner"
READ_KEY = "test-read-key"
# A named write key, as an admin console holds.
CONSOLE = "console"
CONSOLE_KEY = "test-console-key"
AUTH = (("api-key", API_KEY),)


def json_shape(value: object) -> object:
    """Keys and JSON types, recursively (ints and floats apart); values dropped: what a
    REST caller's parser depends on."""
    if isinstance(value, dict):
        return {k: json_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_shape(v) for v in value[:1]]
    return type(value).__name__


# Keys the service adds to the original API's invoice (adding keys is allowed; renaming or
# retyping one is not).
ADDED_INVOICE_KEYS = {"amountInt32", "currency", "amountCredited", "amountRefunded"}


def has_shape(value: object, reference: object) -> bool:
    """Whether `value` has every key of `reference` with the same JSON type, recursively
    (lists by their first element); extra keys are allowed."""
    if isinstance(reference, dict):
        return isinstance(value, dict) and all(k in value and has_shape(value[k], v) for k, v in reference.items())
    if isinstance(reference, list):
        return isinstance(value, list) and (not reference or not value or has_shape(value[0], reference[0]))
    return type(value) is type(reference)


def make_invoice(n: int, *, base: datetime | None = None, status: str = "paid") -> Invoice:
    """The n-th of a series of invoices, each a second newer than the one before."""
    created = (base or datetime(2026, 11, 1, tzinfo=UTC)) + timedelta(seconds=n, milliseconds=250)
    return Invoice(
        id=new_record_id(),
        stripe_invoice_id=f"in_test{n:06d}",
        user=User(id=f"{n:024x}", name=f"User {n}"),
        status=status,
        amount=100 * (n + 1),
        invoice_pdf=f"https://pay.stripe.com/invoice/acct_test/in_test{n:06d}/pdf",
        created_at=created,
        updated_at=created + timedelta(seconds=5),
    )


WEBHOOK_SECRET = "whsec_test_current"
OLD_WEBHOOK_SECRET = "whsec_test_previous"


@dataclass
class Stack:
    """The real server and webhook sidecar processes behind the real Envoy, with the
    Stripe emulator, on ports they picked themselves."""

    database: str
    grpc_port: int
    gateway_port: int
    admin_port: int
    localstripe: str
    metrics_port: int
    webhook_port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"


def stack_env(database: str, tmp: Path, localstripe: str = "", metrics_port: int = 0) -> dict[str, str]:
    return local_env(
        # The row-privileged role a deployment uses, not the owner the tests inspect with.
        storage.with_user(database, SERVICE_ROLE),
        tmp,
        api_keys=f"{API_KEY},{ROTATED_KEY},{READER}:read:{READ_KEY},{CONSOLE}:write:{CONSOLE_KEY}",
        webhook_secrets=f"{WEBHOOK_SECRET},{OLD_WEBHOOK_SECRET}",
        STRIPE_API_KEY=LOCALSTRIPE_KEY,
        STRIPE_API_BASE=localstripe,
        METRICS_PORT=str(metrics_port),
    )


async def poll_until(check: Callable[[], Awaitable[T | None]], what: str, timeout_s: float = 20) -> T:
    """The first answer of `check` that is not None, asked every 0.2 s; an AssertionError
    naming `what` if none comes within `timeout_s` (the emulator's webhooks arrive about a
    second after the change)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what} within {timeout_s} s")
        await asyncio.sleep(0.2)


async def until_delivered(localstripe: str) -> None:
    """Until the emulator has no webhook delivery on its way: an earlier test's events
    would otherwise land in this test's emptied tables."""
    async with httpx.AsyncClient(base_url=localstripe, timeout=5) as client:

        async def idle() -> bool | None:
            reply = await client.get("/_config/deliveries")
            reply.raise_for_status()
            return reply.json()["in_flight"] == 0 or None

        await poll_until(idle, "the emulator's webhook deliveries done", timeout_s=60)


REQUEST = {"items": [{"name": "All resources", "amount": 3300}, {"name": "Support", "amount": 700}]}


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    """poll_until for a condition that needs no await."""

    async def check() -> bool | None:
        return condition() or None

    await poll_until(check, what, timeout_s)


def envoy_hosts(admin_port: int) -> dict[str, bool]:
    """Envoy's own view of its upstreams (admin /clusters): `cluster::host:port`, and
    whether its health checks pass (no health flag but `healthy`)."""
    clusters = httpx.get(f"http://127.0.0.1:{admin_port}/clusters", timeout=2).text
    flags = [line.rsplit("::health_flags::", 1) for line in clusters.splitlines() if "::health_flags::" in line]
    return {host: flag == "healthy" for host, flag in flags}


def wait_until(check: Callable[[], T | None], what: str, timeout_s: float = 20, interval_s: float = 0.2) -> T:
    """poll_until for code without an event loop (subprocesses, blocking clients)."""
    return wait_for(check, what, timeout_s, interval_s, error=AssertionError)


async def until_envoy_routes(http: httpx.AsyncClient, path: str) -> httpx.Response:
    """The first answer to GET `path` once Envoy routes to its upstream: until its first
    health check passes, Envoy itself answers "no healthy upstream"."""

    async def routed() -> httpx.Response | None:
        reply = await http.get(path)
        return None if "no healthy upstream" in reply.text else reply

    return await poll_until(routed, f"Envoy routing {path}")


async def wait_for_status(http: httpx.AsyncClient, invoice_id: str, status: str) -> dict[str, Any]:
    """Polls the REST API until the webhook has brought the record to `status` (the
    emulator delivers about a second after the change)."""
    seen: dict[str, Any] = {}

    async def reached() -> dict[str, Any] | None:
        reply = await http.get(f"/admin/api/invoices/{invoice_id}")
        if reply.status_code == 200:
            seen.update(reply.json())
            return seen if seen["status"] == status else None
        return None

    return await poll_until(reached, f"{invoice_id} reaching {status} (last seen {seen})")


def sign(payload: str, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    return signing.sign(payload, secret, at)


def event(invoice_id: str, kind: str, status: str, created: int, total: int = 5000) -> str:
    obj = {
        "id": invoice_id,
        "object": "invoice",
        "customer": "cus_webhooktest",
        "customer_name": "Grace",
        "status": status,
        "total": total,
        "invoice_pdf": f"https://pay.stripe.com/invoice/{invoice_id}/pdf" if status != "draft" else None,
        "metadata": {},
    }
    body = {"id": f"evt_{uuid.uuid4().hex[:16]}", "object": "event", "type": kind, "created": created}
    return json.dumps({**body, "data": {"object": obj}})


async def deliver(http: httpx.AsyncClient, payload: str, signature: str | None = None) -> httpx.Response:
    headers = {"Stripe-Signature": signature or sign(payload), "content-type": "application/json"}
    return await http.post("/webhooks/stripe", content=payload.encode(), headers={**headers, "Api-Key": ""})


async def save_invoice(store: Storage, invoice: Invoice) -> Invoice:
    """Loads a record as the service writes it (the store's own INSERT, used by every
    webhook), with the record's own id and times, and answers it as the store reads it."""
    await save_invoices(store, [invoice])
    return await store.get_invoice(invoice.stripe_invoice_id)


async def save_invoices(store: Storage, invoices: list[Invoice]) -> None:
    """save_invoice for many, on one connection, each in its own transaction."""
    async with store._connection() as conn:
        for invoice in invoices:
            await conn.execute(
                INSERT_RECORD,
                invoice.id,
                invoice.stripe_invoice_id,
                invoice.user.id,
                invoice.user.name,
                invoice.status,
                invoice.amount,
                invoice.currency,
                invoice.invoice_pdf,
                record_time(invoice.created_at),
                record_time(invoice.updated_at),
                0,
            )


class Watcher:
    """One open WatchInvoices stream, read in the background into a queue."""

    def __init__(self, stub: pb_grpc.InvoiceServiceAsyncStub, request: pb.WatchInvoicesRequest) -> None:
        self.call = stub.WatchInvoices(request, metadata=AUTH)
        self.events: asyncio.Queue[pb.InvoiceEvent] = asyncio.Queue()
        self.error: grpc.aio.AioRpcError | None = None
        self.done = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.call:
                await self.events.put(event)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    async def next(self, timeout_s: float = 10) -> pb.InvoiceEvent:
        return await asyncio.wait_for(self.events.get(), timeout_s)

    async def changes(self, n: int, timeout_s: float = 10) -> list[pb.InvoiceEvent]:
        """The next `n` events that are changes (bookmarks skipped)."""
        found: list[pb.InvoiceEvent] = []
        while len(found) < n:
            event = await self.next(timeout_s)
            if event.kind != pb.InvoiceEvent.KIND_BOOKMARK:
                found.append(event)
        return found

    async def ended(self, timeout_s: float = 10) -> grpc.aio.AioRpcError | None:
        await asyncio.wait_for(self.done.wait(), timeout_s)
        return self.error

    def close(self) -> None:
        self.call.cancel()


async def open_watch(
    stub: pb_grpc.InvoiceServiceAsyncStub, opened: list[Watcher], **request: str
) -> tuple[Watcher, pb.InvoiceEvent]:
    """A watch opened, kept in `opened` (for the caller to close), and its first event."""
    watcher = Watcher(stub, pb.WatchInvoicesRequest(**request))
    opened.append(watcher)
    first = await watcher.next()
    return watcher, first


class ResumingWatch:
    """A WatchInvoices caller as the contract asks callers to be: whenever the stream ends
    (a server shutting down, too slow, its maximum duration, no server up), it opens
    another with the last resume_token it received. Runs in the background; `changes`
    holds every change seen, `ends` how each stream ended."""

    def __init__(self, target: str, **request: str) -> None:
        self._target, self._request = target, request
        self.changes: list[pb.InvoiceEvent] = []
        self.ends: Counter[str] = Counter()
        self.token = ""
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self._target) as channel:
            stub = pb_grpc.InvoiceServiceStub(channel)
            while True:
                request = pb.WatchInvoicesRequest(resume_token=self.token, **self._request)
                try:
                    async for event in stub.WatchInvoices(request, metadata=AUTH):
                        self.token = event.resume_token
                        if event.kind != pb.InvoiceEvent.KIND_BOOKMARK:
                            self.changes.append(event)
                    self.ends["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    self.ends[exc.code().name] += 1
                    await asyncio.sleep(0.1)

    @property
    def ids(self) -> list[tuple[str, str]]:
        return [(e.invoice.invoice_id, e.invoice.status) for e in self.changes]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def until_watching(watchers: list[ResumingWatch]) -> None:
    """Until every watcher holds a token (its first bookmark): from then on none misses a change."""

    async def holding() -> bool | None:
        return True if all(w.token for w in watchers) else None

    await poll_until(holding, "every watcher holding a token")


async def until_caught_up(watchers: list[ResumingWatch], changes: int) -> None:
    """Until every watcher has seen at least `changes` changes."""

    async def seen() -> bool | None:
        return True if all(len(w.changes) >= changes for w in watchers) else None

    await poll_until(seen, f"every watcher seeing {changes} changes")


async def intents_of(client: Any, invoice_id: str) -> list[str]:
    """The payment intents that paid the invoice, from its invoice payments (Stripe took
    `payment_intent` off the invoice in 2025-03-31.basil)."""
    payments = await client.v1.invoice_payments.list_async({"invoice": invoice_id})
    return [str(p.payment["payment_intent"]) for p in payments.data if p.payment["type"] == "payment_intent"]
