"""The gRPC edge's cross-cutting rules, applied to every InvoiceService method once, when
the server is built: each call observed (a log line and metrics, under its request id),
who may call (admin API keys), and how domain errors become gRPC statuses. The health and
reflection services are not wrapped: they stay open (and unlogged: Envoy checks health
every second) so probes and grpcurl work without a key."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import logs
from service.domain import DomainError, InvalidArgument
from service.errors import status_of
from service.logs import REQUEST_ID
from service.metrics import Metrics

log = logging.getLogger(__name__)

Behavior = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Any]]


def _status(error: DomainError) -> grpc.Status:
    code, _ = status_of(error)
    status = status_pb2.Status(code=code, message=str(error))
    if isinstance(error, InvalidArgument):
        detail = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=error.field, description=str(error))]
        )
        status.details.add().Pack(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


class ApiKeys:
    """Metadata `api-key` must equal one of the admin keys, compared in constant time
    against every key so timing tells nothing about which one nearly matched."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]
        if not self._keys:
            raise ValueError("at least one admin API key is required")

    def allow(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        offered = next((v for k, v in metadata if k == "api-key"), None)
        if offered is None:
            return False
        candidate = offered.encode() if isinstance(offered, str) else offered
        return sum(hmac.compare_digest(candidate, key) for key in self._keys) > 0


def _final_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _answer(
    behavior: Behavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str, request_id: str
) -> Any:
    """Domain errors become their status; anything unexpected INTERNAL with a generic
    message: callers never see UNKNOWN or a stack trace."""
    try:
        return await behavior(request, context)
    except DomainError as error:
        status = _status(error)
        # abort's trailers replace those set earlier: the request id goes with the details.
        trailers = (*status.trailing_metadata, ("x-request-id", request_id))
        await context.abort(status.code, status.details, trailers)
    except NotImplementedError:  # the generated base's answer for a method the servicer lacks
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    except Exception:
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class Edge:
    """Times every call, counts it by method and final status code (refused ones too),
    and logs one line for it with the request id Envoy set (x-request-id) or, for a
    direct gRPC caller, a new one, which goes back as trailing metadata; refuses calls
    without a valid key, and all calls until the server is first ready; maps errors.
    Applied once per method when the server is built, not as a grpc.aio interceptor: an
    interceptor runs a coroutine and builds a handler on every call, measurably slower on
    a GetInvoice (make bench)."""

    def __init__(self, api_keys: Iterable[str], metrics: Metrics, *, ready: bool = True) -> None:
        self._keys = ApiKeys(api_keys)
        self._metrics = metrics
        # Why calls are refused until the server first becomes ready, or None once it has:
        # a caller that skips health checks (grpcurl, a misconfigured proxy) must not run
        # against a schema older than this code. Shutdown does not set it again: the drain
        # serves the calls that still arrive.
        self.not_ready: str | None = None if ready else "starting"

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        keys, calls, seconds_by = self._keys, self._metrics.rpc_calls, self._metrics.rpc_seconds
        rules = self
        # This method's series by final code, looked up once each (labels() takes a lock).
        series: dict[str, tuple[Any, Any]] = {}

        async def edge(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata() or ()
            request_id = logs.request_id(next((str(v) for k, v in metadata if k == "x-request-id"), None))
            token = REQUEST_ID.set(request_id)
            started, code = time.perf_counter(), "OK"
            try:
                context.set_trailing_metadata((("x-request-id", request_id),))
                if not keys.allow(metadata):
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED, "missing or invalid api-key metadata (REST: Api-Key header)"
                    )
                if rules.not_ready is not None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"not ready: {rules.not_ready}; retry later")
                return await _answer(behavior, request, context, method, request_id)
            except BaseException as exc:
                code = _final_code(context, exc)
                raise
            finally:
                seconds = time.perf_counter() - started
                counted = series.get(code)
                if counted is None:
                    counted = series[code] = (calls.labels(method, code), seconds_by.labels(method, code))
                counted[0].inc()
                counted[1].observe(seconds)
                if log.isEnabledFor(logging.INFO):
                    log.info("rpc", extra={"method": method, "code": code, "duration_ms": round(seconds * 1000, 2)})
                REQUEST_ID.reset(token)

        return edge
