"""The gRPC server: the servicer wrapped in the edge rules, health and reflection on one
grpc.aio server, plaintext or TLS (mTLS with client subjects), its health reporting and its
graceful stop. What it serves is given to it (service/app.py composes it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service import reflection
from service.config import default
from service.edge import Edge
from service.gen.billing.v1 import invoice_service_pb2, invoice_service_pb2_grpc
from service.invoices import NoStripe
from service.metrics import Metrics
from service.rpc import AuditTrail, Creator, CreditNotes, InvoiceServicer, InvoiceStore
from service.validation import DEFAULT_MAX_OFFSET
from service.watch import Watches

SERVICE_NAME = invoice_service_pb2.DESCRIPTOR.services_by_name["InvoiceService"].full_name
# gRPC's default metadata limit is soft: between 8 and 16 KiB it refuses calls at random
# (RESOURCE_EXHAUSTED). One fixed limit, above the 32 KiB of headers Envoy forwards, lets
# every forwarded call reach the Api-Key check and answer the same way every time.
MAX_METADATA_BYTES = 64 * 1024


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    edge: Edge
    watches: Watches | None = None
    metrics: Metrics | None = None

    async def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if serving:
            self.edge.not_ready = None
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if self.metrics is not None:
            self.metrics.set_serving(serving)

    def not_ready(self, reason: str) -> None:
        """Before the first SERVING: calls are refused as UNAVAILABLE with this reason."""
        if self.edge.not_ready is not None:
            self.edge.not_ready = reason

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """Reports NOT_SERVING first and keeps serving for `drain_delay` seconds, so health
        checking proxies stop sending before the port closes; then ends the watches with
        UNAVAILABLE (their callers resume on another replica), refuses new calls and lets
        in-flight ones finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            self.metrics.set_serving(False)
        await asyncio.sleep(drain_delay)
        if self.watches is not None:
            await self.watches.close()
        await self.server.stop(grace)


async def start_grpc(
    store: InvoiceStore,
    api_keys: list[str],
    address: str,
    *,
    creator: Creator | None = None,
    default_currency: str = default("stripe_default_currency"),
    ready: bool = True,
    metrics: Metrics | None = None,
    max_offset: int = DEFAULT_MAX_OFFSET,
    watches: Watches | None = None,
    audit: AuditTrail | None = None,
    notes: CreditNotes | None = None,
    tls: ServerTls | None = None,
) -> GrpcServer:
    """Starts the server on `address` (port 0 picks a free one) and returns it running;
    health says SERVING now if `ready`, else NOT_SERVING until `set_serving`. It stops
    `watches` when it stops."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ]
    )
    servicer = InvoiceServicer(store, creator or NoStripe(), default_currency, max_offset, watches, audit, notes)
    metrics = metrics or Metrics()
    edge = Edge(api_keys, metrics, ready=ready, subjects=tls.client_subjects if tls else ())
    methods = invoice_service_pb2.DESCRIPTOR.services_by_name["InvoiceService"].methods_by_name
    streaming = [name for name, m in methods.items() if m.client_streaming]
    if streaming:  # the edge wraps unary calls and server streams: one would skip it, or break, unnoticed
        raise NotImplementedError(f"the gRPC edge cannot guard client-streaming methods yet: {', '.join(streaming)}")
    # The generated registration looks the methods up by name: it gets the wrapped ones.
    guarded = SimpleNamespace(
        **{
            name: (edge.wrap_stream if m.server_streaming else edge.wrap)(name, getattr(servicer, name))
            for name, m in methods.items()
        }
    )
    invoice_service_pb2_grpc.add_InvoiceServiceServicer_to_server(guarded, server)  # type: ignore[arg-type]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable([SERVICE_NAME, health.SERVICE_NAME], server)
    port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    await server.start()
    running = GrpcServer(server, port, health_servicer, edge, watches, metrics)
    await running.set_serving(ready)
    return running


@dataclass(frozen=True)
class ServerTls:
    """The gRPC server's TLS: its certificate chain and key (PEM), and with a client CA,
    client certificates required (mTLS), those of `client_subjects` naming callers."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None
    client_subjects: tuple[str, ...] = ()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=self.client_ca is not None
        )
