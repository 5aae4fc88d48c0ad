"""Nothing Stripe or anyone else sends the webhook sidecar ends in a 5xx while Postgres is
up: every Stripe-shaped invoice is recordable (a property over generated objects, applied
to the real store), and a fuzzer over the endpoint (headers and bodies, signed and not,
valid and broken Stripe shapes) only ever gets a 2xx or a 4xx with a JSON body."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import storage, webhooks
from service.domain import STATUSES, Outcome
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


def _json(value: Any) -> Any:
    return st.one_of(
        st.just(value),
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        ANY_TEXT,
        st.lists(st.integers(), max_size=2),
        st.dictionaries(ANY_TEXT, st.integers(), max_size=2),
    )


def events() -> st.SearchStrategy[Any]:
    """Events valid and broken: any type, any `created`, any data, Stripe-shaped invoices
    with fields replaced by anything JSON can hold."""
    # Times Stripe never sends among them: before 1970, past year 9999, past any integer type.
    broken_invoice = stripe_invoices(st.integers(-(2**70), 2**70)).flatmap(
        lambda obj: st.fixed_dictionaries({k: _json(v) for k, v in obj.items()})
    )
    return st.fixed_dictionaries(
        {
            "id": st.one_of(IDS.map(lambda s: f"evt_{s}"), _json("evt_x"), st.just("evt_" + "a" * 20_000)),
            "type": st.one_of(st.sampled_from(sorted(webhooks.INVOICE_EVENTS)), _json("invoice.paid")),
            "created": _json(1_700_000_000),
            "data": st.one_of(
                st.fixed_dictionaries({"object": st.one_of(stripe_invoices(), broken_invoice)}),
                _json({}),
            ),
        },
        optional={"livemode": _json(False), "object": st.just("event")},
    )


def test_the_webhook_answers_2xx_or_4xx_json_never_5xx(
    loop_and_store: tuple[asyncio.AbstractEventLoop, storage.Storage],
) -> None:
    loop, store = loop_and_store
    client = TestClient(TestServer(webhooks.init([WEBHOOK_SECRET], store=store)), loop=loop)
    loop.run_until_complete(client.start_server())

    async def post(body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        reply = await client.post(webhooks.PATH, data=body, headers=headers)
        return reply.status, json.loads(await reply.read())

    @SETTINGS
    @given(
        event=st.one_of(events(), _json({})),
        signed=st.sampled_from(["signed", "unsigned", "garbled", "other secret"]),
        extra=st.dictionaries(st.sampled_from(["Stripe-Signature", "Content-Type", "X-Request-Id"]), HEADER_TEXT),
    )
    def answers(event: Any, signed: str, extra: dict[str, str]) -> None:
        body = json.dumps(event)
        headers = {"Content-Type": "application/json"}
        if signed == "signed":
            headers["Stripe-Signature"] = sign(body)
        elif signed == "other secret":
            headers["Stripe-Signature"] = sign(body, "whsec_other")
        elif signed == "garbled":
            headers |= {k: v.encode().decode("latin-1") for k, v in extra.items()}
        status, answer = loop.run_until_complete(post(body.encode("utf-8", "surrogatepass"), headers))
        assert status < 500, (status, answer)
        assert isinstance(answer, dict)

    try:
        answers()
    finally:
        loop.run_until_complete(client.close())
