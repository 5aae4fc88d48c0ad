"""`python -m service`: runs the InvoiceService gRPC server with settings from the environment."""

from __future__ import annotations

import asyncio

from service import logs
from service.app import serve
from service.config import Settings


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
