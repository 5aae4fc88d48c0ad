"""The composition root: builds the store, Stripe and the servicer from the settings and
starts the gRPC server with them (service/grpc_server.py); builds the webhook sidecar; and
runs either until SIGTERM or SIGINT. Also the reconcile command's wiring."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import asyncpg
from aiohttp import web

from service import announce, embedded, payments, storage, webhooks
from service.cache import CachedReads, ForgettingWrites, RecordCache
from service.config import Settings
from service.domain import Unavailable
from service.grpc_server import SERVICE_NAME, GrpcServer, ServerTls, start_grpc
from service.invoices import InvoiceCreator, Timing
from service.metrics import Metrics, add_routes, ready
from service.payments import StripePayments
from service.reconcile import reconcile_from, reconcile_notes_from, reconcile_refunds_from
from service.storage import changes
from service.watch import Watches, WatchLimits

log = logging.getLogger(__name__)

# The embedded Postgres's runtime role: row privileges only (its superuser migrates).
SERVICE_ROLE = "invoice_service"


def server_tls(settings: Settings) -> ServerTls | None:
    if settings.grpc_tls_cert is None or settings.grpc_tls_key is None:
        return None
    ca = Path(settings.grpc_tls_client_ca).read_bytes() if settings.grpc_tls_client_ca else None
    cert, key = Path(settings.grpc_tls_cert).read_bytes(), Path(settings.grpc_tls_key).read_bytes()
    return ServerTls(cert, key, ca, settings.grpc_tls_client_subjects)


def webhook_tls(settings: Settings) -> ssl.SSLContext | None:
    """The sidecar's TLS (WEBHOOK_TLS_CERT/KEY), or None for plaintext."""
    if settings.webhook_tls_cert is None or settings.webhook_tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.webhook_tls_cert, settings.webhook_tls_key)
    return context


@dataclass(frozen=True)
class Databases:
    """Where the service connects (row privileges) and where migrations run (the owner)."""

    service: str
    owner: str


async def databases(settings: Settings) -> Databases:
    if settings.database_url is not None:
        service = settings.database_url.get_secret_value()
        owner = settings.migration_database_url
        return Databases(service, owner.get_secret_value() if owner else service)
    log.info("DATABASE_URL is not set: starting the embedded Postgres under %s", settings.data_dir)
    admin = embedded.start(Path(settings.data_dir) / "postgres")
    await storage.ensure_login_role(admin, SERVICE_ROLE)
    return Databases(storage.with_user(admin, SERVICE_ROLE), admin)


async def migrate(settings: Settings) -> list[int]:
    """`python -m service migrate`: the schema owner migrates and grants the service's role."""
    dbs = await databases(settings)
    role = storage.user_of(dbs.service)
    if role is None:
        raise SystemExit("DATABASE_URL names no user (user@host): cannot tell which role to grant")
    return await storage.migrate_database(dbs.owner, grant_to=role)


async def become_ready(prepare: Callable[[], Awaitable[None]], running: GrpcServer, retry_s: float = 1.0) -> None:
    """Retries `prepare` (migrate, reach Postgres) until it succeeds, then reports SERVING.
    Until then Envoy and the orchestrator see NOT_SERVING and send nothing (while other
    replicas are healthy), and a caller that comes anyway is told why (only our own
    messages: others could name hosts)."""
    failures = 0
    while True:
        try:
            await prepare()
        except Exception as exc:
            running.not_ready(
                str(exc).removesuffix("; retry later")
                if isinstance(exc, Unavailable)
                else "the database is not ready yet"
            )
            if failures % 30 == 0:
                # Messages only where they cannot quote a DSN: a malformed DSN's parse
                # error (a ValueError from asyncpg) can contain its password.
                safe = isinstance(exc, asyncpg.PostgresError | Unavailable | OSError)
                log.warning("not ready: %s%s", type(exc).__name__, f": {str(exc)[:200]}" if safe else "")
            failures += 1
            await asyncio.sleep(retry_s)
        else:
            await running.set_serving()
            log.info("ready: schema current, Postgres reachable", extra={"after_failures": failures})
            return


def admin_api_keys(settings: Settings) -> list[str]:
    """The configured keys; in a local run without any, a dev key kept under DATA_DIR."""
    settings.require("serve")
    if settings.admin_api_keys:
        return [k.get_secret_value() for k in settings.admin_api_keys]
    path = Path(settings.data_dir) / "dev-admin-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    key = path.read_text().strip()
    print(f"ADMIN_API_KEYS is not set: local dev key (also in {path}): {key}", flush=True)
    return [key]


def stripe_payments(settings: Settings, metrics: Metrics | None = None) -> StripePayments | None:
    if settings.stripe_api_key is None:
        log.warning("STRIPE_API_KEY is not set: CreateInvoice answers UNAVAILABLE")
        return None
    if settings.stripe_api_base:
        log.info("Stripe API base overridden", extra={"stripe_api_base": settings.stripe_api_base})
    return StripePayments(
        payments.client(
            settings.stripe_api_key.get_secret_value(),
            api_base=settings.stripe_api_base,
            timeout_s=settings.stripe_timeout_s,
            max_retries=settings.stripe_max_retries,
        ),
        observe=metrics.observe_stripe if metrics else None,
    )


# The stripe SDK's longest wait between two retries of a call (stripe 16, HTTPClient.MAX_DELAY).
STRIPE_MAX_RETRY_DELAY_S = 5.0


def create_timing(settings: Settings) -> Timing:
    """An attempt's lease, renewed before each Stripe call, outlasts one call with all of
    the SDK's retries and their backoff, so a second attempt rarely waits beside a live
    one (and if it does, the shared Stripe keys keep the work single)."""
    retries = settings.stripe_max_retries
    one_call = settings.stripe_timeout_s * (retries + 1) + STRIPE_MAX_RETRY_DELAY_S * retries
    return Timing(lease_s=one_call + 5.0, duplicate_window_s=settings.create_duplicate_window_s)


def watch_limits(settings: Settings) -> WatchLimits:
    return WatchLimits(
        max_streams=settings.watch_max_streams,
        buffer=settings.watch_buffer,
        bookmark_s=settings.watch_bookmark_s,
        poll_s=settings.watch_poll_s,
        max_stream_s=settings.watch_max_stream_s,
        retention_s=settings.watch_retention_s,
    )


def record_cache(settings: Settings, metrics: Metrics) -> RecordCache:
    # The reader reads at least every WATCH_POLL_S: one late read is not yet a lagging reader.
    return RecordCache(settings.record_cache_size, 2 * settings.watch_poll_s, observe=metrics.observe_cache)


def start_watches(
    settings: Settings, store: storage.Storage, dsn: str, metrics: Metrics, cache: RecordCache | None = None
) -> Watches:
    """The watches' reader, woken by LISTEN on a connection of its own, except behind
    PgBouncer in transaction mode, which cannot hold one: there it polls alone (and the
    record cache, which needs LISTEN, does not serve). It keeps `cache` current."""
    connect = storage.Connector(settings.db_link)
    listen = None if settings.database_pooler == "pgbouncer" else partial(changes.listen, dsn, connector=connect)
    watches = Watches(
        store, watch_limits(settings), listen=listen, observe_delay=metrics.observe_watch_delay, follower=cache
    )
    watches.start()
    return watches


async def open_pool(settings: Settings, dbs: Databases | None = None) -> asyncpg.Pool:
    return await storage.connect(
        (dbs or await databases(settings)).service,
        max_size=settings.db_pool_max_size,
        command_timeout=settings.db_command_timeout_s,
        pooler=settings.database_pooler,
        connector=storage.Connector(settings.db_link),
    )


async def start_metrics(settings: Settings, metrics: Metrics) -> web.AppRunner:
    """The server's small HTTP side: GET /metrics, GET /livez and GET /readyz (what the
    gRPC health service says, for probes that cannot speak TLS) on METRICS_PORT."""
    app = web.Application()
    add_routes(app, metrics)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    print(f"HTTP  metrics  localhost:{runner.addresses[0][1]}/metrics", flush=True)
    return runner


async def serve(settings: Settings) -> None:
    keys = admin_api_keys(settings)
    dbs = await databases(settings)
    metrics = Metrics()
    pool = await open_pool(settings, dbs)
    metrics.watch_pool(pool)
    metrics_site: web.AppRunner | None = None
    try:
        metrics_site = await start_metrics(settings, metrics)
        store = storage.Storage(pool, observe_wait=metrics.observe_pool_wait, budget_s=settings.db_command_timeout_s)
        stripe = stripe_payments(settings, metrics)
        cache = record_cache(settings, metrics)
        creator = (
            InvoiceCreator(store, ForgettingWrites(store, cache), stripe, create_timing(settings)) if stripe else None
        )
        watches = start_watches(settings, store, dbs.service, metrics, cache)
        running = await start_grpc(
            CachedReads(store, cache),
            keys,
            f"{settings.grpc_host}:{settings.grpc_port}",
            creator=creator,
            default_currency=settings.stripe_default_currency,
            ready=False,
            metrics=metrics,
            max_offset=settings.list_max_offset,
            watches=watches,
            audit=store,
            notes=store,
            tls=server_tls(settings),
        )
        log.info("gRPC server listening", extra={"port": running.port, "service": SERVICE_NAME})
        print(f"gRPC  InvoiceService  localhost:{running.port}", flush=True)
        announce.listening("server", grpc=running.port, metrics=metrics_site.addresses[0][1])

        async def prepare() -> None:
            if settings.migrate_on_start:
                await storage.migrate_database(dbs.owner, grant_to=storage.user_of(dbs.service))
            await store.check_ready()
            await store.open_connections(settings.db_pool_min_size)

        readiness = asyncio.create_task(become_ready(prepare, running))
        try:
            await _until_signalled()
        finally:  # also when start-up fails or the task is cancelled: calls in flight finish
            readiness.cancel()
            log.info(
                "shutting down", extra={"drain_s": settings.shutdown_drain_s, "grace_s": settings.shutdown_grace_s}
            )
            await running.stop(settings.shutdown_grace_s, settings.shutdown_drain_s)
            if creator is not None:  # attempts whose callers went away still record what they did
                await creator.drain(settings.shutdown_grace_s)
    finally:
        if metrics_site is not None:
            await metrics_site.cleanup()
        await pool.close()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def webhook_secrets(settings: Settings) -> list[str]:
    settings.require("webhooks")
    return [s.get_secret_value() for s in settings.stripe_webhook_secrets]


async def run_webhooks(settings: Settings) -> None:
    """The sidecar: its own pool, an aiohttp site. On SIGTERM, like the server: readiness
    fails first and deliveries are served for SHUTDOWN_DRAIN_S while Envoy's health check
    takes it out, then in-flight ones get SHUTDOWN_GRACE_S (an unfinished one is simply
    retried by Stripe)."""
    secrets = webhook_secrets(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def sidecar_store() -> AsyncIterator[storage.Storage]:
        pool = await open_pool(settings)
        metrics.watch_pool(pool)
        try:
            yield storage.Storage(pool, observe_wait=metrics.observe_pool_wait, budget_s=settings.db_command_timeout_s)
        finally:
            await pool.close()

    app = webhooks.init(
        secrets,
        open_store=sidecar_store,
        tolerance_s=settings.stripe_webhook_tolerance_s,
        max_body_bytes=settings.webhook_max_body_bytes,
        metrics=metrics,
        livemode=settings.stripe_livemode,
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            settings.webhook_host,
            settings.webhook_port,
            shutdown_timeout=settings.shutdown_grace_s,
            ssl_context=webhook_tls(settings),
        )
        await site.start()
        port = runner.addresses[0][1]
        log.info("webhook sidecar listening", extra={"port": port, "path": webhooks.PATH})
        print(f"HTTP  webhook sidecar  localhost:{port}{webhooks.PATH}", flush=True)
        announce.listening("webhooks", http=port)
        await _until_signalled()
        log.info("shutting down", extra={"drain_s": settings.shutdown_drain_s, "grace_s": settings.shutdown_grace_s})
        webhooks.drain(app)
        await asyncio.sleep(settings.shutdown_drain_s)
    finally:
        await runner.cleanup()


async def reconcile(settings: Settings, since: datetime) -> Counter[str]:
    """Brings the store to Stripe's state for every invoice, credit note and refund created
    since `since`: the fix for webhooks that never arrived. Idempotent: a second run changes
    nothing. The notes and refunds after the invoices, so that their totals land on the
    records (one of an invoice older than `since` counts too)."""
    settings.require("reconcile")
    stripe = stripe_payments(settings)
    if stripe is None:
        raise RuntimeError("Settings.require('reconcile') let a run without STRIPE_API_KEY through")
    pool = await open_pool(settings)
    try:
        store = storage.Storage(pool, budget_s=settings.db_command_timeout_s)
        outcomes = await reconcile_from(stripe.invoices_since(since), store)
        outcomes += await reconcile_notes_from(stripe.credit_notes_since(since), store)
        outcomes += await reconcile_refunds_from(stripe.refunds_since(since), stripe.invoice_payment_of, store)
    finally:
        await pool.close()
    log.info("reconciled", extra={"since": since.isoformat(), **outcomes})
    return outcomes
