"""Nothing Stripe or anyone else sends the webhook sidecar ends in a 5xx while Postgres is
up: every Stripe-shaped invoice is recordable (a property over generated objects, applied
to the real store), and each delivery a fuzzer makes (headers and bodies, signed and not,
valid and broken Stripe shapes) gets the one answer its kind calls for, with nothing
recorded unless it is a valid signed event of this mode."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import storage, webhooks
from service.domain import STATUSES, NotFound, Outcome
from service.stripe_objects import USER_ID, USER_NAME, invoice_from_stripe
from tests.helpers import WEBHOOK_SECRET, sign

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=40)
# Any code point, NUL and lone surrogates (JSON can escape them: "\ud800") among them.
# (st.text would leave the surrogates out.)
ANY_TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(["\x00", "\ud800", "\udfff"])), max_size=60).map("".join)
# What an HTTP client puts on the wire as a header: no control characters (a client
# refuses them), any other byte; non-ASCII as UTF-8 bytes.
HEADER_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=80)


STRIPE_TIMES = st.integers(0, 2**33)  # 1970 to the year 2242


def stripe_invoices(created: st.SearchStrategy[int] = STRIPE_TIMES) -> st.SearchStrategy[dict[str, Any]]:
    """Invoice objects as Stripe could send them, at any API version: any status, any
    total a bigint holds (credits, zero, past 2^31), any currency, any customer name and
    metadata, with or without the fields older versions lacked."""
    return st.fixed_dictionaries(
        {
            "id": IDS.map(lambda s: f"in_{s}"),
            "object": st.just("invoice"),
            "status": st.sampled_from(STATUSES),
            "total": st.one_of(st.integers(-(2**40), 2**40), st.sampled_from([-(2**63), 2**63 - 1, 0, 2**31])),
            "currency": st.sampled_from(["eur", "usd", "jpy", "krw", "gbp", "bhd"]),
            "customer": IDS.map(lambda s: f"cus_{s}"),
        },
        optional={
            "created": created,
            "customer_name": st.one_of(st.none(), ANY_TEXT),
            "invoice_pdf": st.one_of(st.none(), ANY_TEXT),
            "livemode": st.just(False),
            "metadata": st.one_of(
                st.just({}),
                st.fixed_dictionaries({USER_ID: ANY_TEXT.filter(bool), USER_NAME: ANY_TEXT}),
                st.dictionaries(ANY_TEXT, ANY_TEXT, max_size=3),
            ),
        },
    )


@pytest.fixture
def loop_and_store(database: str) -> Iterator[tuple[asyncio.AbstractEventLoop, storage.Storage]]:
    """A loop of the test's own, so that hypothesis (synchronous) can drive the async store."""
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(storage.connect(database, max_size=2, command_timeout=10))
    yield loop, storage.Storage(pool)
    loop.run_until_complete(pool.close())
    loop.close()


def test_every_stripe_shaped_invoice_is_recordable(
    loop_and_store: tuple[asyncio.AbstractEventLoop, storage.Storage],
) -> None:
    loop, store = loop_and_store

    @SETTINGS
    @given(obj=stripe_invoices(), kind=st.sampled_from(sorted(webhooks.INVOICE_EVENTS)), at=st.integers(0, 2**33))
    def recorded(obj: dict[str, Any], kind: str, at: int) -> None:
        invoice = invoice_from_stripe(obj)
        outcome = loop.run_until_complete(
            store.apply_stripe_invoice(invoice, stripe_time=at, event_id=f"evt_{uuid.uuid4().hex}", event_type=kind)
        )
        assert outcome in set(Outcome) - {Outcome.DUPLICATE}  # each event is new
        if outcome in {Outcome.CREATED, Outcome.UPDATED}:
            record = loop.run_until_complete(store.get_invoice(invoice.stripe_invoice_id))
            assert (record.amount, record.status, record.currency) == (obj["total"], obj["status"], obj["currency"])

    recorded()


# Stripe's event types the service does not record, and types no one sends: answered `ignored`.
OTHER_TYPES = st.one_of(
    st.sampled_from(["invoice.sent", "invoice.upcoming", "invoice.overdue", "customer.created", "charge.succeeded"]),
    ANY_TEXT.map(lambda s: f"test.{s}"),
)
RECORDED_TYPES = st.sampled_from(sorted(webhooks.INVOICE_EVENTS - {"invoice.deleted"}))
# What JSON holds besides strings and integers, for fields that must be one of them.
NOT_TEXT_OR_INT = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False).filter(bool), st.just([1]), st.just({"a": 1})
)
# A new event id, or a new invoice id, made when the case is sent: an id seen before
# would make a valid event a duplicate.
FRESH = "fresh"
# A field left out of the object, where a broken value is drawn.
_ABSENT = object()


@dataclass(frozen=True)
class Case:
    """One delivery and the one answer it must get: `invalid` (400, JSON, code 3, the
    message naming `field`), `ignored` or `rejected` (200, nothing recorded), `created`
    or `deleted` (200, the invoice recorded or deleted as the event says)."""

    expect: str
    event: Any
    signing: str = "signed"
    field: str = ""
    raw: bool = False  # `event` is the body itself, not JSON to encode


def _event(obj: Any, kind: str, **fields: Any) -> dict[str, Any]:
    return {"id": FRESH, "object": "event", "type": kind, "created": 1_700_000_000, "data": {"object": obj}, **fields}


def _valid(expect: str, kind: st.SearchStrategy[str]) -> st.SearchStrategy[Case]:
    created, livemode = st.integers(0, 2**33), st.sampled_from([{}, {"livemode": False}])
    return st.builds(
        lambda obj, k, at, mode: Case(expect, _event(obj, k, created=at, **mode)),
        stripe_invoices(),
        kind,
        created,
        livemode,
    )


def _broken(field: str, values: st.SearchStrategy[Any], **also: Any) -> st.SearchStrategy[Case]:
    """A valid invoice event whose object's `field` holds one of `values` (absent: a missing field)."""

    def case(obj: dict[str, Any], value: Any, kind: str) -> Case:
        obj = {k: v for k, v in obj.items() if k != field} | also | ({} if value is _ABSENT else {field: value})
        return Case("rejected", _event(obj, kind))

    return st.builds(case, stripe_invoices(), values, RECORDED_TYPES)


BAD_EVENT_IDS = st.one_of(
    NOT_TEXT_OR_INT,
    st.integers(),
    ANY_TEXT.filter(lambda s: not s.startswith("evt_")),
    st.just("evt_"),
    st.just("evt_" + "a" * 256),
    st.tuples(IDS, st.sampled_from(["-", " ", ".", "é", "\x00", "/"])).map(lambda p: f"evt_{p[0]}{p[1]}"),
)


_VALID = _valid("created", RECORDED_TYPES)
_SIGNATURE_MODES = ["unsigned", "other secret", "garbled", "other body", "stale", "future"]
# Every kind of delivery, by name, each run on its own so that each is tried as often.
CASES: dict[str, st.SearchStrategy[Case]] = {
    # Not Stripe's: no signature, another secret's, garbled headers, another body's, too old, from the future.
    **{
        f"signature {how}": st.builds(lambda c, how=how: Case("invalid", c.event, how, "Stripe-Signature"), _VALID)
        for how in _SIGNATURE_MODES
    },
    # Signed, but not an event.
    "not an event": st.builds(
        lambda body: Case("invalid", body, field="body"),
        st.one_of(
            NOT_TEXT_OR_INT,
            st.integers(),
            ANY_TEXT,
            st.just([{"type": "invoice.paid"}]),
            st.dictionaries(ANY_TEXT.filter(lambda k: k != "type"), st.integers(), max_size=3),
            st.builds(lambda t: {"id": "evt_x", "type": t}, NOT_TEXT_OR_INT),
        ),
    ),
    "cut short": st.builds(lambda c: Case("invalid", json.dumps(c.event)[:-1], field="body", raw=True), _VALID),
    # Signed, an event in shape, but not with an id of Stripe's.
    "bad event id": st.builds(lambda c, i: Case("invalid", {**c.event, "id": i}, field="id"), _VALID, BAD_EVENT_IDS),
    "no event id": st.builds(
        lambda c: Case("invalid", {k: v for k, v in c.event.items() if k != "id"}, field="id"), _VALID
    ),
    # Valid, but nothing the service records: another type, or the other mode.
    "other type": st.builds(lambda c, t: Case("ignored", {**c.event, "type": t}), _VALID, OTHER_TYPES),
    "live mode": st.builds(lambda c: Case("ignored", {**c.event, "livemode": True}), _VALID),
    # Valid and signed, but never recordable: taken as `rejected`.
    "bad created": st.builds(
        lambda c, at: Case("rejected", {**c.event, "created": at}), _VALID, st.one_of(NOT_TEXT_OR_INT, ANY_TEXT)
    ),
    "no created": st.builds(lambda c: Case("rejected", {k: v for k, v in c.event.items() if k != "created"}), _VALID),
    "bad data": st.builds(
        lambda c, d: Case("rejected", {**c.event, "data": d}),
        _VALID,
        st.one_of(NOT_TEXT_OR_INT, ANY_TEXT, st.just({}), st.builds(lambda o: {"object": o}, NOT_TEXT_OR_INT)),
    ),
    "bad total": _broken(
        "total",
        st.one_of(
            st.just(True),
            st.floats(allow_nan=False).filter(bool),
            ANY_TEXT.filter(bool),
            st.sampled_from([2**63, -(2**63) - 1, [1]]),
        ),
    ),
    "bad status": _broken(
        "status", st.one_of(st.just(_ABSENT), st.integers(), ANY_TEXT.filter(lambda s: s not in STATUSES))
    ),
    "bad invoice id": _broken(
        "id", st.one_of(st.just(_ABSENT), st.integers(), st.sampled_from(["in_", "cus_x", "in_a-b", "in_" + "a" * 251]))
    ),
    "no owner": _broken("customer", st.sampled_from([_ABSENT, None, "", 5]), metadata={}),
    "bad currency": _broken("currency", st.sampled_from(["EUR", "eu", "euro", 978, ""])),
    "bad invoice created": _broken("created", st.sampled_from([-1, 253_402_300_800, 1.5, True, "1700000000"])),
    "bad metadata": _broken("metadata", st.sampled_from(["x", [1], 7])),
    # Valid: recorded as the event says.
    "valid": _VALID,
    "valid deletion": _valid("deleted", st.just("invoice.deleted")),
}


def _headers(case: Case, body: str, extra: dict[str, str]) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    now = int(time.time())
    if case.signing == "signed":
        headers["Stripe-Signature"] = sign(body)
    elif case.signing == "other secret":
        headers["Stripe-Signature"] = sign(body, "whsec_other")
    elif case.signing == "other body":
        headers["Stripe-Signature"] = sign(body + " ")
    elif case.signing in {"stale", "future"}:
        headers["Stripe-Signature"] = sign(body, at=now - 3600 if case.signing == "stale" else now + 3600)
    elif case.signing == "garbled":
        headers |= {k: v.encode().decode("latin-1") for k, v in extra.items()}
    return headers


def _fresh(case: Case) -> tuple[str, str | None]:
    """The body to send, with new ids where the case asks; and the invoice id it names."""
    if case.raw:
        return str(case.event), None
    event = copy.deepcopy(case.event)
    if isinstance(event, dict) and event.get("id") == FRESH:
        event["id"] = f"evt_{uuid.uuid4().hex}"
    invoice_id = None
    if case.expect in {"created", "deleted"}:
        invoice_id = event["data"]["object"]["id"] = f"in_{uuid.uuid4().hex}"
    return json.dumps(event), invoice_id


# What a delivery can change: the events recorded, the invoices deleted, the credit notes, the records.
SNAPSHOT = """
    SELECT (SELECT count(*) FROM stripe_events), (SELECT count(*) FROM deleted_invoices),
        (SELECT count(*) FROM credit_notes),
        (SELECT md5(coalesce(string_agg(i::text, ',' ORDER BY id), '')) FROM invoices AS i)"""


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_delivery_gets_the_one_answer_its_kind_calls_for(
    loop_and_store: tuple[asyncio.AbstractEventLoop, storage.Storage], kind: str
) -> None:
    loop, store = loop_and_store
    client = TestClient(TestServer(webhooks.init([WEBHOOK_SECRET], store=store)), loop=loop)
    loop.run_until_complete(client.start_server())

    async def snapshot() -> tuple[Any, ...]:
        async with store._connection() as conn:
            row = await conn.fetchrow(SNAPSHOT)
        assert row is not None
        return tuple(row)

    async def post(body: str, headers: dict[str, str]) -> tuple[int, Any]:
        reply = await client.post(webhooks.PATH, data=body.encode(), headers=headers)
        return reply.status, json.loads(await reply.read())

    @settings(SETTINGS, max_examples=25)
    @given(
        case=CASES[kind],
        extra=st.dictionaries(st.sampled_from(["Stripe-Signature", "Content-Type", "X-Request-Id"]), HEADER_TEXT),
    )
    def answers(case: Case, extra: dict[str, str]) -> None:
        body, invoice_id = _fresh(case)
        before = loop.run_until_complete(snapshot())
        status, answer = loop.run_until_complete(post(body, _headers(case, body, extra)))
        after = loop.run_until_complete(snapshot())
        if case.expect == "invalid":
            assert (status, answer["code"], answer["details"]) == (400, 3, []), answer
            assert answer["message"].startswith(f"{case.field}:"), answer
        else:
            assert (status, answer["received"], answer["outcome"]) == (200, True, case.expect), answer
            assert bool(answer.get("reason")) == (case.expect == "rejected"), answer
        if case.expect not in {"created", "deleted"}:
            assert after == before  # no row changed
            return
        assert invoice_id is not None and after != before
        if case.expect == "deleted":
            with pytest.raises(NotFound):
                loop.run_until_complete(store.get_invoice(invoice_id))
            return
        obj = case.event["data"]["object"]
        record = loop.run_until_complete(store.get_invoice(invoice_id))
        assert (record.amount, record.status, record.currency) == (obj["total"], obj["status"], obj["currency"])

    try:
        answers()
    finally:
        loop.run_until_complete(client.close())
