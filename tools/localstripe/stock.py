"""localstripe's own modules, imported only once the version guard has passed.

localstripe ships no type information; modules from importlib are plain `ModuleType`s
whose attributes mypy treats as Any, so its classes need no per-line ignores.
localstripe.server is imported only in app.build_app(): it registers the routes in
resources.extra_apis when imported, so the route patches must come first.

localstripe's design forces module-level state on us: its objects live in the global
`resources.store`, its extra routes in the global list `resources.extra_apis` (read once,
when localstripe.server is imported), and its classes are patched in place. Everything
this package adds on top of that is held by objects passed around instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from tools.localstripe import version

version.check()

resources: Any = importlib.import_module("localstripe.resources")
UserError: Any = importlib.import_module("localstripe.errors").UserError


def set_route(method: str, path: str, func: Callable[..., Any]) -> None:
    """Replaces or adds an entry of localstripe's extra routes (global: read when server imports)."""
    routes = resources.extra_apis
    for index, (m, p, _) in enumerate(routes):
        if (m, p) == (method, path):
            routes[index] = (method, path, func)
            return
    routes.append((method, path, func))


def emit(event_type: str, obj: Any, previous: dict[str, Any] | None = None) -> None:
    """Schedules a signed webhook with localstripe's own machinery (a snapshot taken now);
    `previous` is a *.updated event's data.previous_attributes (the changed fields' old values)."""
    event = resources.Event(event_type, obj)
    if previous:
        event.data["previous_attributes"] = previous
    resources.schedule_webhook(event)
