"""TLS on every hop, with a local CA (tools/tls.py) and the real Envoy, server and grpcurl:
HTTPS at the gateway (plaintext refused), Envoy to the server over TLS with a client
certificate and its health checks passing, and the server requiring client certificates
(mTLS): none or another CA's refused, the configured CA's accepted, its subject naming the
caller in the log and the metrics, a `read` subject refused every write."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from service.config import Settings
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import GrpcServer, ServerTls, start_grpc
from service.metrics import Metrics
from service.storage import Storage
from tests.helpers import API_KEY, READ_KEY, READER, envoy_hosts, make_invoice, save_invoice, stack_env, wait_until
from tools import tls as local_tls
from tools.stack import backend, wait_until_routed

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> local_tls.LocalTls:
    return local_tls.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> local_tls.LocalTls:
    return local_tls.make(tmp_path_factory.mktemp("other-tls"))


async def _mtls_server(store: Storage, ca: local_tls.LocalTls, subjects: tuple[str, ...]) -> tuple[GrpcServer, Metrics]:
    """A server requiring client certificates of `ca`, naming callers by `subjects`."""
    metrics = Metrics()
    tls = ServerTls(ca.cert("server").read_bytes(), ca.key("server").read_bytes(), ca.ca.read_bytes(), subjects)
    running = await start_grpc(store, [API_KEY, f"{READER}:read:{READ_KEY}"], "127.0.0.1:0", metrics=metrics, tls=tls)
    return running, metrics


@pytest.fixture
async def secured(store: Storage, ca: local_tls.LocalTls) -> AsyncIterator[tuple[GrpcServer, Metrics]]:
    subjects = (f"{local_tls.CLI_SUBJECT}:write", f"{local_tls.ENVOY_SUBJECT}-not-listed:read")
    running, metrics = await _mtls_server(store, ca, subjects)
    yield running, metrics
    await running.server.stop(None)


def _channel(port: int, ca: local_tls.LocalTls, client: tuple[local_tls.LocalTls, str] | None) -> grpc.aio.Channel:
    chain = key = None
    if client is not None:
        issuer, name = client
        chain, key = issuer.cert(name).read_bytes(), issuer.key(name).read_bytes()
    credentials = grpc.ssl_channel_credentials(ca.ca.read_bytes(), private_key=key, certificate_chain=chain)
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def _list(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    try:
        await pb_grpc.InvoiceServiceStub(channel).ListInvoices(pb.ListInvoicesRequest(), metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_mtls_refuses_no_certificate_and_another_cas_and_names_the_callers_subject(
    secured: tuple[GrpcServer, Metrics],
    ca: local_tls.LocalTls,
    other_ca: local_tls.LocalTls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running, metrics = secured
    async with _channel(running.port, ca, None) as anonymous:
        assert await _list(anonymous, (("api-key", API_KEY),)) == grpc.StatusCode.UNAVAILABLE  # no handshake
    async with _channel(running.port, ca, (other_ca, local_tls.CLI_SUBJECT)) as foreign:
        assert await _list(foreign, (("api-key", API_KEY),)) == grpc.StatusCode.UNAVAILABLE
    caplog.set_level(logging.INFO, logger="service.edge")
    async with _channel(running.port, ca, (ca, local_tls.CLI_SUBJECT)) as cli:
        assert await _list(cli) == grpc.StatusCode.OK  # the subject names a write caller: no key needed
    async with _channel(running.port, ca, (ca, local_tls.ENVOY_SUBJECT)) as envoy:
        assert await _list(envoy) == grpc.StatusCode.UNAUTHENTICATED  # a subject not listed names no one
        assert await _list(envoy, (("api-key", READ_KEY),)) == grpc.StatusCode.OK  # a key still does
    named = [r for r in caplog.records if getattr(r, "method", None) == "ListInvoices"]
    assert [getattr(r, "caller", None) for r in named] == [local_tls.CLI_SUBJECT, "-", READER]
    assert metrics.registry.get_sample_value(
        "invoice_rpc_calls_total", {"method": "ListInvoices", "code": "OK", "caller": local_tls.CLI_SUBJECT}
    )


async def test_a_read_scoped_subject_reads_and_is_denied_every_write(store: Storage, ca: local_tls.LocalTls) -> None:
    """A certificate whose subject is listed with `read` names a read caller, as a read
    key does: List and Get answer; a write is PERMISSION_DENIED, naming the subject, where
    the same call from a `write` subject gets past the edge."""
    invoice = await save_invoice(store, make_invoice(1, status="paid"))
    subjects = (f"{local_tls.CLI_SUBJECT}:write", f"{local_tls.ENVOY_SUBJECT}:read")
    running, _ = await _mtls_server(store, ca, subjects)
    void = pb.VoidInvoiceRequest(id=invoice.stripe_invoice_id)
    try:
        async with _channel(running.port, ca, (ca, local_tls.ENVOY_SUBJECT)) as reader:
            stub = pb_grpc.InvoiceServiceStub(reader)
            assert await _list(reader) == grpc.StatusCode.OK
            got = await stub.GetInvoice(pb.GetInvoiceRequest(id=invoice.id), timeout=5)
            assert got.invoice_id == invoice.stripe_invoice_id
            for write in (
                stub.VoidInvoice(void, timeout=5),
                stub.PayInvoice(pb.PayInvoiceRequest(id=invoice.id), timeout=5),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await write
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert local_tls.ENVOY_SUBJECT in (denied.value.details() or "")
        async with _channel(running.port, ca, (ca, local_tls.CLI_SUBJECT)) as writer:
            with pytest.raises(grpc.aio.AioRpcError) as reached:
                await pb_grpc.InvoiceServiceStub(writer).VoidInvoice(void, timeout=5)
            # Past the edge to the handler, which has no Stripe here.
            assert reached.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Stripe is not configured" in (reached.value.details() or "")
    finally:
        await running.server.stop(None)


async def test_grpcurl_reaches_the_tls_server_with_the_ca_and_a_client_certificate(
    secured: tuple[GrpcServer, Metrics], ca: local_tls.LocalTls
) -> None:
    running, _ = secured
    client = ["-cert", str(ca.cert(local_tls.CLI_SUBJECT)), "-key", str(ca.key(local_tls.CLI_SUBJECT))]
    target = f"localhost:{running.port}"
    # In a thread: the server answers on this test's event loop.
    ok = await asyncio.to_thread(
        subprocess.run,
        [GRPCURL, "-cacert", str(ca.ca), *client, target, "billing.v1.InvoiceService/ListInvoices"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {}  # an empty page: count 0 is proto3's default, not printed
    plain = await asyncio.to_thread(
        subprocess.run, [GRPCURL, "-plaintext", target, "list"], capture_output=True, text=True, timeout=30, check=False
    )
    assert plain.returncode != 0


def _gateway_settings(tls_env: dict[str, str]) -> Settings:
    """Envoy's settings from the TLS environment (the stack renders its configuration here)."""
    return Settings.model_validate({k.lower(): v for k, v in tls_env.items() if k.startswith("GATEWAY_")})


def test_envoy_refuses_a_server_certificate_that_does_not_name_the_upstream_host(
    database: str, tmp_path: Path, localstripe: str, ca: local_tls.LocalTls
) -> None:
    """Any certificate of the CA is not enough: here the server presents a client's
    (`cli`, named cli.local), and Envoy never routes to it."""
    tls_env = ca.env() | {"GRPC_TLS_CERT": str(ca.cert("cli")), "GRPC_TLS_KEY": str(ca.key("cli"))}
    settings = _gateway_settings(tls_env)
    env = stack_env(database, tmp_path, localstripe) | tls_env
    context = ssl.create_default_context(cafile=str(ca.ca))
    with (tmp_path / "stack.log").open("w") as log, backend(env, tmp_path, log=log, settings=settings) as running:
        base = f"https://localhost:{running.gateway_port}"
        # The sidecar's certificate does name the host: Envoy routes to it meanwhile.
        wait_until(
            lambda: (
                True
                if httpx.post(f"{base}/webhooks/stripe", content=b"{}", verify=context).status_code == 400
                else None
            ),
            "the sidecar routed",
        )
        replies = {
            httpx.get(f"{base}/admin/api/invoices", headers={"Api-Key": API_KEY}, verify=context).status_code
            for _ in range(10)
        }
        hosts = envoy_hosts(running.admin_port)
    servers = {host: ok for host, ok in hosts.items() if host.startswith("invoice_grpc::")}
    assert replies == {503}
    assert servers and not any(servers.values())


@pytest.fixture
def tls_stack(
    database: str, tmp_path: Path, localstripe: str, ca: local_tls.LocalTls
) -> Iterator[tuple[str, int, Path]]:
    tls_env = ca.env()
    settings = _gateway_settings(tls_env)
    env = stack_env(database, tmp_path, localstripe) | tls_env | {"LOG_LEVEL": "DEBUG"}
    log_path = tmp_path / "stack.log"
    with log_path.open("w") as log, backend(env, tmp_path, log=log, settings=settings) as running:
        base = f"https://localhost:{running.gateway_port}"
        wait_until_routed(base, API_KEY, ca=ca.ca)
        yield base, running.admin_port, log_path


def test_https_at_the_gateway_and_tls_to_the_server_with_health_checks_passing(
    tls_stack: tuple[str, int, Path], ca: local_tls.LocalTls
) -> None:
    base, admin_port, log_path = tls_stack
    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(ca.ca),
            "-H",
            f"Api-Key: {API_KEY}",
            f"{base}/admin/api/invoices?page=1&limit=5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert curl.returncode == 0, curl.stderr
    assert '"count"' in curl.stdout
    # Without the CA the certificate is not trusted; plaintext to the TLS listener gets no answer.
    assert (
        subprocess.run(["curl", "-sS", f"{base}/admin/api/invoices"], capture_output=True, check=False).returncode != 0
    )
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https://", "http://") + "/admin/api/invoices", timeout=5)

    # Envoy's health checks reach the server over TLS, with Envoy's client certificate.
    def healthy() -> bool | None:
        named = {host.split("::")[0] for host, ok in envoy_hosts(admin_port).items() if ok}
        return True if named == {"invoice_grpc", "webhooks"} else None

    wait_until(healthy, "Envoy's health checks passing over TLS")
    # ...and the sidecar's: a delivery through HTTPS Envoy reaches it over TLS (unsigned: 400).
    unsigned = httpx.post(
        f"{base}/webhooks/stripe", content=b"{}", verify=ssl.create_default_context(cafile=str(ca.ca))
    )
    assert unsigned.status_code == 400 and "Stripe-Signature" in unsigned.text
    # A REST call through Envoy (whose certificate names no caller) is named by its key.
    assert f'"caller": "{READER}"' not in log_path.read_text()
    reply = httpx.get(
        f"{base}/admin/api/invoices",
        headers={"Api-Key": READ_KEY},
        verify=ssl.create_default_context(cafile=str(ca.ca)),
        timeout=10,
    )
    assert reply.status_code == 200
    wait_until(
        lambda: True if f'"caller": "{READER}"' in log_path.read_text() else None, "the read key named in the log"
    )
    # At DEBUG, no private key and no API key reaches the logs (the certificates' paths may).
    logged = log_path.read_text()
    for name in ("server", local_tls.ENVOY_SUBJECT):
        body = [line for line in ca.key(name).read_text().splitlines() if not line.startswith("-----")]
        assert not [line for line in body if line in logged]
    assert API_KEY not in logged and READ_KEY not in logged
