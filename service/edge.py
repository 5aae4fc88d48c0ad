"""The gRPC edge's cross-cutting rules, applied to every InvoiceService method once, when
the server is built: each call observed (a log line and metrics, under its request id),
who may call (admin API keys with names and scopes, service/auth.py), and how domain
errors become gRPC statuses. Streams
(WatchInvoices) get the same rules: the key and readiness checks before the first
message, errors mapped whenever they come, and one log line when the stream ends, with
the messages it sent. The health and
reflection services are not wrapped: they stay open (and unlogged: Envoy checks health
every second) so probes and grpcurl work without a key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import logs
from service.auth import CALLER, ApiKeys
from service.domain import DomainError, InvalidArgument
from service.errors import status_of
from service.logs import REQUEST_ID
from service.metrics import Metrics

log = logging.getLogger(__name__)

Behavior = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Any]]
StreamBehavior = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], AsyncGenerator[Any, None]]


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


def _subject(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The common name of the client certificate the TLS handshake verified (mTLS only:
    without a client CA there is none)."""
    name = next(iter(context.auth_context().get("x509_common_name", ())), None)
    return name.decode(errors="replace") if name is not None else None


def _final_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> str:
    # A stream whose caller went away while its handler was suspended is closed (GeneratorExit).
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _refuse(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str, request_id: str
) -> NoReturn:
    """Domain errors become their status; anything unexpected INTERNAL with a generic
    message: callers never see UNKNOWN or a stack trace."""
    if isinstance(exc, DomainError):
        status = _status(exc)
        # abort's trailers replace those set earlier: the request id goes with the details.
        trailers = (*status.trailing_metadata, ("x-request-id", request_id))
        await context.abort(status.code, status.details, trailers)
    if isinstance(exc, NotImplementedError):  # the generated base's answer for a method the servicer lacks
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    log.error("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class Edge:
    """Times every call, counts it by method and final status code (refused ones too),
    and logs one line for it with the request id Envoy set (x-request-id) or, for a
    direct gRPC caller, a new one, which goes back as trailing metadata; refuses calls
    without a valid key, and all calls until the server is first ready; maps errors.
    Applied once per method when the server is built, not as a grpc.aio interceptor: an
    interceptor runs a coroutine and builds a handler on every call, measurably slower on
    a GetInvoice (make bench)."""

    def __init__(
        self, api_keys: Iterable[str], metrics: Metrics, *, ready: bool = True, subjects: Iterable[str] = ()
    ) -> None:
        self._keys = ApiKeys(api_keys, subjects)
        self._metrics = metrics
        # Why calls are refused until the server first becomes ready, or None once it has:
        # a caller that skips health checks (grpcurl, a misconfigured proxy) must not run
        # against a schema older than this code. Shutdown does not set it again: the drain
        # serves the calls that still arrive.
        self.not_ready: str | None = None if ready else "starting"

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], metadata: Any, method: str) -> None:
        """Names the caller (CALLER) and refuses it unless its key or certificate may call
        `method` now."""
        offered = next((v for k, v in metadata if k == "api-key"), None)
        caller = self._keys.identify(offered, _subject(context) if offered is None else None)
        if caller is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or invalid api-key metadata (REST: Api-Key header)"
            )
        CALLER.set(caller)
        if not caller.may_call(method):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the key {caller.name!r} is a {caller.scope} key: it may list, get and watch;"
                f" {method} needs a write key",
            )
        if self.not_ready is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not ready: {self.not_ready}; retry later")

    def _recorder(self, method: str) -> Callable[[str, float, dict[str, Any]], None]:
        """Counts, times and logs one finished call of `method` by its final code, and by
        its caller's name (`-` for a call refused before it named one)."""
        calls, seconds_by = self._metrics.rpc_calls, self._metrics.rpc_seconds
        # This method's series by final code and caller, looked up once each (labels() takes a lock).
        series: dict[tuple[str, str], tuple[Any, Any]] = {}

        def record(code: str, seconds: float, extra: dict[str, Any]) -> None:
            caller = CALLER.get()
            name = caller.name if caller is not None else "-"
            counted = series.get((code, name))
            if counted is None:
                counted = series[code, name] = (calls.labels(method, code, name), seconds_by.labels(method, code))
            counted[0].inc()
            counted[1].observe(seconds)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "rpc",
                    extra={
                        "method": method,
                        "code": code,
                        "caller": name,
                        "duration_ms": round(seconds * 1000, 2),
                        **extra,
                    },
                )

        return record

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        record, admit = self._recorder(method), self._admit
        no_extra: dict[str, Any] = {}

        async def edge(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata() or ()
            request_id = logs.request_id(next((str(v) for k, v in metadata if k == "x-request-id"), None))
            token, caller_token = REQUEST_ID.set(request_id), CALLER.set(None)
            started, code = time.perf_counter(), "OK"
            try:
                context.set_trailing_metadata((("x-request-id", request_id),))
                await admit(context, metadata, method)
                try:
                    return await behavior(request, context)
                except Exception as exc:
                    await _refuse(context, exc, method, request_id)
            except BaseException as exc:
                code = _final_code(context, exc)
                raise
            finally:
                record(code, time.perf_counter() - started, no_extra)
                CALLER.reset(caller_token)
                REQUEST_ID.reset(token)

        return edge

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        """As `wrap`, for a server stream: the streams open and the messages sent are
        counted as they go, the call when it ends."""
        record, admit = self._recorder(method), self._admit
        streams, sent_total = self._metrics.streams_open.labels(method), self._metrics.stream_messages.labels(method)

        async def edge(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncGenerator[Any, None]:
            metadata = context.invocation_metadata() or ()
            request_id = logs.request_id(next((str(v) for k, v in metadata if k == "x-request-id"), None))
            token, caller_token = REQUEST_ID.set(request_id), CALLER.set(None)
            started, code, sent = time.perf_counter(), "OK", 0
            try:
                context.set_trailing_metadata((("x-request-id", request_id),))
                await admit(context, metadata, method)
                streams.inc()
                try:
                    # Closed here, not whenever the collector gets to it: its cleanup runs
                    # when the stream ends.
                    async with contextlib.aclosing(behavior(request, context)) as messages:
                        async for message in messages:
                            yield message
                            sent += 1
                            sent_total.inc()
                except Exception as exc:
                    await _refuse(context, exc, method, request_id)
                finally:
                    streams.dec()
            except BaseException as exc:
                code = _final_code(context, exc)
                raise
            finally:
                record(code, time.perf_counter() - started, {"messages": sent})
                with contextlib.suppress(ValueError):  # a generator closed from another context
                    CALLER.reset(caller_token)
                    REQUEST_ID.reset(token)

        return edge
