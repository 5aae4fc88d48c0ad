"""Something else changing an object at Stripe between a client's read and its call, on
demand (POST /_config/races, see config): before the next request matching a race runs,
the emulator first makes the race's own request through its own API, as a dashboard user
or another client would have (an invoice paid or voided out of band), then runs the
matching one. One-shot; what each race's request answered is listed by GET /_config/races."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from tools.localstripe.faults import requests_matching

THEN_FIELDS = {"method", "path", "params"}


@dataclass
class Race:
    path: re.Pattern[str]
    method: str | None  # None: any
    then: dict[str, Any]  # {"method": "POST", "path": "/v1/...", "params": {name: value}}

    def matches(self, request: web.Request) -> bool:
        return self.method in (None, request.method) and self.path.search(request.path) is not None

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path.pattern, "method": self.method, "then": self.then}


def _then(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or set(spec) - THEN_FIELDS:
        raise ValueError(f"then must be an object of {', '.join(sorted(THEN_FIELDS))}")
    method, path, params = spec.get("method", "POST"), spec.get("path"), spec.get("params", {})
    if method not in ("GET", "POST", "DELETE"):
        raise ValueError("then.method must be GET, POST or DELETE")
    # Only the emulator's own API: the race's request goes to the emulator itself.
    if not isinstance(path, str) or not path.startswith("/v1/"):
        raise ValueError("then.path must be a path of the emulator's API (/v1/...)")
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise ValueError("then.params must be an object of strings (form fields)")
    return {"method": method, "path": path, "params": params}


@dataclass
class Races:
    """The races set and not yet run, and what the ones that ran answered."""

    pending: list[Race] = field(default_factory=list)
    ran: list[dict[str, Any]] = field(default_factory=list)

    def add(self, spec: Any) -> Race:
        """A race from POST /_config/races' JSON body, or a ValueError saying what is wrong."""
        pattern, method = requests_matching(spec, {"then"})
        race = Race(pattern, method, _then(spec.get("then")))
        self.pending.append(race)
        return race

    def clear(self) -> int:
        count = len(self.pending)
        self.pending.clear()
        self.ran.clear()
        return count

    def take(self, request: web.Request) -> Race | None:
        for race in self.pending:
            if race.matches(request):
                self.pending.remove(race)
                return race
        return None

    async def run(self, race: Race, request: web.Request) -> None:
        """The race's own request, to this emulator (the origin the matching request came
        to), with the matching request's credentials."""
        then = race.then
        headers = {"Authorization": request.headers.get("Authorization", "")}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.request(
                then["method"], request.url.origin().with_path(then["path"]), data=then["params"], headers=headers
            ) as reply,
        ):
            self.ran.append({**race.as_json(), "status": reply.status, "answer": await reply.json()})

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        race = None if request.path.startswith("/_config/") else self.take(request)
        if race is not None:
            await self.run(race, request)
        return await handler(request)
