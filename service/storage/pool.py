"""The pool and what every store on it shares: asyncpg's connection errors taken as the
domain's Unavailable, the acquire wait observed, and the pool's creation (its release
hook and statement cache chosen for the pooler in front of Postgres)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import asyncpg

from service.domain import Unavailable

log = logging.getLogger(__name__)

# What a lost or refused connection looks like through asyncpg: the caller gets
# UNAVAILABLE and may retry; anything else is a bug and surfaces as INTERNAL.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
    # Seen when the server terminates an idle pooled connection (a restart, an admin's
    # pg_terminate_backend): the next statement finds the protocol mid-teardown.
    asyncpg.InternalClientError,
)

# During an outage every call (and the watch reader's every poll) fails: one WARNING when
# it starts, then one this often with how many failed meanwhile, and one INFO at its end.
OUTAGE_LOG_EVERY_S = 10.0
_clock = time.monotonic  # a test's to move

# Statements are whole literals, except the list, whose WHERE is assembled from the
# constant fragments below (values are always $n parameters).


class _Outage:
    """The log of one stretch of failures to reach the database."""

    def __init__(self, exc: BaseException, now: float) -> None:
        self.started = self.logged = now
        self.failures, self.unlogged = 1, 0
        log.warning("database unavailable: %s", type(exc).__name__)

    def failed(self, exc: BaseException, now: float) -> None:
        self.failures += 1
        self.unlogged += 1
        if now - self.logged >= OUTAGE_LOG_EVERY_S:
            log.warning(
                "database still unavailable: %s",
                type(exc).__name__,
                extra={
                    "failures": self.failures,
                    "since_last_line": self.unlogged,
                    "for_s": round(now - self.started, 1),
                },
            )
            self.logged, self.unlogged = now, 0

    def ended(self, now: float) -> None:
        log.info("database reachable again", extra={"failures": self.failures, "for_s": round(now - self.started, 1)})


class Pooled:
    """A store over the pool: one connection per unit of work."""

    def __init__(self, pool: asyncpg.Pool, *, observe_wait: Callable[[float], None] | None = None) -> None:
        self._pool = pool
        self._observe_wait = observe_wait
        self._outage: _Outage | None = None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        try:
            started = time.perf_counter()
            async with self._pool.acquire() as conn:
                if self._observe_wait is not None:
                    self._observe_wait(time.perf_counter() - started)
                if self._outage is not None:
                    self._outage.ended(_clock())
                    self._outage = None
                yield conn
        except CONNECTION_ERRORS as exc:
            if self._outage is None:
                self._outage = _Outage(exc, _clock())
            else:
                self._outage.failed(exc, _clock())
            raise Unavailable("the invoice store is unavailable; retry later") from exc
        except asyncpg.UndefinedTableError as exc:
            # The server started before its migrations ran; health still says NOT_SERVING.
            raise Unavailable("the invoice store's schema is not migrated yet; retry later") from exc

    async def open_connections(self, n: int) -> None:
        """Opens up to `n` pooled connections now, so the first calls do not pay for them
        (a warm-up: like any idle pooled connection they close after 300 s unused)."""
        async with AsyncExitStack() as held:
            for _ in range(min(n, self._pool.get_max_size())):
                await held.enter_async_context(self._connection())


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's release hook. The service sets no session state (no SET, LISTEN, cursors
    or session advisory locks; open transactions are still rolled back by asyncpg), so
    the default RESET ALL query, one more round trip on every release, buys nothing: the
    GetInvoice profile showed it at 7% of the server's time."""


async def connect(dsn: str, *, max_size: int, command_timeout: float, pooler: str = "none") -> asyncpg.Pool:
    """Creates the pool without connecting, so the server starts (NOT_SERVING) while
    Postgres is still away; `Storage.open_connections` opens DB_POOL_MIN_SIZE of them once it
    answers (asyncpg refuses a floor above the initial size). Behind PgBouncer in transaction mode
    (`pooler="pgbouncer"`) a connection's prepared statements may live on another
    server session, so asyncpg's statement cache is off."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        init_size=0,
        min_size=0,
        max_size=max_size,
        command_timeout=command_timeout,
        reset=_keep_session,
        statement_cache_size=0 if pooler == "pgbouncer" else 100,
    )
    return pool
