"""Idempotency keys in the Stripe emulator (the tools/localstripe package) as Stripe
keeps them: a retried step replays its saved answer and makes nothing, a key reused with
other parameters is refused, a 500 before or after running, a refusal of a request that
ran and a crash are saved under their key while a validation error is not, and forgotten
keys (24 hours later) run a call anew. Also the /_config/ hooks these tests drive: faults
and the count of calls by route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import stripe

from tests import emulator_helpers as shared
from tests.emulator_helpers import (
    API_KEY,
    draft_params,
    draft_with_items,
    key,
    lines,
    replayed,
)
from tests.helpers import intents_of
from tools.customers import customer_with_card

# The shared fixtures (tests/emulator_helpers.py): this module gets an emulator of its own
# (module scope), so that no other module's webhooks reach its receivers.
emulator, client, config = shared.emulator, shared.client, shared.config


async def test_a_retried_step_replays_its_response_and_creates_nothing(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    create, item, finalize, pay = key("invoice"), key("item"), key("finalize"), key("pay")
    first = await client.v1.invoices.create_async(draft_params(customer, method), create)
    again = await client.v1.invoices.create_async(draft_params(customer, method), create)
    assert first.id is not None and again.id == first.id
    assert again.last_response is not None and again.last_response.headers.get("Idempotent-Replayed") == "true"

    params: Any = {"customer": customer, "invoice": first.id, "amount": 1234, "currency": "eur", "description": "x"}
    item_ids = {(await client.v1.invoice_items.create_async(params, item)).id for _ in range(3)}
    assert len(item_ids) == 1

    finalized = [await client.v1.invoices.finalize_invoice_async(first.id, {"auto_advance": False}, finalize)]
    finalized.append(await client.v1.invoices.finalize_invoice_async(first.id, {"auto_advance": False}, finalize))
    assert [f.status for f in finalized] == ["open", "open"]  # not "already finalized"

    paid = [await client.v1.invoices.pay_async(first.id, {"payment_method": method}, pay) for _ in range(2)]
    assert [p.status for p in paid] == ["paid", "paid"]  # not "already paid"
    assert len(await intents_of(client, first.id)) == 1  # one charge

    invoice = await client.v1.invoices.retrieve_async(first.id)
    assert (lines(invoice), invoice.total, invoice.attempt_count) == ([("x", 1234)], 1234, 1)
    listed = await client.v1.invoices.list_async({"customer": customer})
    assert [i.id for i in listed.data] == [first.id]


async def test_a_key_reused_with_other_parameters_is_an_idempotency_error(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    options = key("invoice")
    await client.v1.invoices.create_async(draft_params(customer, method), options)
    with pytest.raises(stripe.IdempotencyError) as other_params:
        await client.v1.invoices.create_async(draft_params(customer, method, currency="usd"), options)
    assert other_params.value.http_status == 400
    assert "same parameters" in str(other_params.value.user_message)
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.customers.create_async({"name": "Other"}, options)
    assert len((await client.v1.invoices.list_async({"customer": customer})).data) == 1


async def test_a_500_before_running_is_saved_under_its_key(
    client: stripe.StripeClient, config: httpx.AsyncClient
) -> None:
    customer, method = await customer_with_card(client)
    fault = {"path": "^/v1/invoices$", "method": "POST", "count": 1, "when": "before"}
    reply = await config.post("/faults", json=fault)
    assert (reply.status_code, reply.json()) == (200, {"faults": [fault]})
    options = key("invoice")
    with pytest.raises(stripe.APIError) as failed:
        await client.v1.invoices.create_async(draft_params(customer, method), options)
    body = failed.value.json_body
    assert failed.value.http_status == 500 and isinstance(body, dict) and body["error"]["type"] == "api_error"
    assert not replayed(failed.value)
    with pytest.raises(stripe.APIError) as again:  # the fault is used up: this is Stripe's replay
        await client.v1.invoices.create_async(draft_params(customer, method), options)
    assert replayed(again.value) and again.value.json_body == body
    assert (await client.v1.invoices.list_async({"customer": customer})).data == []

    created = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert [i.id for i in (await client.v1.invoices.list_async({"customer": customer})).data] == [created.id]


async def test_a_500_after_running_is_saved_and_forgetting_keys_runs_the_call_again(
    client: stripe.StripeClient, config: httpx.AsyncClient
) -> None:
    customer, method = await customer_with_card(client)
    invoice_id = await draft_with_items(client, customer, method)
    fault = {"path": r"^/v1/invoices/in_\w+/finalize$", "when": "after"}  # any method, once
    assert (await config.post("/faults", json=fault)).json() == {
        "faults": [{"path": fault["path"], "method": None, "count": 1, "when": "after"}]
    }
    options = key("finalize")
    for attempt in range(2):
        with pytest.raises(stripe.APIError) as failed:
            await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, options)
        assert failed.value.http_status == 500 and replayed(failed.value) == (attempt == 1)
    assert (await client.v1.invoices.retrieve_async(invoice_id)).status == "open"  # it did run

    forgotten = (await config.post("/idempotency/forget")).json()
    assert isinstance(forgotten["forgotten"], int) and forgotten["forgotten"] >= 1
    with pytest.raises(stripe.InvalidRequestError, match="already finalized"):  # runs anew
        await client.v1.invoices.finalize_invoice_async(invoice_id, {"auto_advance": False}, options)
    assert (await config.post("/idempotency/forget")).json() == {"forgotten": 1}  # that refusal: it ran, and is saved


async def test_validation_errors_are_not_saved_under_their_key(client: stripe.StripeClient) -> None:
    customer, method = await customer_with_card(client)
    options = key("invoice")
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.invoices.create_async(draft_params(customer, method, days_until_due=3), options)
    created = await client.v1.invoices.create_async(draft_params(customer, method), options)
    assert created.status == "draft"
    assert created.last_response is not None and created.last_response.headers.get("Idempotent-Replayed") is None


async def test_a_refusal_of_a_request_that_ran_is_saved_and_replayed(client: stripe.StripeClient) -> None:
    """Stripe saves the answer of every request whose execution began, its refusals too:
    once the cause is fixed, the same key still answers the refusal, for 24 hours."""
    customer, _ = await customer_with_card(client)
    card: Any = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    loose = await client.v1.payment_methods.create_async({"type": "card", "card": card})  # not attached
    assert loose.id is not None
    options, params = key("invoice"), draft_params(customer, loose.id)
    for attempt in range(2):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await client.v1.invoices.create_async(params, options)
        assert (refused.value.param, replayed(refused.value)) == ("default_payment_method", attempt == 1)
    await client.v1.payment_methods.attach_async(loose.id, {"customer": customer})
    with pytest.raises(stripe.InvalidRequestError) as stale:
        await client.v1.invoices.create_async(params, options)
    assert replayed(stale.value)
    with pytest.raises(stripe.InvalidRequestError) as missing:  # a missing object: it ran, and is saved
        await client.v1.invoices.pay_async("in_doesnotexist", {}, options := key("pay"))
    assert missing.value.http_status == 404 and not replayed(missing.value)
    with pytest.raises(stripe.InvalidRequestError) as again:
        await client.v1.invoices.pay_async("in_doesnotexist", {}, options)
    assert replayed(again.value)
    assert (await client.v1.invoices.list_async({"customer": customer})).data == []
    assert (await client.v1.invoices.create_async(params, key("invoice"))).status == "draft"


async def test_faults_are_cleared_and_checked(client: stripe.StripeClient, config: httpx.AsyncClient) -> None:
    bad_faults: list[Any] = [{"path": "("}, {"path": "^/v1/", "when": "during"}, {"path": "^/v1/", "count": 0}, []]
    for bad in bad_faults:
        reply = await config.post("/faults", json=bad)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    await config.post("/faults", json={"path": "^/v1/customers$", "count": 5})
    assert (await config.delete("/faults")).json() == {"cleared": 1}
    assert (await client.v1.customers.create_async({"name": "No fault"})).id


async def test_calls_are_counted_by_route(
    client: stripe.StripeClient, config: httpx.AsyncClient, emulator: str
) -> None:
    customer, method = await customer_with_card(client)
    assert (await config.delete("/calls")).json() == {"calls": {}}
    draft = await client.v1.invoices.create_async(draft_params(customer, method), key("invoice"))
    assert draft.id is not None
    await client.v1.invoices.add_lines_async(draft.id, {"lines": [{"amount": 100}]}, key("add_lines"))
    finalize = key("finalize")
    for _ in range(2):  # the second is a replay
        await client.v1.invoices.finalize_invoice_async(draft.id, {"auto_advance": False}, finalize)
    await client.v1.invoices.retrieve_async(draft.id)
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.invoices.retrieve_async("in_doesnotexist")
    async with httpx.AsyncClient() as http:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        assert (await http.get(f"{emulator}/v1/nothing_here/cus_123", headers=headers)).status_code == 404
    assert (await config.get("/calls")).json() == {
        "calls": {
            "GET /v1/invoices/{id}": 2,
            "GET /v1/nothing_here/{id}": 1,
            "POST /v1/invoices": 1,
            "POST /v1/invoices/{id}/add_lines": 1,
            "POST /v1/invoices/{id}/finalize": 2,
        }
    }
    await config.delete("/calls")
    assert (await config.get("/calls")).json() == {"calls": {}}


async def test_a_crash_is_stripes_500_and_saved_under_its_key(client: stripe.StripeClient, emulator: str) -> None:
    customer, _ = await customer_with_card(client)
    # Stock localstripe crashes on this (AttributeError): the emulator answers as Stripe
    # does when it fails internally, and replays that answer for the key.
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": key("crash")["idempotency_key"] or ""}
    async with httpx.AsyncClient() as http:
        answers = [
            await http.post(f"{emulator}/v1/customers/{customer}", data={"invoice_settings": "x"}, headers=headers)
            for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [500, 500]
    assert answers[0].json()["error"]["type"] == "api_error"
    assert [a.headers.get("Idempotent-Replayed") for a in answers] == [None, "true"]
