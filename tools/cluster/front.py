"""The `envoy` Service as a load balancer exposes it (deploy/base/envoy-service.yaml: "an
overlay exposes it, an Ingress, a Gateway route or type LoadBalancer"): an HTTP proxy on
127.0.0.1 only that sends each request to the next READY Envoy pod, round robin. It is why
Envoy's preStop sleeps: once a pod is terminating the balancer sends it no new request,
and those in flight finish before SIGTERM stops Envoy (which closes its connections at
once). A podman port mapping could not do this: it names one container, and a rollout
replaces every one. Streams (a watch) are relayed as they come."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable

import aiohttp
from aiohttp import web

# Per hop, not forwarded (RFC 9110 7.6.1); aiohttp sets its own framing.
HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "host",
    "content-length",
}


class Front:
    def __init__(self, endpoints: Callable[[], list[str]], port: int = 8080) -> None:
        self._endpoints, self._port = endpoints, port
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> int:
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=30)
        return self.port

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._close(self._runner), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _close(self, runner: web.AppRunner) -> None:
        await runner.cleanup()
        await self._session.close()

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=2**21)
        app.router.add_route("*", "/{path:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        ready = self._endpoints()
        # A connection refused (a pod gone between the endpoints' update and this request)
        # is tried on the next one: nothing reached Envoy, so nothing can be doubled.
        for attempt in range(max(1, len(ready))):
            if not ready:
                break
            address = ready[(next(self._turn) + attempt) % len(ready)]
            url = f"http://{address}:{self._port}{request.rel_url}"
            try:
                upstream = await self._session.request(
                    request.method, url, headers=headers, data=body, allow_redirects=False
                )
            except aiohttp.ClientConnectorError:
                continue
            async with upstream:
                reply = web.StreamResponse(status=upstream.status)
                reply.headers.update({k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
                await reply.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await reply.write(chunk)
                    await reply.write_eof()
                except ConnectionResetError:  # the caller left (a watch it stopped reading)
                    pass
                return reply
        return web.json_response({"code": 14, "message": "no ready envoy pod", "details": []}, status=503)
