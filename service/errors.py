"""The one table from each domain error to the status its callers see: the google.rpc
code (gRPC's status, and the `code` of every JSON error body) and the HTTP status of
the REST gateway and the webhook sidecar. Envoy's transcoder maps the gRPC codes to the
same HTTP statuses; tests/test_errors.py holds the two to each other."""

from __future__ import annotations

from google.rpc import code_pb2

from service.domain import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)

# Most specific first: a subclass (CreateInProgress is an Unavailable) takes its parent's row.
STATUSES: dict[type[DomainError], tuple[int, int]] = {
    InvalidArgument: (code_pb2.INVALID_ARGUMENT, 400),
    FailedPrecondition: (code_pb2.FAILED_PRECONDITION, 400),
    NotFound: (code_pb2.NOT_FOUND, 404),
    AlreadyExists: (code_pb2.ALREADY_EXISTS, 409),
    ResourceExhausted: (code_pb2.RESOURCE_EXHAUSTED, 429),
    OutOfRange: (code_pb2.OUT_OF_RANGE, 400),
    Unavailable: (code_pb2.UNAVAILABLE, 503),
    Internal: (code_pb2.INTERNAL, 500),
}


def status_of(error: DomainError) -> tuple[int, int]:
    """(google.rpc code, HTTP status) of the error."""
    for cls in type(error).__mro__:
        found = STATUSES.get(cls)
        if found is not None:
            return found
    raise TypeError(f"no status for {type(error).__name__}")
