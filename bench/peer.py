"""The peer `make bench` measures the REST gateway against: what a Python team would build
instead of gRPC + Envoy, a FastAPI service on uvicorn (its standard extras: uvloop,
httptools) and asyncpg, answering the same `GET /admin/api/invoices/{id}` from the same
database with the store's own statement, the same JSON keys and values, and the same
Api-Key check, in one worker process as the service runs one server process. Its
configuration is uvicorn's default (an access log line per request, as the service logs
one per RPC). Benchmark only: nothing of the service imports it.

`python -m bench.peer --dsn DSN --port PORT --api-keys K1,K2`
"""

from __future__ import annotations

import argparse
import copy
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

from service import announce, storage, validation
from service.domain import InvalidArgument, Invoice, NotFound
from service.storage import Storage


def _time(moment: datetime) -> str:
    """As protobuf's JSON prints a Timestamp of whole milliseconds."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def record_json(invoice: Invoice, default_currency: str) -> dict[str, Any]:
    """The record as the gateway prints it (tests/test_bench.py holds the two equal)."""
    int32 = invoice.amount if -(2**31) <= invoice.amount < 2**31 else 0
    return {
        "_id": invoice.id,
        "invoiceId": invoice.stripe_invoice_id,
        "user": {"_id": invoice.user.id, "name": invoice.user.name},
        "status": invoice.status,
        "amountInt32": int32,
        "invoicePdf": invoice.invoice_pdf,
        "createdAt": _time(invoice.created_at),
        "updatedAt": _time(invoice.updated_at),
        "amount": invoice.amount,
        "currency": invoice.currency or default_currency,
        "amountCredited": invoice.amount_credited,
        "amountRefunded": invoice.amount_refunded,
    }


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "details": []}, status_code=status)


def create_app(dsn: str, api_keys: list[str], port: int, default_currency: str = "eur") -> FastAPI:
    keys = [k.encode() for k in api_keys]
    stores: list[Storage] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await storage.connect(dsn, max_size=10, command_timeout=5)
        stores.append(Storage(pool))
        announce.listening("peer", http=port)
        yield
        await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/admin/api/invoices/{invoice_id}", response_model=None)
    async def get_invoice(
        invoice_id: str, api_key: Annotated[str | None, Header(alias="Api-Key")] = None
    ) -> dict[str, Any] | JSONResponse:
        offered = (api_key or "").encode()
        if not api_key or sum(hmac.compare_digest(offered, key) for key in keys) == 0:
            return _error(401, 16, "missing or invalid api-key metadata (REST: Api-Key header)")
        try:
            invoice = await stores[0].get_invoice(validation.invoice_id(invoice_id))
        except InvalidArgument as error:
            return _error(400, 3, str(error))
        except NotFound as error:
            return _error(404, 5, str(error))
        return record_json(invoice, default_currency)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-keys", required=True)
    args = parser.parse_args()
    app = create_app(args.dsn, args.api_keys.split(","), args.port)
    # uvicorn's own logging, access log included, but on stderr as the service logs: stdout
    # is the launcher's, which relays it line by line (a cost the service does not pay).
    logging_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_config=logging_config)


if __name__ == "__main__":
    main()
