"""The composition root: builds the store, the servicer, the interceptors, health and
reflection into one grpc.aio server, and runs it until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import embedded, storage
from service.config import Settings
from service.gen.billing.v1 import invoice_service_pb2, invoice_service_pb2_grpc
from service.interceptors import ApiKeyInterceptor, ErrorInterceptor
from service.rpc import InvoiceServicer, InvoiceStore

log = logging.getLogger(__name__)

SERVICE_NAME = invoice_service_pb2.DESCRIPTOR.services_by_name["InvoiceService"].full_name


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """Reports NOT_SERVING first and keeps serving for `drain_delay` seconds, so health
        checking proxies stop sending before the port closes; then refuses new calls and
        lets in-flight ones finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(drain_delay)
        await self.server.stop(grace)


async def start_grpc(store: InvoiceStore, api_keys: list[str], address: str) -> GrpcServer:
    """Starts the server on `address` (port 0 picks a free one) and returns it running."""
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(api_keys), ErrorInterceptor()])
    invoice_service_pb2_grpc.add_InvoiceServiceServicer_to_server(InvoiceServicer(store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, port, health_servicer)


def database_url(settings: Settings) -> str:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    log.info("DATABASE_URL is not set: starting the embedded Postgres under %s", settings.data_dir)
    return embedded.start(Path(settings.data_dir) / "postgres")


def admin_api_keys(settings: Settings) -> list[str]:
    """The configured keys; in a local run without any, a dev key kept under DATA_DIR."""
    if settings.admin_api_keys:
        return [k.get_secret_value() for k in settings.admin_api_keys]
    if settings.database_url is not None:
        raise SystemExit("ADMIN_API_KEYS must be set when DATABASE_URL is set")
    path = Path(settings.data_dir) / "dev-admin-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    key = path.read_text().strip()
    print(f"ADMIN_API_KEYS is not set: local dev key (also in {path}): {key}", flush=True)
    return [key]


async def serve(settings: Settings) -> None:
    keys = admin_api_keys(settings)
    pool = await storage.connect(
        database_url(settings),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        command_timeout=settings.db_command_timeout_s,
    )
    try:
        running = await start_grpc(storage.Storage(pool), keys, f"{settings.grpc_host}:{settings.grpc_port}")
        log.info("gRPC server listening", extra={"port": running.port, "service": SERVICE_NAME})
        print(f"gRPC  InvoiceService  localhost:{running.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", extra={"drain_s": settings.shutdown_drain_s, "grace_s": settings.shutdown_grace_s})
        await running.stop(settings.shutdown_grace_s, settings.shutdown_drain_s)
    finally:
        await pool.close()
