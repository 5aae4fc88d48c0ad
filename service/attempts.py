"""One attempt at a time per idempotency key, and the Stripe idempotency keys of its
calls: claiming the key (a lease in Postgres), running the attempt as a task of its own,
releasing or answering the key at its end, and which generation of Stripe keys the
attempt's calls carry. Used by the Create, Pay and Void of service/invoices.py; knows no
SQL (service/storage/creates.py) and no status codes.

Why a generation of Stripe keys may change, and when. Stripe "saves the status code and
body of the first request made with a given idempotency key after endpoint execution
begins ... regardless of whether it succeeds or fails" and replays it to that key for 24
hours, 500s included; only requests that fail parameter validation or conflict with one
running concurrently are not saved (https://docs.stripe.com/idempotency,
https://docs.stripe.com/api/idempotent_requests). Attempts of one key share its Stripe
keys, so that a call still in flight (an attempt that timed out, or whose lease ran out)
and its retry collapse into one at Stripe (a 409 while it runs, its answer after).

A new generation is safe when no call with the old keys can still be running and
every step re-reads Stripe before acting (invoices.py: a step runs only when its effect is
absent). Which answers prove that:
- any answer Stripe REPLAYS (header Idempotent-Replayed: true) for a step's key: the
  key's one execution has ended; if it was an error (a 5xx, a 402 decline, a 400/404
  refusal) it is stale, saved by an earlier attempt, and says nothing of now: the attempt
  moves to the next generation and runs once more, from what Stripe shows. A refusal the
  admin has since fixed (a payment method attached, the invoice's card replaced) then gets
  a fresh try, where the old key would have answered the refusal for a day. Other steps'
  old keys are not running either: an attempt calls a step only once every earlier step's
  effect shows at Stripe, so an old call in flight is always on the step the attempt is at
  (and it would have answered 409, not a replay).
- a first-hand 402 card_declined on pay: the PaymentIntent failed, nothing was captured,
  the invoice stays open; a first-hand 400 (not attached, already paid, voided): nothing
  was done. These are answered to the caller as they are; the caller's retry with the same
  key meets their replay and so gets its fresh try.
- nothing else. A 5xx answered first-hand may come from a proxy, or from a request Stripe
  did not save; a timeout, a dropped connection, a 409 or a 429 leave the call's fate
  unknown (it may still be running, or charge later): the attempt keeps its keys, so that
  its retry meets that call instead of charging beside it.
A retry can then never charge twice: a charge that happened shows as `paid` when the
step re-reads the invoice, and one that may still happen holds the key it would need.
A replayed 2xx is used as it is (it is the step's effect, e.g. a draft that a listing
does not show yet)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from service.auth import CALLER
from service.domain import (
    Audited,
    ClaimUnconfirmed,
    CreateClaim,
    CreateInProgress,
    StoreUnavailable,
    StripeReplayed,
    Unavailable,
    audit_outcome,
)
from service.logs import REQUEST_ID

log = logging.getLogger(__name__)
T = TypeVar("T")


class CreateRequests(Protocol):
    async def claim_create(
        self, key: str, fingerprints: tuple[str, ...], lease_s: float, audited: Audited, claim_id: uuid.UUID
    ) -> dict[str, Any] | CreateClaim: ...
    async def record_create_step(
        self, key: str, attempt: int, step: str, stripe_invoice_id: str | None, lease_s: float
    ) -> None: ...
    async def finish_create(
        self, key: str, attempt: int, stripe_invoice_id: str, response: dict[str, Any], audited: Audited
    ) -> None: ...
    async def release_create(
        self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]
    ) -> None: ...
    async def settle_claim(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> bool: ...
    async def new_stripe_keys(self, key: str, attempt: int) -> int: ...
    async def recorded_invoices(self, stripe_invoice_ids: list[str]) -> set[str]: ...
    async def claim_keyless(self, fingerprint: str, key: str, window_s: float) -> str: ...


@dataclass(frozen=True)
class Timing:
    """How long an attempt owns its key between two renewals (one before every Stripe
    call; the composition root sizes it from the Stripe timeout and retries), how long a
    duplicate waits for the attempt in progress, how often a failed attempt's claim is
    offered back while the store is away, and the keyless duplicate window."""

    lease_s: float
    wait_s: float = 10.0
    poll_s: float = 0.1
    release_retry_s: float = 0.5
    duplicate_window_s: float = 120.0


def audited_call(action: str, idempotency_key: str | None, stripe_invoice_id: str | None = None) -> Audited:
    """Who asked, from the call being handled: the edge names the caller (service/auth.py)
    and the request id (service/logs.py); `-` for a caller that is not a call (a test)."""
    caller = CALLER.get()
    return Audited(action, caller.name if caller else "-", REQUEST_ID.get(), idempotency_key, stripe_invoice_id)


def stripe_key(key: str, generation: int, step: str) -> str:
    """Stripe's Idempotency-Key for one step of the key's attempts, in one generation."""
    return f"invoice-service:{key}:{generation}:{step}"


class KeyedAttempts:
    """Runs the attempts of idempotency keys, one at a time per key (see the module's
    docstring for the Stripe keys they carry)."""

    def __init__(self, requests: CreateRequests, timing: Timing) -> None:
        self._requests = requests
        self._timing = timing
        # Attempts run as tasks of their own, from their claim on: a caller that goes away
        # (Envoy's route timeout, a client deadline) must not cut an attempt between Stripe
        # charging and the row recording it, nor a claim as it commits (it would hold the
        # key for nobody). Held here so that they are not garbage-collected, and so that
        # shutdown can wait for them (`drain`).
        self._running: set[asyncio.Task[Any]] = set()

    def _in_background(self, work: Awaitable[T]) -> asyncio.Future[T]:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _detached(self, work: Awaitable[T]) -> T:
        return await asyncio.shield(self._in_background(work))

    async def drain(self, timeout_s: float) -> None:
        """Waits for the attempts still running (their callers may have gone), so that
        they record what they did before the pool closes."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)

    async def _claim(self, key: str, fingerprints: tuple[str, ...], audited: Audited) -> dict[str, Any] | CreateClaim:
        """Claims the key, waiting a while for an attempt in progress to answer. A claim
        whose commit broke off may have been made (it reached Postgres and the standby,
        and then a failover cut the connection): it is ended in the background if so, or
        the caller's retries would wait out its lease. In the failover chaos scenario one
        Create's retries got 503 for 45 s before this."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timing.wait_s
        while True:
            claim_id = uuid.uuid4()
            try:
                return await self._requests.claim_create(key, fingerprints, self._timing.lease_s, audited, claim_id)
            except CreateInProgress:
                if loop.time() >= deadline:
                    raise
            except ClaimUnconfirmed as exc:
                self._in_background(self._settle(key, claim_id, audited, (Unavailable.__name__, str(exc))))
                raise
            await asyncio.sleep(self._timing.poll_s)

    async def _settle(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> None:
        """Ends an unconfirmed claim once the store answers, if it was made (while the
        store cannot tell, settle_claim says so)."""
        await self._until_done(lambda: self._requests.settle_claim(key, claim_id, audited, outcome))

    async def _until_done(self, step: Callable[[], Awaitable[bool]]) -> bool:
        """Repeats `step` while the store is away or it says it is not done, until the
        lease would have ended the claim it ends anyway; whether it got done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timing.lease_s
        while loop.time() < deadline:
            try:
                if await step():
                    return True
            except Unavailable:
                pass
            await asyncio.sleep(self._timing.release_retry_s)
        return False

    async def _attempt(
        self,
        key: str,
        claim: CreateClaim,
        run: Callable[[int], Awaitable[T]],
        answer: Callable[[T], tuple[str, dict[str, Any]]],
        audited: Callable[[], Audited],
    ) -> T:
        """Runs one attempt under its claim with the key's current generation of Stripe
        keys, and once more with the next if Stripe replays an error it saved for one of
        them (a 5xx, a decline, a refusal: then no call of the key is running, and `run`
        starts again from what Stripe shows). On
        failure the key is released; on success the answer is stored. Should storing fail
        after Stripe did the work, the key is released too, so the caller's retry reads
        what Stripe holds instead of waiting out the lease. Either end writes the attempt's
        audit entry with it (`audited`, asked at the end: a Create knows its invoice only
        once Stripe made it)."""
        try:
            try:
                result = await run(claim.generation)
            except StripeReplayed:
                result = await run(await self._requests.new_stripe_keys(key, claim.attempt))
            stripe_invoice_id, response = answer(result)
            await self._requests.finish_create(key, claim.attempt, stripe_invoice_id, response, audited())
        except BaseException as exc:
            await self._release(key, claim.claim_id, audited(), exc)
            raise
        return result

    async def _release(self, key: str, claim_id: uuid.UUID, audited: Audited, failure: BaseException) -> None:
        """Ends a failed attempt's claim; when the store is away (it failed the attempt,
        not asked again: the caller would wait a second budget for its 503; or it fails
        this), once it answers again, so the caller's retry need not wait out the lease
        (failover chaos: 35 s before this). Late is safe: the statement ends only this
        attempt's claim (by its id), while it has no answer and no other claim took over."""
        outcome = audit_outcome(failure)
        if not isinstance(failure, StoreUnavailable):
            with contextlib.suppress(Unavailable):
                return await self._requests.release_create(key, claim_id, audited, outcome)
        self._in_background(self._release_later(key, claim_id, audited, outcome))

    async def _release_later(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> None:
        async def release() -> bool:
            await self._requests.release_create(key, claim_id, audited, outcome)
            return True

        await asyncio.sleep(self._timing.release_retry_s)  # it failed a moment ago
        if await self._until_done(release):
            return
        # The lease has ended the claim meanwhile; the attempt that takes the key over
        # writes this one's audit entry (`abandoned`), without its outcome.
        log.warning(
            "a failed attempt's key could not be released, nor its outcome audited, before its lease ran out",
            extra={"action": audited.action, "claim": str(claim_id), "invoice": audited.stripe_invoice_id},
        )
