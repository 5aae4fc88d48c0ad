"""The framework ceiling: a bare grpc.aio server whose GetInvoice returns one constant
invoice of a real invoice's size, with no interceptors, storage or validation. What the
real server reaches is compared with this, on the same machine, in the same run."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from service import announce
from service.gen.billing.v1 import invoice_service_pb2 as pb
from service.gen.billing.v1 import invoice_service_pb2_grpc as pb_grpc

CONSTANT = pb.Invoice(
    id="65490130ff600e06af2a9694",
    invoice_id="in_1O9UOhA0ZUrt0vQJoum7M20X",
    user=pb.User(id="6548a41138406c14db33b606", name="John Doe"),
    status="paid",
    amount=3300,
    invoice_pdf="https://pay.stripe.com/invoice/acct_1NOaelA0ZUrt0vQJ/test_YWNjdF8xTk9hZWxBMFpVcnQwdlFKLF9PeFBENUF5elR4cDU3bU5ycVVreUVuVVd3dm5hTmhnLDg5ODI0MDY202009yaqn40z/pdf?s=ap",
    created_at=timestamp_pb2.Timestamp(seconds=1699283248, nanos=550_000_000),
    updated_at=timestamp_pb2.Timestamp(seconds=1699283266, nanos=295_000_000),
)


class Constant(pb_grpc.InvoiceServiceServicer):
    async def GetInvoice(
        self, request: pb.GetInvoiceRequest, context: grpc.aio.ServicerContext[pb.GetInvoiceRequest, pb.Invoice]
    ) -> pb.Invoice:
        return CONSTANT

    async def ListInvoices(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def CreateInvoice(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def PayInvoice(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def VoidInvoice(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def MarkUncollectible(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def RefundInvoice(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def ListInvoiceCreditNotes(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def ListInvoiceAudit(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")

    async def WatchInvoices(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling serves GetInvoice only")
        yield  # an async generator, as a server-streaming method is


async def serve() -> None:
    server = grpc.aio.server()
    pb_grpc.add_InvoiceServiceServicer_to_server(Constant(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"gRPC  ceiling  localhost:{port}", flush=True)
    announce.listening("ceiling", grpc=port)
    await server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(asyncio.run(serve()))
