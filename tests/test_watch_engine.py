"""The watch engine (service/watch.py) on a feed of its own, where the test decides when a
change appears and when a store call returns: the moments between a watch's start and its
joining the live hand-out, which a real database makes too short to hit on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

from service.domain import OutOfRange, Unavailable
from service.feed import Change, ChangeKind, FeedPosition, FeedRead, WatchFilter
from service.watch import Watches, WatchLimits
from tests.helpers import make_invoice, poll_until, until


class Feed:
    """An in-memory change feed: changes at (xact, 1), the head just past the newest."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.head = FeedPosition(10, 0)
        self.gate: asyncio.Event | None = None

    def add(self, xact: int) -> Change:
        change = Change(FeedPosition(xact, 1), ChangeKind.CREATED, make_invoice(xact), datetime.now(UTC))
        self.changes.append(change)
        self.head = FeedPosition(xact + 1, 0)
        return change

    async def feed_head(self) -> FeedPosition:
        return self.head

    async def read_changes(self, after: FeedPosition, limit: int) -> FeedRead:
        found = [c for c in self.changes if c.position > after][:limit]
        return FeedRead(found, found[-1].position if len(found) == limit else max(self.head, after))

    async def check_resumable(self, after: FeedPosition) -> None:
        if self.gate is not None:
            await self.gate.wait()

    async def replay_changes(
        self, after: FeedPosition, upto: FeedPosition, match: WatchFilter, limit: int
    ) -> list[Change]:
        return [c for c in self.changes if after < c.position <= upto][:limit]

    async def prune_changes(self, older_than: datetime, limit: int) -> int:
        return 0


@pytest.fixture
async def feed() -> AsyncIterator[tuple[Feed, Watches]]:
    store = Feed()
    watches = Watches(store, WatchLimits(poll_s=0.01, bookmark_s=0.5))
    watches.start()
    yield store, watches
    await watches.close()


async def _passed(watches: Watches, position: FeedPosition) -> None:
    async def reached() -> bool | None:
        return True if watches._position is not None and watches._position > position else None

    await poll_until(reached, f"the reader past {position}")


async def test_a_change_while_the_first_bookmark_is_sent_is_not_lost(feed: tuple[Feed, Watches]) -> None:
    store, watches = feed
    stream = watches.watch(None, WatchFilter())
    first = await anext(stream)
    assert first.kind == ChangeKind.BOOKMARK and first.position == FeedPosition(10, 0)
    # The stream is suspended in its bookmark's send; the reader hands out a change meanwhile.
    change = store.add(20)
    await _passed(watches, change.position)
    assert await anext(stream) == change
    await stream.aclose()


async def test_a_change_while_a_token_is_checked_is_not_lost(feed: tuple[Feed, Watches]) -> None:
    store, watches = feed
    await _passed(watches, FeedPosition(9, 0))
    store.gate = asyncio.Event()
    stream = watches.watch(FeedPosition(10, 0), WatchFilter())
    first = asyncio.create_task(_first(stream))
    await asyncio.sleep(0.05)  # in check_resumable
    change = store.add(20)
    await _passed(watches, change.position)
    store.gate.set()
    assert (await first).position == FeedPosition(10, 0)
    assert await anext(stream) == change
    await stream.aclose()


async def _first(stream: AsyncIterator[Change]) -> Change:
    return await anext(stream)


async def test_shutdown_ends_a_watch_in_the_middle_of_its_replay(feed: tuple[Feed, Watches]) -> None:
    store, watches = feed
    for xact in range(20, 1020):
        store.add(xact)
    await _passed(watches, FeedPosition(1019, 1))
    stream = watches.watch(FeedPosition(10, 0), WatchFilter())
    assert (await anext(stream)).kind == ChangeKind.BOOKMARK
    assert (await anext(stream)).position == FeedPosition(20, 1)
    await watches.close()
    with pytest.raises(Unavailable):
        await anext(stream)
    assert watches.open_streams == 0


class Follower:
    """What the reader tells the record cache, in order."""

    def __init__(self, watches: list[Watches]) -> None:
        self.calls: list[str] = []
        self._watches = watches

    def applied(self, read: FeedRead, began: float) -> None:
        # Before any watch has the change: none of them holds it yet.
        held = sum(len(w.pending) for watches in self._watches for w in watches._live)
        self.calls.append(f"applied {len(read.changes)} with {held} buffered")

    def listening(self, on: bool) -> None:
        self.calls.append(f"listening {on}")

    def clear(self) -> None:
        self.calls.append("clear")


class Failing(Feed):
    def __init__(self) -> None:
        super().__init__()
        self.failure: Exception | None = None

    async def read_changes(self, after: FeedPosition, limit: int) -> FeedRead:
        await asyncio.sleep(0.01)  # a database answers later
        if self.failure is not None:
            raise self.failure
        return await super().read_changes(after, limit)


async def test_the_follower_hears_each_read_before_the_watches_and_clears_when_the_feed_fails() -> None:
    store = Failing()
    hosts: list[Watches] = []
    follower = Follower(hosts)
    watches = Watches(store, WatchLimits(poll_s=0.01), follower=follower)
    hosts.append(watches)
    watches.start()
    try:
        stream = watches.watch(None, WatchFilter())
        await anext(stream)
        change = store.add(20)
        await _passed(watches, change.position)
        assert await anext(stream) == change
        assert "applied 1 with 0 buffered" in follower.calls
        store.failure = ConnectionResetError("the database went away")
        await until(lambda: "clear" in follower.calls, "the follower to be cleared")
        follower.calls.clear()
        store.failure = OutOfRange("the feed went back")
        await until(lambda: "clear" in follower.calls, "the follower to be cleared again")
        await stream.aclose()
    finally:
        await watches.close()


async def test_a_listen_callback_after_its_connection_was_lost_does_not_say_listening() -> None:
    follower = Follower([])
    callbacks: list[Callable[[], None]] = []
    stop = asyncio.Event()

    async def listen(wake: Callable[[], None]) -> None:
        callbacks.append(wake)
        wake()  # listening
        await stop.wait()

    watches = Watches(Feed(), WatchLimits(poll_s=0.01), listen=listen, follower=follower)
    watches.start()
    try:
        await until(lambda: bool(callbacks), "the LISTEN to start")
        assert follower.calls.count("listening True") == 1
        stop.set()
        await until(lambda: "listening False" in follower.calls, "the LISTEN to be lost")
        callbacks[0]()  # a notification delivered late, after the loss (a new LISTEN is 1 s away)
        assert follower.calls.count("listening True") == 1
    finally:
        await watches.close()
