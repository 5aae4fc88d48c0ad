"""What the emulator was asked and what it answered, for the referee (tests/referee):
with LOCALSTRIPE_RECORD_DIR set, every /v1 request (method, path, query, form body), its
answer (status, JSON body) and every event scheduled for the webhooks is appended as one
JSON line to `exchanges-<pid>.jsonl` in that folder. Unset (`make run`, chaos), nothing is
recorded. The tests set it once per session, so every emulator they start is recorded."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tools.localstripe.stock import resources

RECORD_DIR = "LOCALSTRIPE_RECORD_DIR"


class Recorder:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a line is whole on disk when the call returns, whenever the
        # emulator is stopped (tests end it with SIGTERM).
        self._out: IO[str] = (folder / f"exchanges-{os.getpid()}.jsonl").open("a", encoding="utf-8", buffering=1)

    @classmethod
    def from_env(cls) -> Recorder | None:
        folder = os.environ.get(RECORD_DIR)
        return cls(Path(folder)) if folder else None

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        body = (await request.read()).decode("utf-8", "replace")
        response = await handler(request)
        answer = response.body if isinstance(response, web.Response) else None
        try:
            parsed = json.loads(answer) if isinstance(answer, bytes) else None
        except ValueError:
            parsed = None
        self.write(
            {
                "kind": "exchange",
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "content_type": request.content_type,
                "body": body,
                "status": response.status,
                "response": parsed,
            }
        )
        return response

    def record_events(self) -> None:
        """Wraps localstripe's schedule_webhook (looked up in its module at each call, by
        its own code and by stock.emit): each event as the webhooks will send it."""
        schedule: Callable[[Any], None] = resources.schedule_webhook

        def recording(event: Any) -> None:
            self.write({"kind": "event", "event": event._export()})
            schedule(event)

        resources.schedule_webhook = recording
