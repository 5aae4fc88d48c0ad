"""Who is calling, and what they may do. An admin API key has a name and a scope: `read`
(List, Get, Watch) or `write` (every call). ADMIN_API_KEYS lists them as
`name:scope:key`; a bare `key`, the form from before keys had names, means `write`, so
existing deployments keep working. With mTLS, a client certificate whose subject is
listed (GRPC_TLS_CLIENT_SUBJECTS) names its caller instead of a key. The name (never the
key) is what logs, metrics and the audit trail say about a caller. This module knows no gRPC: the edge (service/edge.py)
hands it the offered key and asks whether a method is allowed."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, get_args

Scope = Literal["read", "write"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
# The calls a `read` key may make; every other method (those added later too) needs `write`.
READ_METHODS = frozenset({"ListInvoices", "GetInvoice", "WatchInvoices", "ListInvoiceCreditNotes"})


@dataclass(frozen=True)
class Caller:
    name: str
    scope: Scope

    def may_call(self, method: str) -> bool:
        return self.scope == "write" or method in READ_METHODS


# The caller of the call being handled, set by the edge (for the audit trail's `who`).
CALLER: ContextVar[Caller | None] = ContextVar("caller", default=None)


def parse_keys(entries: Iterable[str]) -> list[tuple[Caller, str]]:
    """ADMIN_API_KEYS' entries as callers and their keys. `name:scope:key` (the key may
    itself hold colons); an entry without two colons is a bare key, named `key1`, `key2`…
    by its place. Raises ValueError naming the entry by place, never by its key."""
    keys: list[tuple[Caller, str]] = []
    for place, entry in enumerate(entries, start=1):
        if entry.count(":") < 2:
            name, scope, key = f"key{place}", "write", entry
        else:
            name, scope, key = entry.split(":", 2)
        if scope not in SCOPES:
            raise ValueError(f"ADMIN_API_KEYS entry {place}: the scope must be one of {', '.join(SCOPES)}")
        if not name or not key:
            raise ValueError(f"ADMIN_API_KEYS entry {place}: expected name:scope:key or a bare key")
        keys.append((Caller(name, scope), key))
    names = [caller.name for caller, _ in keys]
    if len(set(names)) != len(names):
        raise ValueError("ADMIN_API_KEYS: every key needs a name of its own")
    return keys


def parse_subjects(entries: Iterable[str]) -> dict[str, Caller]:
    """GRPC_TLS_CLIENT_SUBJECTS' `subject:scope` entries: the client certificates, by their
    subject's common name, that name a caller without an api-key."""
    subjects: dict[str, Caller] = {}
    for place, entry in enumerate(entries, start=1):
        name, _, scope = entry.rpartition(":")
        if not name or scope not in SCOPES:
            raise ValueError(f"GRPC_TLS_CLIENT_SUBJECTS entry {place}: expected subject:scope, scope read or write")
        if name in subjects:
            raise ValueError(f"GRPC_TLS_CLIENT_SUBJECTS entry {place}: {name!r} is listed twice")
        subjects[name] = Caller(name, scope)
    return subjects


class ApiKeys:
    """The offered key must equal one of the admin keys, compared in constant time against
    every key, so timing tells nothing about which one nearly matched."""

    def __init__(self, entries: Iterable[str], subjects: Iterable[str] = ()) -> None:
        self._keys = [(caller, key.encode()) for caller, key in parse_keys(entries)]
        self._subjects = parse_subjects(subjects)
        if not self._keys:
            raise ValueError("at least one admin API key is required")

    def identify(self, offered: str | bytes | None, subject: str | None = None) -> Caller | None:
        """The caller the offered key names; without a key, the one the client
        certificate's verified subject names (mTLS), if listed."""
        if offered is None:
            return self._subjects.get(subject) if subject is not None else None
        candidate = offered.encode() if isinstance(offered, str) else offered
        found = None
        for caller, key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = caller
        return found
