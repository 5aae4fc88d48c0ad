"""The pool and what every store on it shares: each use of a connection bounded by one
deadline, asyncpg's connection errors taken as the domain's StoreUnavailable, the acquire
wait observed, and the pool's creation (its release hook and statement cache chosen for
the pooler in front of Postgres, its connections opened by service/storage/connecting)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import asyncpg

from service.dblink import DEFAULT_BUDGET_S
from service.domain import StoreUnavailable
from service.storage.connecting import CONNECTION_ERRORS, Connector

log = logging.getLogger(__name__)

# Once a unit of work ran out its budget, calls fail at once while one probe asks Postgres
# this often whether it answers again: each caller would otherwise wait a budget of its
# own, and Envoy retries a read twice on UNAVAILABLE (three budgets, past its 15 s route
# timeout: the 504 measured on a SIGSTOPped Postgres). Serving resumes within this of
# Postgres answering.
PROBE_EVERY_S = 0.5

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
    """A store over the pool: one connection per unit of work, each unit bounded by one
    deadline, `budget_s` after it asks for its connection (DB_COMMAND_TIMEOUT_S)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        observe_wait: Callable[[float], None] | None = None,
        budget_s: float = DEFAULT_BUDGET_S,
    ) -> None:
        self._pool = pool
        self._observe_wait = observe_wait
        self._budget_s = budget_s
        self._outage: _Outage | None = None
        self._probing: asyncio.Task[None] | None = None  # while Postgres is silent

    @asynccontextmanager
    async def _connection(self, *, probe: bool = False) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A connection for one unit of work: the wait for it, its statements (a
        transaction's BEGIN, COMMIT and ROLLBACK included) and its return to the pool all
        end by one deadline, and the caller hears StoreUnavailable then at the latest.

        asyncpg alone bounds each statement, not the unit: a statement that times out
        sends a cancel request and the ROLLBACK or the release after it waits up to
        another command timeout for a server that may never answer (measured on a
        SIGSTOPped Postgres: 10 s for a webhook, and 15 s, Envoy's 504, for a list whose
        calls queued for connections behind the hung ones). At the deadline the connection
        is terminated instead (its socket closed, no round trip): whatever awaits it fails
        at once and the pool opens a new one for the next unit. While Postgres is silent
        (a unit ran out its budget, and no probe has been answered since), a unit fails
        at once."""
        if self._probing is not None and not probe:
            raise self._failed(TimeoutError("Postgres has not answered since a unit ran out its budget"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._budget_s
        try:
            conn = await self._pool.acquire(timeout=self._budget_s)
        except CONNECTION_ERRORS as exc:
            raise self._failed(exc, silent=loop.time() >= deadline) from exc
        if self._observe_wait is not None:
            self._observe_wait(loop.time() - started)
        watchdog = loop.call_at(deadline, _drop, conn)
        try:
            yield conn
        except CONNECTION_ERRORS as exc:
            _drop(conn)  # its state is unknown: a reset would wait on it
            raise self._failed(exc, silent=loop.time() >= deadline) from exc
        except asyncpg.UndefinedTableError as exc:
            # The server started before its migrations ran; health still says NOT_SERVING.
            raise StoreUnavailable("the invoice store's schema is not migrated yet; retry later") from exc
        finally:
            watchdog.cancel()
            await self._release(conn, deadline - loop.time())
        if self._outage is not None:
            self._outage.ended(_clock())
            self._outage = None

    async def _release(self, conn: asyncpg.pool.PoolConnectionProxy, left_s: float) -> None:
        """Returns the connection within what is left of the unit's budget (a client's
        cancellation may have left a statement to cancel). The unit's work is done
        either way: a release that fails has terminated the connection, which is all."""
        try:
            await self._pool.release(conn, timeout=max(left_s, 0.001))
        except CONNECTION_ERRORS as exc:
            log.info("a connection was dropped on its return to the pool: %s", type(exc).__name__)

    def _failed(self, exc: BaseException, *, silent: bool = False) -> StoreUnavailable:
        if silent and self._probing is None and not self._pool.is_closing():
            self._probing = asyncio.get_running_loop().create_task(self._probe())
        if self._outage is None:
            self._outage = _Outage(exc, _clock())
        else:
            self._outage.failed(exc, _clock())
        return StoreUnavailable("the invoice store is unavailable; retry later")

    async def _probe(self) -> None:
        """Asks Postgres every PROBE_EVERY_S, within the budget, until it answers."""
        try:
            while not self._pool.is_closing():
                await asyncio.sleep(PROBE_EVERY_S)
                with contextlib.suppress(StoreUnavailable):
                    async with self._connection(probe=True) as conn:
                        await conn.execute("SELECT 1")
                    return
        finally:
            self._probing = None

    async def open_connections(self, n: int) -> None:
        """Opens up to `n` pooled connections now, so the first calls do not pay for them
        (a warm-up: like any idle pooled connection they close after 300 s unused)."""
        async with AsyncExitStack() as held:
            for _ in range(min(n, self._pool.get_max_size())):
                await held.enter_async_context(self._connection())


def _drop(conn: asyncpg.pool.PoolConnectionProxy) -> None:
    """Terminates a connection still held (a released proxy has none): its holder goes
    back to the pool empty, to connect anew when next taken."""
    with contextlib.suppress(asyncpg.InterfaceError):  # released meanwhile: asyncpg dropped it
        conn.terminate()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's release hook. The service sets no session state (no SET, LISTEN, cursors
    or session advisory locks; open transactions are still rolled back by asyncpg), so
    the default RESET ALL query, one more round trip on every release, buys nothing: the
    GetInvoice profile showed it at 7% of the server's time."""


async def connect(
    dsn: str, *, max_size: int, command_timeout: float, pooler: str = "none", connector: Connector | None = None
) -> asyncpg.Pool:
    """Creates the pool without connecting, so the server starts (NOT_SERVING) while
    Postgres is still away; `Storage.open_connections` opens DB_POOL_MIN_SIZE of them once it
    answers (asyncpg refuses a floor above the initial size). Behind PgBouncer in transaction mode
    (`pooler="pgbouncer"`) a connection's prepared statements may live on another
    server session, so asyncpg's statement cache is off. Connections are opened by
    `connector` (host by host, with keepalives: service/storage/connecting.py)."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        # The stub's Protocol spells out asyncpg.connect's keywords; a Connector takes them all.
        connect=cast("Any", connector or Connector()),
        init_size=0,
        min_size=0,
        max_size=max_size,
        command_timeout=command_timeout,
        reset=_keep_session,
        statement_cache_size=0 if pooler == "pgbouncer" else 100,
    )
    return pool
