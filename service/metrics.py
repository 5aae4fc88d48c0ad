"""The service's Prometheus series, in one registry per process (the server's and the
sidecar's), exposed at GET /metrics by prometheus-client's own exposition. The modules
that do the work get plain callbacks (`observe_*`), so storage and payments know nothing
of Prometheus; the edges (the gRPC edge, the webhook handler) record here directly."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.cache import LOOKUP_OUTCOMES
from service.domain import Outcome

# Calls here take from about a millisecond (a Get) to seconds (a Create through Stripe).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A webhook delivery's outcome, from the store's answer (see Storage.apply_stripe_invoice).
WEBHOOK_OUTCOMES = {
    Outcome.CREATED: "applied",
    Outcome.UPDATED: "applied",
    Outcome.UNCHANGED: "unchanged",
    Outcome.DUPLICATE: "duplicate",
    Outcome.STALE: "out_of_order",
    Outcome.DELETED: "applied",
    Outcome.IGNORED_DELETED: "out_of_order",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_calls = Counter(
            "invoice_rpc_calls",
            "gRPC calls by method, status code and caller (the API key's name, never the key)",
            ["method", "code", "caller"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "invoice_rpc_duration_seconds", "gRPC call latency", ["method", "code"], registry=r, buckets=LATENCY_BUCKETS
        )
        self.streams_open = Gauge("invoice_rpc_streams_open", "server streams open now", ["method"], registry=r)
        # What the gRPC health service says, for GET /readyz (a probe that cannot speak TLS).
        self._serving = Gauge("invoice_serving", "1 while the gRPC health service says SERVING", registry=r)
        self.is_serving = False
        self.stream_messages = Counter(
            "invoice_rpc_stream_messages", "messages sent on server streams", ["method"], registry=r
        )
        self.watch_delay_seconds = Histogram(
            "invoice_watch_delay_seconds",
            "from a change being recorded (just before its commit) to a watch taking it to send",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        cache_lookups = Counter(
            "invoice_record_cache_lookups",
            "GetInvoice's record cache: hit, miss (read from Postgres and kept), bypass (not serving now)",
            ["outcome"],
            registry=r,
        )
        self._cache_lookups = {outcome: cache_lookups.labels(outcome) for outcome in LOOKUP_OUTCOMES}
        self.webhook_events = Counter(
            "invoice_webhook_events",
            "Stripe webhook deliveries by event type and outcome (applied, unchanged, duplicate, out_of_order,"
            " ignored, rejected, unavailable)",
            ["type", "outcome"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "invoice_webhook_duration_seconds",
            "webhook handling latency",
            ["outcome"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.stripe_calls = Counter(
            "invoice_stripe_calls", "Stripe API calls by operation and outcome", ["operation", "outcome"], registry=r
        )
        self.stripe_seconds = Histogram(
            "invoice_stripe_call_duration_seconds",
            "Stripe API call latency, SDK retries included",
            ["operation"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.pool_wait_seconds = Histogram(
            "invoice_db_pool_acquire_seconds",
            "time waiting for a pooled Postgres connection (a connection being opened included)",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )

    def observe_stripe(self, operation: str, outcome: str, seconds: float) -> None:
        self.stripe_calls.labels(operation, outcome).inc()
        self.stripe_seconds.labels(operation).observe(seconds)

    def observe_watch_delay(self, seconds: float) -> None:
        self.watch_delay_seconds.observe(seconds)

    def observe_cache(self, outcome: str) -> None:
        self._cache_lookups[outcome].inc()

    def observe_pool_wait(self, seconds: float) -> None:
        self.pool_wait_seconds.observe(seconds)

    def observe_webhook(self, event_type: str, outcome: str, seconds: float) -> None:
        self.webhook_events.labels(event_type, outcome).inc()
        self.webhook_seconds.labels(outcome).observe(seconds)

    def set_serving(self, serving: bool) -> None:
        self.is_serving = serving
        self._serving.set(1 if serving else 0)

    def watch_pool(self, pool: asyncpg.Pool) -> None:
        self.registry.register(_PoolCollector(pool))

    def exposition(self) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _PoolCollector(Collector):
    """Read at scrape time from the pool itself, so the figures are never stale."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size, idle = self._pool.get_size(), self._pool.get_idle_size()
        yield GaugeMetricFamily("invoice_db_pool_connections", "open pooled Postgres connections", value=size)
        yield GaugeMetricFamily("invoice_db_pool_in_use", "pooled connections lent out now", value=size - idle)
        yield GaugeMetricFamily("invoice_db_pool_max", "the pool's upper bound", value=self._pool.get_max_size())


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    return request.app[METRICS].exposition()


async def ready(request: web.Request) -> web.Response:
    """Readiness over plain HTTP, as the gRPC health service says it: for a probe that
    cannot speak TLS to a gRPC server that only serves TLS (Kubernetes' gRPC probe)."""
    serving = request.app[METRICS].is_serving
    return web.json_response({"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503)


async def alive(request: web.Request) -> web.Response:
    """Liveness: the event loop answers; deliberately checks nothing else, so a database
    outage never gets the process restarted."""
    return web.json_response({"status": "ALIVE"})


def add_routes(app: web.Application, metrics: Metrics) -> None:
    """GET /metrics and GET /livez on an aiohttp application (the sidecar's, or the
    server's own small one on METRICS_PORT)."""
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/livez", alive)
