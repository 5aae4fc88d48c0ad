"""The watch engine (service/watch.py) on a feed of its own, where the test decides when a
change appears and when a store call returns: the moments between a watch's start and its
joining the live hand-out, which a real database makes too short to hit on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from service.domain import Change, ChangeKind, FeedPosition, FeedRead, Unavailable, WatchFilter
from service.watch import Watches, WatchLimits
from tests.helpers import make_invoice, poll_until


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
