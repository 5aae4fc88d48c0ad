"""The test hooks under /_config/ (no API key, like localstripe's own /_config/webhooks):

- POST /_config/idempotency/forget: Stripe's 24 h expiry of idempotency keys, now;
- POST and DELETE /_config/faults: the next matching requests answer a 500, before or
  after running, saved under their idempotency key (faults.Faults);
- GET and DELETE /_config/calls: how many /v1 calls, by method and route (Calls);
- POST, GET and DELETE /_config/races: before the next matching request runs, another
  request changes the object first, as the dashboard would (races.Races);
- GET /_config/deliveries: webhook deliveries scheduled and not yet done (webhooks).

Their state is one Hooks object, kept on the app under the HOOKS key.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from tools.localstripe import webhooks
from tools.localstripe.errors import error_response
from tools.localstripe.faults import Faults
from tools.localstripe.idempotency import Idempotency
from tools.localstripe.races import Races

# Ids in paths no route matched (a matched route names its own pattern, /v1/invoices/{id}).
OBJECT_ID = re.compile(
    r"(?<=/)(?:in|cus|pm|ii|il|pi|ch|card|src|sub|si|txr|evt|prod|price|plan|seti|cn|re|cbtxn)_[A-Za-z0-9]+"
)


class Calls:
    """How many /v1 requests the emulator received, by method and route pattern
    ("POST /v1/invoices/{id}/add_lines"), replays and errors included: the service's tests
    count their Stripe calls with it."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @staticmethod
    def route_of(request: web.Request) -> str:
        resource = request.match_info.route.resource
        if resource is not None:
            return f"{request.method} {resource.canonical}"
        return f"{request.method} {OBJECT_ID.sub('{id}', request.path)}"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            self.counts[self.route_of(request)] += 1
        return await handler(request)


@dataclass
class Hooks:
    """What the middlewares keep and the /_config/ hooks read or reset."""

    idempotency: Idempotency = field(default_factory=Idempotency)
    faults: Faults = field(default_factory=Faults)
    calls: Calls = field(default_factory=Calls)
    races: Races = field(default_factory=Races)


HOOKS = web.AppKey("invoice_service_hooks", Hooks)


async def forget_idempotency_keys(request: web.Request) -> web.Response:
    """POST /_config/idempotency/forget: as if every key were 24 hours old."""
    return web.json_response({"forgotten": request.app[HOOKS].idempotency.forget()})


async def _added(request: web.Request, hook: Faults | Races, kind: str) -> web.Response:
    """Adds what the JSON body describes to the hook, answering those pending, or a 400."""
    try:
        hook.add(await request.json())
    except ValueError as exc:  # json.JSONDecodeError is one
        return error_response(400, {"type": "invalid_request_error", "message": f"Invalid {kind}: {exc}"})
    return web.json_response({f"{kind}s": [pending.as_json() for pending in hook.pending]})


async def add_fault(request: web.Request) -> web.Response:
    """POST /_config/faults {"path": regex, "method": "POST", "count": 1, "when": "before"|"after"}."""
    return await _added(request, request.app[HOOKS].faults, "fault")


async def clear_faults(request: web.Request) -> web.Response:
    """DELETE /_config/faults."""
    return web.json_response({"cleared": request.app[HOOKS].faults.clear()})


async def get_calls(request: web.Request) -> web.Response:
    """GET /_config/calls."""
    return web.json_response({"calls": dict(sorted(request.app[HOOKS].calls.counts.items()))})


async def reset_calls(request: web.Request) -> web.Response:
    """DELETE /_config/calls."""
    request.app[HOOKS].calls.counts.clear()
    return web.json_response({"calls": {}})


async def add_race(request: web.Request) -> web.Response:
    """POST /_config/races {"path": regex, "method": "POST", "then": {"method", "path", "params"}}."""
    return await _added(request, request.app[HOOKS].races, "race")


async def get_races(request: web.Request) -> web.Response:
    """GET /_config/races: those still pending, and what the others' requests answered."""
    races = request.app[HOOKS].races
    return web.json_response({"races": [race.as_json() for race in races.pending], "ran": races.ran})


async def clear_races(request: web.Request) -> web.Response:
    """DELETE /_config/races."""
    return web.json_response({"cleared": request.app[HOOKS].races.clear()})


async def get_deliveries(request: web.Request) -> web.Response:
    """GET /_config/deliveries: webhook deliveries scheduled and not yet done, events sent
    after one made later (overtaken), and events sent twice."""
    return web.json_response(webhooks.DELIVERIES.counts())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_config/deliveries", get_deliveries)
    app.router.add_post("/_config/idempotency/forget", forget_idempotency_keys)
    app.router.add_post("/_config/faults", add_fault)
    app.router.add_delete("/_config/faults", clear_faults)
    app.router.add_get("/_config/calls", get_calls)
    app.router.add_delete("/_config/calls", reset_calls)
    app.router.add_post("/_config/races", add_race)
    app.router.add_get("/_config/races", get_races)
    app.router.add_delete("/_config/races", clear_races)
