"""Races between two attempts of one Create key, each forced into the order its name
describes rather than left to sleeps: a test holds one attempt's Stripe call before it
leaves (Held) until the other attempt has done what the race needs, ends a lease by
moving its time in the database instead of waiting it out, and checks from the log of
calls as Stripe answered them that the interleaving happened. Helpers shared with the
other Create tests come from tests/create_helpers.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import stripe

from service.domain import CreateInProgress, NewInvoice, Unavailable
from service.storage import Storage
from tests.create_helpers import Payments, creator, emulator, request, stripe_invoices
from tools.customers import customer_with_card

# (attempt, step) of each Stripe call, in the order Stripe answered them.
Log = list[tuple[str, str]]


class Held(Payments):
    """The real payments of one attempt, `name`: its call of step `held` waits before it
    leaves for Stripe (`reached` is set) until the test sets `go`. Every call is logged in
    `log`, which the attempts of a test share, once Stripe answered (or failed) it."""

    def __init__(self, client: stripe.StripeClient, name: str, log: Log, held: str = "") -> None:
        super().__init__(client)
        self.name, self.log, self.held = name, log, held
        self.reached, self.go = asyncio.Event(), asyncio.Event()

    async def _sent(self, step: str, call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        if step == self.held:
            self.reached.set()
            await self.go.wait()
        try:
            return await call()
        finally:
            self.log.append((self.name, step))

    async def create_draft(self, new: NewInvoice, key: str, stripe_key: str) -> dict[str, Any]:
        return await self._sent("draft", partial(super().create_draft, new, key, stripe_key))

    async def add_lines(self, invoice_id: str, items: Any, stripe_key: str) -> dict[str, Any]:
        return await self._sent("lines", partial(super().add_lines, invoice_id, items, stripe_key))

    async def finalize(self, invoice_id: str, stripe_key: str) -> dict[str, Any]:
        return await self._sent("finalize", partial(super().finalize, invoice_id, stripe_key))


class TimesOut(Held):
    """The SDK gives up on add_lines while the request is still on its way to Stripe: the
    attempt fails at once, and the call (`late`) lands when the test lets it go."""

    late: asyncio.Future[Any] | None = None

    def __init__(self, client: stripe.StripeClient, name: str, log: Log) -> None:
        super().__init__(client, name, log, held="lines")

    async def add_lines(self, invoice_id: str, items: Any, stripe_key: str) -> dict[str, Any]:
        self.late = asyncio.ensure_future(super().add_lines(invoice_id, items, stripe_key))
        raise Unavailable("Stripe is unreachable or failing; retry later with the same idempotency key")


async def until_held(held: Held, attempt: asyncio.Future[Any]) -> None:
    """Until `held`'s call waits to leave; fails if its attempt ended before that."""
    reached = asyncio.ensure_future(held.reached.wait())
    await asyncio.wait({reached, attempt}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    reached.cancel()
    assert held.reached.is_set(), f"{held.name} never reached its {held.held} call: {attempt}"


async def let_go(tasks: list[asyncio.Future[Any] | None], *helds: Held) -> None:
    """Ends a test's held calls and attempts whatever it asserted, so none outlives it."""
    for held in helds:
        held.go.set()
    await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)


async def lease_runs_out(store: Storage, key: str) -> None:
    """The key's lease ends now, as it would once its time passed: the attempt holding it
    is still running, and renews it no more."""
    async with store._connection() as conn:
        status = await conn.execute(
            "UPDATE create_requests SET lease_until = now() - interval '1 second'"
            " WHERE idempotency_key = $1 AND lease_until > now()",
            key,
        )
    assert status == "UPDATE 1", "the key had no lease running"


async def attempt_of(store: Storage, key: str) -> int:
    async with store._connection() as conn:
        return int(await conn.fetchval("SELECT attempt FROM create_requests WHERE idempotency_key = $1", key))


@pytest.mark.parametrize("step", ["draft", "lines"])
async def test_an_attempt_still_in_flight_when_its_lease_runs_out_does_not_bill_twice(
    store: Storage, stripe_client: stripe.StripeClient, step: str
) -> None:
    """The first attempt's call of `step` is on its way when its lease runs out; the second
    attempt takes the key over, finds nothing done yet and sends the same step; then the
    first one's call lands, before the second finalizes (a finalized invoice would refuse
    it, and hide a second set of lines). The two calls share Stripe's key, so Stripe does
    the work once; the first attempt, fenced, records nothing."""
    customer, method = await customer_with_card(stripe_client)
    key = f"in-flight-{step}"
    log: Log = []
    slow, taker = Held(stripe_client, "first", log, held=step), Held(stripe_client, "second", log, held="finalize")
    first = asyncio.ensure_future(creator(store, slow).create(request(customer, method), key))
    second = None
    try:
        await until_held(slow, first)
        with pytest.raises(CreateInProgress):  # while the lease holds, nobody takes over
            await creator(store, Payments(stripe_client), wait_s=0).create(request(customer, method), key)
        await lease_runs_out(store, key)
        second = asyncio.ensure_future(creator(store, taker).create(request(customer, method), key))
        await until_held(taker, second)
        assert (await attempt_of(store, key), first.done()) == (2, False)  # taken over in flight
        slow.go.set()
        with pytest.raises(CreateInProgress, match="took over"):  # its call landed, then it was fenced
            await first
        taker.go.set()
        answer = await second
    finally:
        await let_go([first, second], slow, taker)
    done_before = [("first", "draft")] if step == "lines" else [("second", "draft")]
    assert log == [*done_before, ("second", "lines"), ("first", step), ("second", "finalize")]
    invoices = await stripe_invoices(stripe_client, customer)
    assert [(i.id, i.status, i.amount_paid, i.total) for i in invoices] == [(answer["id"], "paid", 4000, 4000)]


async def _late_lines_land_before_the_retry_finalizes(
    store: Storage, stripe_client: stripe.StripeClient, new: NewInvoice, key: str, late: TimesOut
) -> dict[str, Any]:
    """The caller's retry while `late`'s add_lines is still on its way: the retry reads the
    draft without lines, sends them itself, and the late call lands before it finalizes.
    Its answer, once the log shows that order."""
    retry = Held(stripe_client, "retry", late.log, held="finalize")
    retrying = asyncio.ensure_future(creator(store, retry).create(new, key))
    try:
        await until_held(retry, retrying)
        assert late.late is not None and not late.late.done()
        late.go.set()
        await late.late
        retry.go.set()
        answer = await retrying
    finally:
        await let_go([late.late, retrying], late, retry)
    assert late.log == [("first", "draft"), ("retry", "lines"), ("first", "lines"), ("retry", "finalize")]
    return answer


async def test_a_retry_right_after_a_timeout_does_not_add_the_lines_twice(
    store: Storage, stripe_client: stripe.StripeClient
) -> None:
    """The retry's add_lines and the late one carry one Stripe key: the lines land once."""
    customer, method = await customer_with_card(stripe_client)
    timing_out = TimesOut(stripe_client, "first", [])
    with pytest.raises(Unavailable):
        await creator(store, timing_out).create(request(customer, method), "timed-out")
    answer = await _late_lines_land_before_the_retry_finalizes(
        store, stripe_client, request(customer, method), "timed-out", timing_out
    )
    invoices = await stripe_invoices(stripe_client, customer)
    assert [(i.id, i.amount_paid, i.total) for i in invoices] == [(answer["id"], 4000, 4000)]


async def test_a_500_on_a_read_does_not_renew_the_keys_while_a_call_is_in_flight(
    store: Storage, stripe_client: stripe.StripeClient, localstripe: str
) -> None:
    """Only a 5xx Stripe replays for a key proves that no call with it is running. A 500
    on a read (no key, nothing saved) must not move the key on: here the first attempt's
    add_lines is still on its way, and a retry under new keys would add the lines twice."""
    customer, method = await customer_with_card(stripe_client)
    timing_out = TimesOut(stripe_client, "first", [])
    with pytest.raises(Unavailable):
        await creator(store, timing_out).create(request(customer, method), "read-500")
    await emulator(localstripe, "POST", "/_config/faults", {"path": "^/v1/invoices/in_[^/]+$", "method": "GET"})
    try:
        with pytest.raises(Unavailable):
            await creator(store, Payments(stripe_client)).create(request(customer, method), "read-500")
    finally:
        await emulator(localstripe, "DELETE", "/_config/faults")
    answer = await _late_lines_land_before_the_retry_finalizes(
        store, stripe_client, request(customer, method), "read-500", timing_out
    )
    invoices = await stripe_invoices(stripe_client, customer)
    assert [(i.id, i.amount_paid, i.total) for i in invoices] == [(answer["id"], 4000, 4000)]
