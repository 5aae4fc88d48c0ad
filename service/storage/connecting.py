"""How a connection to Postgres is opened: host by host, each host with its own connect
timeout, and TCP keepalives and a user timeout on its socket. Used for the pool's
connections and for the change feed's LISTEN connection; what is done with a connection
once open is the pool's and the stores' business."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.parse
from typing import Any, cast

import asyncpg

from service.dblink import Link

log = logging.getLogger(__name__)

# What a lost, refused or unanswered connection looks like through asyncpg: the caller gets
# UNAVAILABLE and may retry; anything else is a bug and surfaces as INTERNAL.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # TimeoutError included
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
    # Seen when the server terminates an idle pooled connection (a restart, an admin's
    # pg_terminate_backend): the next statement finds the protocol mid-teardown. Also
    # TargetServerAttributeNotMatched: no host is the primary a multi-host DSN asks for.
    asyncpg.InternalClientError,
)


def hosts_of(dsn: str) -> list[tuple[str, int | None]]:
    """The hosts of a URL DSN's host list (`postgresql://u@h1:5432,h2:5433/db`), in order;
    empty when the DSN names none in its netloc (a `?host=` socket, a keyword DSN), which
    is then connected to as it is."""
    try:
        netloc = urllib.parse.urlsplit(dsn).netloc
    except ValueError:
        return []
    spec = netloc.partition("@")[2] if "@" in netloc else netloc
    hosts: list[tuple[str, int | None]] = []
    for entry in filter(None, spec.split(",")):
        if entry.startswith("["):  # [v6]:port
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = entry.partition(":")
        hosts.append((urllib.parse.unquote(host), int(port) if port.isdigit() else None))
    return hosts


class Connector:
    """Opens a connection to the first host that answers within its own timeout, starting
    with the host that answered last. asyncpg's own `timeout` is one budget spent over all
    hosts in order: a primary that froze (it accepts TCP but never answers) would take all
    of it, and the promoted standby behind it would never be tried. Usable as asyncpg's
    pool `connect` callback (it is called with the pool's DSN and connect arguments)."""

    def __init__(self, link: Link | None = None) -> None:
        self.link = link or Link()
        self._first = 0

    async def __call__(self, dsn: str, **kwargs: Any) -> asyncpg.Connection:
        hosts = hosts_of(dsn)
        if len(hosts) <= 1:
            return self._tuned(await asyncpg.connect(dsn, timeout=self.link.connect_timeout_s, **kwargs))
        start = self._first % len(hosts)
        last: BaseException | None = None
        for i in [*range(start, len(hosts)), *range(start)]:
            host, port = hosts[i]
            try:
                conn = await asyncpg.connect(dsn, host=host, port=port, timeout=self.link.connect_timeout_s, **kwargs)
            except CONNECTION_ERRORS as exc:
                log.info("host %d of %d did not take a connection: %s", i + 1, len(hosts), type(exc).__name__)
                last = exc
                continue
            self._first = i
            return self._tuned(conn)
        assert last is not None
        raise last

    def _tuned(self, conn: asyncpg.Connection) -> asyncpg.Connection:
        """Keepalives, so that an idle connection to a host that went away (a cut network,
        a dead machine: nothing answers, nothing resets) is dropped before a call takes it,
        and a user timeout, so that one whose sent data stays unacknowledged fails rather
        than waits for the kernel's retransmissions (about 15 minutes). Neither shows a
        frozen Postgres on a live host (its kernel still acknowledges): the pool's
        per-call deadline handles that (service/storage/pool.py). asyncpg sets neither and
        has no parameter for them (0.32), so they are set on the open socket."""
        transport: asyncio.Transport = cast("Any", conn)._transport  # asyncpg exposes no socket hook
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return conn
        link = self.link
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, link.keepalive_idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, link.keepalive_interval_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, link.keepalive_count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(link.tcp_user_timeout_s * 1000))
        return conn
