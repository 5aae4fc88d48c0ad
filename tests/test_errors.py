"""service/errors.py is the one table from domain errors to statuses: the gRPC edge and the
webhook sidecar answer from it, and Envoy's transcoder turns its gRPC codes into the same
HTTP statuses. Each domain error is raised behind the real Envoy and its REST answer
compared with the table, so the two cannot drift apart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from gateway.render import LOCAL_REPLY_CODES, render
from service.config import Settings
from service.domain import DomainError, Invoice, InvoicePage, Page
from service.errors import STATUSES, status_of
from service.grpc_server import start_grpc
from tests.helpers import API_KEY, until_envoy_routes
from tools.stack import start_envoy

# Every domain error, found by name from the invoice id of a GET (`in_<name>`).
ERRORS: dict[str, type[DomainError]] = {cls.__name__: cls for cls in STATUSES}


class RaisingStore:
    async def list_invoices(self, page: Page) -> InvoicePage:
        return InvoicePage(invoices=[], total=0)

    async def get_invoice(self, key: str) -> Invoice:
        name = key.removeprefix("in_")
        error = ERRORS[name]
        raise error("id", "raised on purpose") if name == "InvalidArgument" else error("raised on purpose")


async def test_every_domain_error_reaches_rest_with_the_tables_status(tmp_path: Path) -> None:
    running = await start_grpc(RaisingStore(), [API_KEY], "127.0.0.1:0")
    config = render(Settings(), gateway_port=0, admin_port=0, grpc_port=running.port)
    envoy, port, _ = await asyncio.to_thread(start_envoy, config, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Api-Key": API_KEY}) as http:
            await until_envoy_routes(http, "/admin/api/invoices")
            for name, cls in ERRORS.items():
                reply = await http.get(f"/admin/api/invoices/in_{name}")
                error = cls("id", "x") if name == "InvalidArgument" else cls("x")
                assert (reply.status_code, reply.json()["code"]) == tuple(reversed(status_of(error))), name
    finally:
        envoy.stop()
        await running.server.stop(None)


@pytest.mark.parametrize("cls", list(STATUSES))
def test_a_subclass_takes_its_parents_row(cls: type[DomainError]) -> None:
    sub = type(f"Special{cls.__name__}", (cls,), {})
    error = sub("id", "x") if cls.__name__ == "InvalidArgument" else sub("x")
    assert status_of(error) == STATUSES[cls]


def test_envoys_own_replies_use_the_tables_codes() -> None:
    """An Envoy 503 (no healthy upstream) carries the code a domain Unavailable would."""
    first: dict[int, int] = {}
    for code, http in STATUSES.values():
        first.setdefault(http, code)
    assert {http: LOCAL_REPLY_CODES[http] for http in first} == first
