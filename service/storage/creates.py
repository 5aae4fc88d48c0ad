"""The Create idempotency keys on Postgres: claiming a key for one attempt at a time (a
lease; progress fenced by the attempt number, releases by the claimer's claim id),
recording each step's progress, the answer, and the keyless duplicate window; and the
audit trail each attempt's end appends to. Every statement about create_requests and
invoice_audit lives here."""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from typing import Any

import asyncpg

from service.domain import (
    AUDIT_ABANDONED,
    AUDIT_OK,
    CREATE_STEPS,
    AlreadyExists,
    Audited,
    AuditEntry,
    AuditPage,
    ClaimUnconfirmed,
    CreateClaim,
    CreateInProgress,
    Unavailable,
)
from service.storage.pool import Pooled

log = logging.getLogger(__name__)


# A Create's idempotency key: a new key is claimed by its first attempt; a key whose
# attempts did not finish is claimed again (attempt + 1) once no attempt holds its lease.
# Read committed: ON CONFLICT then sees, and locks, the row a concurrent claim committed.
def _entry(audited: Audited, outcome: str, detail: str) -> tuple[str | None, ...]:
    """`_audited`'s parameters, in its order."""
    a = audited
    return (a.action, a.caller, a.request_id, a.idempotency_key, outcome, detail, a.stripe_invoice_id)


_CLAIM_CREATE = """
    INSERT INTO create_requests AS r
        (idempotency_key, fingerprint, lease_until, step, attempt_audited, audited_attempt, claim_id)
    VALUES ($1, $2, now() + make_interval(secs => $3), 'claimed', $5::jsonb, 1, $6)
    ON CONFLICT (idempotency_key) DO UPDATE SET
        attempt = r.attempt + 1, lease_until = EXCLUDED.lease_until, attempt_audited = EXCLUDED.attempt_audited,
        audited_attempt = r.attempt + 1, claim_id = EXCLUDED.claim_id, updated_at = now()
    WHERE r.fingerprint = ANY($4::text[]) AND r.response IS NULL
        AND (r.lease_until IS NULL OR r.lease_until < now())
    RETURNING attempt, stripe_key_gen, stripe_invoice_id, step, created_at, claim_id"""
# An attempt whose lease ran out with neither answer nor release (that sets lease_until
# NULL) wrote no audit entry; the claim that takes its key over writes it, when the row
# says who ran that very attempt (a replica from before migration 0008 claims without
# saying). Locked before the claim, in its transaction, so that a release arriving late or
# a racing claim cannot change the row in between (one CTE would not do: a locking read of
# a row its own statement updated skips it).
_ABANDONED_ATTEMPT = """
    SELECT attempt, stripe_invoice_id, attempt_audited FROM create_requests
    WHERE idempotency_key = $1 AND response IS NULL AND lease_until < now() AND audited_attempt = attempt
    FOR UPDATE"""
_GET_CREATE = """
    SELECT fingerprint, response, coalesce(lease_until > now(), false) AS leased
    FROM create_requests WHERE idempotency_key = $1"""
# Progress is fenced by the attempt: one whose lease another attempt took over records nothing.
# A step never goes back (a resumed attempt renews its lease with the step it found done).
_RECORD_CREATE_STEP = """
    UPDATE create_requests SET
        step = CASE WHEN array_position($6::text[], $3) > array_position($6::text[], step) THEN $3 ELSE step END,
        stripe_invoice_id = coalesce($4, stripe_invoice_id),
        lease_until = now() + make_interval(secs => $5), updated_at = now()
    WHERE idempotency_key = $1 AND attempt = $2 AND response IS NULL"""


# The advisory lock class (two-key form) of one invoice's audit entries.
_AUDIT_LOCK = 0x1A7A0D1


def _audited(first: int) -> str:
    """The audit row of the attempt the `ended` CTE names, from parameters `first`...
    (action, caller, request id, the caller's key, outcome, detail, invoice): one
    statement with the attempt's end, so neither is written without the other."""
    return _audit_row(*(f"${n}" for n in range(first, first + 7)))


def _audit_row(action: str, caller: str, request_id: str, key: str, outcome: str, detail: str, invoice: str) -> str:
    """The rest of a statement whose `ended` CTE names an attempt (its invoice, unless
    `invoice` names one, and its number): inserts its audit row from these expressions.
    One invoice's rows are inserted a transaction at a time (a lock on the invoice, held
    to commit), so that their seq order is their commit order: a page of the trail that
    ends at an entry can never skip an earlier one committed later. A CTE with a volatile
    function is run, never inlined, and before the row it joins is formed."""
    return f""",
    ordered AS (
        SELECT pg_advisory_xact_lock({_AUDIT_LOCK}, hashtext(coalesce({invoice}, ended.stripe_invoice_id))) FROM ended)
    INSERT INTO invoice_audit
        (action, caller, request_id, idempotency_key, outcome, detail, stripe_invoice_id, attempt)
    SELECT {action}, {caller}, {request_id}, {key}, {outcome}, {detail},
        coalesce({invoice}, ended.stripe_invoice_id), ended.attempt
    FROM ended, ordered"""  # noqa: S608 - expressions of this module only


# The attempt that took over the key is of the same request, so of the same action.
_ABANDONED_ROW = _audit_row(
    "$4",
    "coalesce(ended.who->>'caller', '-')",
    "ended.who->>'request_id'",
    "ended.who->>'idempotency_key'",
    f"'{AUDIT_ABANDONED}'",
    "$5",
    "ended.who->>'stripe_invoice_id'",
)
_ABANDONED_ENTRY = f"""
    WITH ended AS (SELECT $1::text AS stripe_invoice_id, $2::integer AS attempt, $3::jsonb AS who)
    {_ABANDONED_ROW}"""
_ABANDONED = "its lease ran out with no answer (its process stopped, or lost the database); the next attempt took over"
_FINISH_CREATE = f"""
    WITH ended AS (
        UPDATE create_requests SET stripe_invoice_id = $3, response = $4, step = 'done', completed_at = now(),
            lease_until = NULL, updated_at = now()
        WHERE idempotency_key = $1 AND attempt = $2 AND response IS NULL
        RETURNING stripe_invoice_id, attempt)
    {_audited(5)}"""  # noqa: S608 - constants
# Once only: a release that committed while its caller saw an error (a timeout) and is sent
# again finds the lease already ended, and writes no second audit row. By the claim's id,
# which its claimer knows even when it never heard the claim was made, while that claim is
# the key's latest (a replica from before migration 0008 takes over without a claim id).
_RELEASE_CREATE = f"""
    WITH ended AS (
        UPDATE create_requests SET lease_until = NULL, updated_at = now()
        WHERE idempotency_key = $1 AND claim_id = $2 AND audited_attempt = attempt AND response IS NULL
            AND lease_until IS NOT NULL
        RETURNING stripe_invoice_id, attempt)
    {_audited(3)}"""  # noqa: S608 - constants
_AUDIT_OF = """
    SELECT seq, at, action, caller, request_id, idempotency_key, stripe_invoice_id, attempt, outcome, detail
    FROM invoice_audit WHERE stripe_invoice_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"""
_NEW_STRIPE_KEYS = """
    UPDATE create_requests SET stripe_key_gen = stripe_key_gen + 1, updated_at = now()
    WHERE idempotency_key = $1 AND attempt = $2 AND response IS NULL
    RETURNING stripe_key_gen"""
_RECORDED_INVOICES = "SELECT stripe_invoice_id FROM create_requests WHERE stripe_invoice_id = ANY($1::text[])"
# The first of identical keyless requests within the window holds the fingerprint.
# ... and keeps it past the window while that key's Create is unanswered and was tried within
# the window: a keyless caller retrying through an outage longer than the window resumes its
# draft (charged already, perhaps) rather than billing again under a new key.
_CLAIM_KEYLESS = """
    INSERT INTO keyless_creates AS k (fingerprint, idempotency_key) VALUES ($1, $2)
    ON CONFLICT (fingerprint) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key, claimed_at = now()
    WHERE k.claimed_at < now() - make_interval(secs => $3)
        AND NOT EXISTS (
            SELECT 1 FROM create_requests r
            WHERE r.idempotency_key = k.idempotency_key AND r.response IS NULL
                AND (r.lease_until > now() OR r.updated_at > now() - make_interval(secs => $3)))
    RETURNING idempotency_key"""
_GET_KEYLESS = "SELECT idempotency_key FROM keyless_creates WHERE fingerprint = $1"
_KEY_KNOWN = "SELECT EXISTS (SELECT 1 FROM create_requests WHERE idempotency_key = $1)"


class CreateRequests(Pooled):
    async def claim_create(
        self, key: str, fingerprints: tuple[str, ...], lease_s: float, audited: Audited, claim_id: uuid.UUID
    ) -> dict[str, Any] | CreateClaim:
        """Claims `key` for an attempt of the request whose fingerprint is the first of
        `fingerprints` (the others: the same request's older encodings), by `audited`.
        Answers the finished request's stored answer, or the claim with what earlier
        attempts recorded; refuses the key for another request, and while another attempt
        holds it. A claim whose commit broke off with the connection may have been made:
        ClaimUnconfirmed, for the claimer to end it by its id (settle_claim)."""
        who = json.dumps(dataclasses.asdict(audited))
        claim = None
        try:
            async with self._connection() as conn, conn.transaction(isolation="read_committed"):
                claim = await self._claim(conn, key, fingerprints, lease_s, audited, who, claim_id)
                row = None if claim else await conn.fetchrow(_GET_CREATE, key)
        except Unavailable as exc:  # with a claim in hand, what failed is its COMMIT
            if claim is None:
                raise
            raise ClaimUnconfirmed(str(exc)) from exc
        if claim is not None:
            return claim
        if row is None or row["fingerprint"] not in fingerprints:
            raise AlreadyExists("this Idempotency-Key was already used for a different request")
        if row["response"] is not None:
            return dict(json.loads(row["response"]))
        if row["leased"]:
            raise CreateInProgress("a request with this Idempotency-Key is in progress; retry later")
        raise CreateInProgress("this Idempotency-Key was just released; retry")

    @staticmethod
    async def _claim(
        conn: asyncpg.pool.PoolConnectionProxy,
        key: str,
        fingerprints: tuple[str, ...],
        lease_s: float,
        audited: Audited,
        who: str,
        claim_id: uuid.UUID,
    ) -> CreateClaim | None:
        abandoned = await conn.fetchrow(_ABANDONED_ATTEMPT, key)
        row = await conn.fetchrow(_CLAIM_CREATE, key, fingerprints[0], lease_s, list(fingerprints), who, claim_id)
        if row is None:
            return None
        if abandoned is not None:
            dead = (abandoned["stripe_invoice_id"], abandoned["attempt"], abandoned["attempt_audited"])
            await conn.execute(_ABANDONED_ENTRY, *dead, audited.action, _ABANDONED)
        return CreateClaim(
            row["attempt"], row["stripe_key_gen"], row["stripe_invoice_id"], row["step"], row["created_at"], claim_id
        )

    async def record_create_step(
        self, key: str, attempt: int, step: str, stripe_invoice_id: str | None, lease_s: float
    ) -> None:
        """Records a step done and renews the attempt's lease; an attempt that lost the key
        to another (its lease ran out) is stopped here, before its next Stripe call."""
        async with self._connection() as conn:
            status = await conn.execute(
                _RECORD_CREATE_STEP, key, attempt, step, stripe_invoice_id, lease_s, list(CREATE_STEPS)
            )
        if status == "UPDATE 0":
            raise CreateInProgress("another attempt took over this Idempotency-Key; retry later")

    async def finish_create(
        self, key: str, attempt: int, stripe_invoice_id: str, response: dict[str, Any], audited: Audited
    ) -> None:
        """Stores the attempt's answer under its key, with its audit entry (outcome `ok`)."""
        entry = _entry(audited, AUDIT_OK, "")
        async with self._connection() as conn:
            status = await conn.execute(_FINISH_CREATE, key, attempt, stripe_invoice_id, json.dumps(response), *entry)
        if status == "INSERT 0 0":
            log.warning("a finished attempt had lost its key", extra={"invoice": stripe_invoice_id})

    async def release_create(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> None:
        """Ends an attempt that failed, with its audit entry, so that the caller's retry may
        claim the key now."""
        async with self._connection() as conn:
            await conn.execute(_RELEASE_CREATE, key, claim_id, *_entry(audited, *outcome))

    async def settle_claim(self, key: str, claim_id: uuid.UUID, audited: Audited, outcome: tuple[str, str]) -> bool:
        """Ends a ClaimUnconfirmed claim if it was made, as release_create does; whether that
        is settled: False while the key has no row at all, for the claim's INSERT may still
        be committing (a row being updated is waited for, one being inserted is not seen)."""
        async with self._connection() as conn:
            status = await conn.execute(_RELEASE_CREATE, key, claim_id, *_entry(audited, *outcome))
            return status == "INSERT 0 1" or bool(await conn.fetchval(_KEY_KNOWN, key))

    async def audit_of(self, stripe_invoice_id: str, after: int, limit: int) -> AuditPage:
        """Up to `limit` entries of the invoice's trail that follow entry `after` (0: from
        the first); one more is read to tell whether another page follows."""
        async with self._connection() as conn:
            rows = await conn.fetch(_AUDIT_OF, stripe_invoice_id, after, limit + 1)
        entries = [AuditEntry(**dict(row)) for row in rows[:limit]]
        return AuditPage(entries, entries[-1].seq if len(rows) > limit else None)

    async def new_stripe_keys(self, key: str, attempt: int) -> int:
        """The next generation of the key's Stripe keys, for this attempt and those after."""
        async with self._connection() as conn:
            generation = await conn.fetchval(_NEW_STRIPE_KEYS, key, attempt)
        if generation is None:
            raise CreateInProgress("another attempt took over this Idempotency-Key; retry later")
        return int(generation)

    async def recorded_invoices(self, stripe_invoice_ids: list[str]) -> set[str]:
        """Which of these Stripe invoices a Create's key already names."""
        async with self._connection() as conn:
            rows = await conn.fetch(_RECORDED_INVOICES, stripe_invoice_ids)
        return {row["stripe_invoice_id"] for row in rows}

    async def claim_keyless(self, fingerprint: str, key: str, window_s: float) -> str:
        """The key of the first identical keyless request within `window_s`, or `key` if
        there is none (it is then the first)."""
        async with self._connection() as conn:
            claimed = await conn.fetchval(_CLAIM_KEYLESS, fingerprint, key, window_s)
            if claimed is None:  # the other request committed first: read what it holds
                claimed = await conn.fetchval(_GET_KEYLESS, fingerprint)
        return str(claimed or key)
