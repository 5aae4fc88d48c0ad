"""WatchInvoices' engine. One reader per process follows the change feed in position
order (woken early by LISTEN where the connection allows it, polling always, which alone
is enough behind PgBouncer) and hands each change to every open watch, each with a
bounded buffer. A resumed watch first replays from the store what came after its token,
then joins the live hand-out at exactly the reader's position: no gap, no duplicate.
Each read goes to the follower (the record cache) before any watch hears of it, so a
watcher that Gets what it was told of never reads an older record. The reader also
prunes what is older than the retention. Knows no gRPC: the servicer turns what a watch
yields into messages, the edge turns its errors into statuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from service.domain import DomainError, OutOfRange, ResourceExhausted, Unavailable
from service.feed import Change, ChangeKind, FeedPosition, FeedRead, WatchFilter

log = logging.getLogger(__name__)

# Changes per read of the feed (at most half a watch's buffer), per replay query of a
# resumed watch, per prune statement.
READ_BATCH = 500
REPLAY_BATCH = 500
PRUNE_BATCH = 1000
# How long a new watch waits for the reader's first position (the database reached).
READY_WAIT_S = 5.0
# Between two attempts to reach Postgres (the reader, the LISTEN connection).
RETRY_S = 1.0
# How long the reader waits for a watch to make room for the next read before ending it as
# too slow: a burst of changes larger than a buffer must not end watchers that keep up.
SLOW_GRACE_S = 1.0
# The longest pause between two attempts to LISTEN while Postgres stays away.
LISTEN_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class WatchLimits:
    """The settings WATCH_* (service/config.py), in one place for the engine."""

    max_streams: int = 2000
    buffer: int = 1000
    bookmark_s: float = 30.0
    poll_s: float = 0.5
    max_stream_s: float = 1800.0
    retention_s: float = 7 * 24 * 3600.0
    prune_every_s: float = 60.0


class FeedStore(Protocol):
    async def feed_head(self) -> FeedPosition: ...
    async def read_changes(self, after: FeedPosition, limit: int) -> FeedRead: ...
    async def check_resumable(self, after: FeedPosition) -> None: ...
    async def replay_changes(
        self, after: FeedPosition, upto: FeedPosition, match: WatchFilter, limit: int
    ) -> list[Change]: ...
    async def prune_changes(self, older_than: datetime, limit: int) -> int: ...


# Holds a LISTEN until its connection is lost, calling the callback once it listens and
# on each notification.
Listen = Callable[[Callable[[], None]], Awaitable[None]]


class Follower(Protocol):
    """What else follows the reader (the record cache, service/cache.py): each read,
    before its changes are handed to any watch; whether LISTEN is up; a feed gone back."""

    def applied(self, read: FeedRead, began: float) -> None: ...
    def listening(self, on: bool) -> None: ...
    def clear(self) -> None: ...


TOO_SLOW = (
    "this watch fell {} changes behind and was ended; resume with the last resume_token (read faster, or narrow it)"
)
FEED_WENT_BACK = (
    "the change feed went back (the database failed over to one behind it); list, then watch again from now"
)
SHUTTING_DOWN = "the server is shutting down; resume with the last resume_token (another replica serves it)"


class _Watch:
    """One open watch in the live hand-out: its filter, its buffer, and why it ended."""

    __slots__ = ("capacity", "ended", "match", "pending", "skip_through", "wake")

    def __init__(self, match: WatchFilter, skip_through: FeedPosition, capacity: int) -> None:
        self.match = match
        # A token from a replica whose reader is ahead of this one's: what it already had.
        self.skip_through = skip_through
        self.capacity = capacity
        self.pending: deque[Change] = deque()
        self.ended: DomainError | None = None
        self.wake = asyncio.Event()

    def offer(self, change: Change) -> bool:
        """Buffers the change if it is one for this watch; False if the buffer is full."""
        if change.position <= self.skip_through or change.invoice is None or not self.match.matches(change.invoice):
            return True
        if len(self.pending) >= self.capacity:
            return False
        self.pending.append(change)
        self.wake.set()
        return True

    def end(self, error: DomainError) -> None:
        self.ended = error
        self.wake.set()

    async def next(self, timeout_s: float) -> Change | None:
        """The next buffered change, or None after `timeout_s` without one; raises the
        reason the watch was ended, even with changes still buffered (the caller resumes
        from the last one it received)."""
        while True:
            if self.ended is not None:
                raise self.ended
            if self.pending:
                return self.pending.popleft()
            self.wake.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self.wake.wait()
            except TimeoutError:
                # The reader may have buffered a change in the same turn as the timeout:
                # a bookmark now would name a position past it.
                if self.pending or self.ended is not None:
                    continue
                return None


class _ListenSession:
    """One LISTEN connection's life: a call of its callback means it is up (the first
    comes once it listens); after it is lost, late callbacks only wake the reader."""

    def __init__(self, wake: asyncio.Event, follower: Follower | None) -> None:
        self._wake = wake
        self._follower = follower
        self._up = True

    def woken(self) -> None:
        if self._up and self._follower is not None:
            self._follower.listening(True)
        self._wake.set()

    def lost(self) -> None:
        self._up = False
        if self._follower is not None:
            self._follower.listening(False)


class Watches:
    """The process's watches and the one reader that feeds them."""

    def __init__(
        self,
        store: FeedStore,
        limits: WatchLimits = WatchLimits(),
        *,
        listen: Listen | None = None,
        observe_delay: Callable[[float], None] | None = None,
        follower: Follower | None = None,
    ) -> None:
        self._store = store
        self._follower = follower
        self._limits = limits
        self._listen = listen
        self._observe_delay = observe_delay
        self._live: set[_Watch] = set()
        # Every watch from its start to its generator's end, so a caller that stops
        # reading (its watch ended as too slow, its handler blocked in a write) still
        # counts against MAX_STREAMS.
        self._open = 0
        self._position: FeedPosition | None = None
        # Moves when the reader starts over (the feed went back): positions from before mean nothing.
        self._epoch = 0
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def open_streams(self) -> int:
        return self._open

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._read(), name="watch-reader"))
        self._tasks.append(asyncio.create_task(self._prune(), name="watch-pruner"))
        if self._listen is not None:
            self._tasks.append(asyncio.create_task(self._keep_listening(self._listen), name="watch-listener"))

    async def close(self) -> None:
        """Ends every watch with UNAVAILABLE (they resume elsewhere) and stops the reader."""
        self._closed = True
        for watch in self._live:
            watch.end(Unavailable(SHUTTING_DOWN))
        self._live.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # a task that died is logged, and the shutdown goes on
                log.exception("watch task %s failed", task.get_name())
        self._tasks.clear()

    async def watch(self, after: FeedPosition | None, match: WatchFilter) -> AsyncGenerator[Change, None]:
        """A bookmark of where the watch starts, then the changes after `after` (None: from
        now) that `match`, then live ones as they come, with a bookmark whenever
        BOOKMARK_S pass without a change. Ends after MAX_STREAM_S (the caller resumes);
        raises ResourceExhausted beyond MAX_STREAMS or for a watch too slow for its
        buffer, OutOfRange for a token past the retention, Unavailable at shutdown."""
        if self._closed:
            raise Unavailable(SHUTTING_DOWN)
        if self.open_streams >= self._limits.max_streams:
            raise ResourceExhausted(
                f"this server has {self._limits.max_streams} watches open, its limit; retry later or on another replica"
            )
        self._open += 1
        epoch = self._epoch
        try:
            position = await self._current()
            if after is not None:
                await self._store.check_resumable(after)
            after = position if after is None else after
            # First, where the watch starts: the caller holds a token before any change.
            yield Change(after, ChangeKind.BOOKMARK, None)
            # Then what the reader handed out meanwhile (or before, for a token), from the
            # store, until caught up with the reader. The last look at its position and the
            # joining have no await between them: it hands out nothing in between.
            while True:
                if self._closed:
                    raise Unavailable(SHUTTING_DOWN)
                if self._epoch != epoch:
                    raise OutOfRange(FEED_WENT_BACK)
                position = self._reader_position()
                if after >= position:
                    break
                changes = await self._store.replay_changes(after, position, match, REPLAY_BATCH)
                for change in changes:
                    if self._closed:
                        raise Unavailable(SHUTTING_DOWN)
                    yield change
                after = changes[-1].position if len(changes) == REPLAY_BATCH else position
            watch = _Watch(match, after, self._limits.buffer)
            self._live.add(watch)
            try:
                async for change in self._follow(watch):
                    yield change
            finally:
                self._live.discard(watch)
        finally:
            self._open -= 1

    async def _follow(self, watch: _Watch) -> AsyncIterator[Change]:
        deadline = time.monotonic() + self._limits.max_stream_s
        while (left := deadline - time.monotonic()) > 0:
            change = await watch.next(min(self._limits.bookmark_s, left))
            if change is not None:
                if self._observe_delay is not None and change.changed_at is not None:
                    self._observe_delay((datetime.now(UTC) - change.changed_at).total_seconds())
                yield change
            elif self._position is not None:
                # Nothing buffered: every change up to the reader's position was handed over.
                yield Change(max(self._position, watch.skip_through), ChangeKind.BOOKMARK, None)

    async def _current(self) -> FeedPosition:
        try:
            async with asyncio.timeout(READY_WAIT_S):
                await self._ready.wait()
        except TimeoutError:
            raise Unavailable("the change feed cannot be read now; retry later") from None
        return self._reader_position()

    def _reader_position(self) -> FeedPosition:
        if self._position is None:
            raise Unavailable("the change feed cannot be read now; retry later")
        return self._position

    def _hand_out(self, changes: list[Change]) -> None:
        for change in changes:
            for watch in tuple(self._live):
                if not watch.offer(change):
                    self._too_slow(watch)

    def _too_slow(self, watch: _Watch) -> None:
        # A caller that reads again gets what its stream had buffered, then RESOURCE_EXHAUSTED.
        # One that never reads again keeps its stream (and its place under MAX_STREAMS) until
        # it goes away: cancelling the handler would leave it without any status at all.
        watch.end(ResourceExhausted(TOO_SLOW.format(watch.capacity)))
        self._live.discard(watch)

    async def _room(self, batch: int) -> None:
        """Until every watch has room for `batch` more changes: a watch that keeps up
        drains its buffer meanwhile; one that has not made room within SLOW_GRACE_S is
        ended (it resumes from its token), so it holds the others back no longer."""
        deadline = time.monotonic() + SLOW_GRACE_S
        while full := [w for w in self._live if w.capacity - len(w.pending) < batch]:
            if time.monotonic() > deadline:
                for watch in full:
                    self._too_slow(watch)
                return
            await asyncio.sleep(0.005)

    async def _read(self) -> None:
        """The reader: from now on, every change in order, handed out before the position
        moves past it."""
        failures, batch = 0, max(1, min(READ_BATCH, self._limits.buffer // 2))
        while not self._closed:
            try:
                if self._position is None:
                    self._position = await self._store.feed_head()
                    self._ready.set()
                await self._room(batch)
                self._wake.clear()
                began = time.monotonic()
                read = await self._store.read_changes(self._position, batch)
                failures = 0
            except OutOfRange as gone:
                # The database is behind the reader (a failover to a standby that had not
                # seen the newest commits): what the watches hold may not exist any more.
                log.error("the change feed went back: %s; ending every watch", gone)
                for watch in tuple(self._live):
                    watch.end(OutOfRange(FEED_WENT_BACK))
                    self._live.discard(watch)
                self._position = None
                self._epoch += 1
                self._ready.clear()
                if self._follower is not None:
                    self._follower.clear()
                continue
            except Exception as exc:  # the watches wait meanwhile; the reader must not die
                if self._follower is not None:  # the database may have failed over
                    self._follower.clear()
                if failures % 30 == 0:
                    log.warning("the change feed cannot be read now: %s; retrying", type(exc).__name__)
                failures += 1
                await asyncio.sleep(RETRY_S)
                continue
            # The follower first, with no await before the hand-out: a watcher runs only
            # after both, so one that Gets what it was told of finds it forgotten.
            if self._follower is not None:
                self._follower.applied(read, began)
            self._hand_out(read.changes)
            self._position = read.reached
            if len(read.changes) < batch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._limits.poll_s):
                        await self._wake.wait()

    async def _keep_listening(self, listen: Listen) -> None:
        pause = RETRY_S
        while not self._closed:
            started = time.monotonic()
            session = _ListenSession(self._wake, self._follower)
            try:
                await listen(session.woken)
            finally:
                session.lost()
            self._wake.set()  # lost: look now, and again once it is back
            # Polling carries the feed meanwhile: back off while Postgres stays away.
            pause = (
                RETRY_S if time.monotonic() - started > LISTEN_BACKOFF_MAX_S else min(pause * 2, LISTEN_BACKOFF_MAX_S)
            )
            await asyncio.sleep(pause)

    async def _prune(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._limits.prune_every_s)
            cutoff = datetime.now(UTC) - timedelta(seconds=self._limits.retention_s)
            try:
                pruned = PRUNE_BATCH
                total = 0
                while pruned == PRUNE_BATCH:
                    pruned = await self._store.prune_changes(cutoff, PRUNE_BATCH)
                    total += pruned
            except Exception as exc:  # the next round tries again
                log.warning("cannot prune the change feed now: %s", type(exc).__name__)
                continue
            if total:
                log.info("pruned the change feed", extra={"changes": total, "before": cutoff.isoformat()})
