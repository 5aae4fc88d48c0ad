"""Server reflection that also answers a method's name, so `grpcurl describe
billing.v1.InvoiceService.GetInvoice` prints the method's signature.

grpcio-reflection asks the descriptor pool for the file that contains a symbol, and
Python's pool knows services, messages, fields and enums by name but not methods: a
method's name is `KeyError`, answered NOT_FOUND ("Symbol not found"; grpc/grpc#34743,
open upstream). The pool here answers a method with its service's file, as the C++ and
Go servers do; everything else is the default pool's answer."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_reflection.v1alpha import reflection


class _MethodAwarePool:
    """The default descriptor pool, but `FindFileContainingSymbol` of a method finds the
    file of the service it belongs to. Only that lookup differs; the rest is delegated."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            # Raises KeyError itself for a symbol that is not a method either: NOT_FOUND.
            return self._pool.FindMethodByName(symbol).containing_service.file

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)


def enable(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Adds the reflection service for `service_names` (its own name included)."""
    names = [*service_names, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=_MethodAwarePool(descriptor_pool.Default()))
