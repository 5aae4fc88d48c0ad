"""Stripe failing internally, on demand (set through POST /_config/faults, see config)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tools.localstripe.errors import api_error


def requests_matching(spec: Any, other_fields: set[str]) -> tuple[re.Pattern[str], str | None]:
    """The requests a hook's JSON body names: `path`, a regular expression, and `method`
    (None: any); a ValueError saying what is wrong, also for fields beyond `other_fields`."""
    if not isinstance(spec, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(spec) - {"path", "method"} - other_fields
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
    path, method = spec.get("path"), spec.get("method")
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a regular expression (a non-empty string)")
    try:
        pattern = re.compile(path)
    except re.error as exc:
        raise ValueError(f"path is not a regular expression: {exc}") from exc
    if method is not None and not isinstance(method, str):
        raise ValueError("method must be a string")
    return pattern, None if method is None else method.upper()


@dataclass
class Fault:
    path: re.Pattern[str]
    method: str | None  # None: any
    count: int
    when: str  # "before" or "after" running the call

    def matches(self, request: web.Request) -> bool:
        return self.method in (None, request.method) and self.path.search(request.path) is not None

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path.pattern, "method": self.method, "count": self.count, "when": self.when}


class Faults:
    """Stripe failing internally, on demand: the next `count` requests matching a fault
    answer Stripe's 500 api_error, either without running (`before`) or after running
    (`after`: the effect happened, only the answer is lost). It sits inside the
    idempotency middleware, so the 500 is saved under the request's key, as on Stripe."""

    WHENS = ("before", "after")

    def __init__(self) -> None:
        self.pending: list[Fault] = []

    def add(self, spec: Any) -> Fault:
        """A fault from POST /_config/faults' JSON body, or a ValueError saying what is wrong."""
        pattern, method = requests_matching(spec, {"count", "when"})
        count, when = spec.get("count", 1), spec.get("when")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("count must be a positive integer")
        when = "before" if when is None else when
        if when not in self.WHENS:
            raise ValueError('when must be "before" or "after"')
        fault = Fault(pattern, method, count, when)
        self.pending.append(fault)
        return fault

    def clear(self) -> int:
        count = len(self.pending)
        self.pending.clear()
        return count

    def take(self, request: web.Request) -> Fault | None:
        """The first fault matching `request`, used up once more."""
        for fault in self.pending:
            if fault.matches(request):
                fault.count -= 1
                if fault.count == 0:
                    self.pending.remove(fault)
                return fault
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        fault = None if request.path.startswith("/_config/") else self.take(request)
        if fault is None:
            return await handler(request)
        if fault.when == "after":
            await handler(request)
        return api_error(f"An unknown error occurred (a fault set with /_config/faults, {fault.when} running).")
