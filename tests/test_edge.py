"""Every method the server exposes goes through the edge: walking the service's
descriptors, each one (other than health and reflection), server streams included,
refuses a call without a valid key, is counted in the metrics, and maps a method the
servicer lacks to UNIMPLEMENTED rather than INTERNAL. Adding an RPC without the edge fails
here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import symbol_database

from service.auth import READ_METHODS
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc
from service.grpc_server import GrpcServer, start_grpc
from service.metrics import Metrics
from service.rpc import InvoiceServicer
from service.storage import Storage
from service.watch import Watches
from tests.helpers import API_KEY, READ_KEY, READER, poll_until

SERVICE = pb.DESCRIPTOR.services_by_name["InvoiceService"]
METHODS = list(SERVICE.methods)


def _call(channel: grpc.aio.Channel, method: Any) -> Callable[..., Awaitable[Any]]:
    """Calls `method` and answers its reply, or for a server stream all its messages."""
    request = symbol_database.Default().GetSymbol(method.input_type.full_name)
    response = symbol_database.Default().GetSymbol(method.output_type.full_name)
    path, types = f"/{SERVICE.full_name}/{method.name}", (request.SerializeToString, response.FromString)
    if not method.server_streaming:
        return channel.unary_unary(path, request_serializer=types[0], response_deserializer=types[1])
    stream = channel.unary_stream(path, request_serializer=types[0], response_deserializer=types[1])

    async def read_all(message: Any, **kwargs: Any) -> list[Any]:
        return [m async for m in stream(message, **kwargs)]

    return read_all


@pytest.fixture
async def metered(store: Storage, watches: Watches) -> AsyncIterator[tuple[GrpcServer, Metrics]]:
    metrics = Metrics()
    running = await start_grpc(
        store, [API_KEY, f"{READER}:read:{READ_KEY}"], "127.0.0.1:0", metrics=metrics, watches=watches
    )
    yield running, metrics
    await running.server.stop(None)


def test_the_service_has_no_client_streaming_method_the_edge_cannot_guard() -> None:
    assert [m.name for m in METHODS if m.client_streaming] == []


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_every_method_refuses_a_call_without_a_valid_key_and_counts_it(
    metered: tuple[GrpcServer, Metrics], method: Any, key: str | None
) -> None:
    running, metrics = metered
    request_type = symbol_database.Default().GetSymbol(method.input_type.full_name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(channel, method)(request_type(), metadata=(("api-key", key),) if key else ())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def counted() -> float | None:
        # The edge counts a call as it ends, just after abort has sent its status.
        return metrics.registry.get_sample_value(
            "invoice_rpc_calls_total", {"method": method.name, "code": "UNAUTHENTICATED", "caller": "-"}
        )

    assert await poll_until(counted, f"{method.name} counted") == 1


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
async def test_a_read_key_may_list_get_and_watch_and_nothing_else(
    metered: tuple[GrpcServer, Metrics], method: Any
) -> None:
    """A method added later needs a write key unless it is named a read method."""
    running, metrics = metered
    request_type = symbol_database.Default().GetSymbol(method.input_type.full_name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        try:
            await _call(channel, method)(request_type(), metadata=(("api-key", READ_KEY),), timeout=0.5)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = exc.details() or ""
    if method.name in READ_METHODS:
        # Past the key: validated (an empty Get), answered, or a watch that ran until the deadline.
        assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED}
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert f"{READER!r} is a read key" in details and method.name in details
        assert READ_KEY not in details

    async def counted() -> float | None:
        # A watch the client's deadline ended is CANCELLED on the server's side.
        server_code = "CANCELLED" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
        return metrics.registry.get_sample_value(
            "invoice_rpc_calls_total", {"method": method.name, "code": server_code, "caller": READER}
        )

    assert await poll_until(counted, f"{method.name} counted under {READER}") == 1


class Partial(InvoiceServicer):
    """A servicer that lacks a method: what a new RPC looks like before it is written."""


async def test_a_method_the_servicer_lacks_is_unimplemented(store: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Partial, "VoidInvoice", pb_grpc.InvoiceServiceServicer.VoidInvoice)
    monkeypatch.setattr("service.grpc_server.InvoiceServicer", Partial)
    running = await start_grpc(store, [API_KEY], "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _call(channel, SERVICE.methods_by_name["VoidInvoice"])(
                    pb.VoidInvoiceRequest(id="in_x"), metadata=(("api-key", API_KEY),)
                )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.server.stop(None)


async def test_a_stream_is_logged_once_when_it_ends_and_counted_as_it_goes(
    metered: tuple[GrpcServer, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    running, metrics = metered
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InvoiceServiceStub(channel)
        call = stub.WatchInvoices(pb.WatchInvoicesRequest(), metadata=(("api-key", API_KEY),))
        assert isinstance(await call.read(), pb.InvoiceEvent)
        assert metrics.registry.get_sample_value("invoice_rpc_streams_open", {"method": "WatchInvoices"}) == 1

        async def counted() -> float | None:
            # A message is counted once gRPC has written it and asks the stream for the
            # next, which may come after this client has read it.
            value = metrics.registry.get_sample_value("invoice_rpc_stream_messages_total", {"method": "WatchInvoices"})
            return value or None

        assert await poll_until(counted, "the first message counted") == 1
        with caplog.at_level("INFO", logger="service.edge"):
            call.cancel()

            async def logged() -> list[Any] | None:
                return [r for r in caplog.records if getattr(r, "method", "") == "WatchInvoices"] or None

            (line,) = await poll_until(logged, "the stream's log line")
    assert (line.code, line.messages) == ("CANCELLED", 1)
    assert metrics.registry.get_sample_value("invoice_rpc_streams_open", {"method": "WatchInvoices"}) == 0
    assert (
        metrics.registry.get_sample_value(
            "invoice_rpc_calls_total", {"method": "WatchInvoices", "code": "CANCELLED", "caller": "key1"}
        )
        == 1
    )
