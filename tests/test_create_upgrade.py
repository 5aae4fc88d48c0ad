"""Creates across an upgrade of the service: the stored fingerprint's encoding is pinned,
a key stored under the fingerprint of before still answers, and a row the service of
before left (or an old replica claims during the rollout) resumes the invoice it made,
found by its content, never one that another key names."""

from __future__ import annotations

import hashlib
from typing import Any

import stripe

from service import validation
from service.domain import (
    NewInvoice,
)
from service.payments import StripePayments
from service.storage import Storage
from tests.create_helpers import Payments, creator, request, stripe_invoices
from tools.customers import customer_with_card


def test_the_fingerprint_is_a_pinned_canonical_encoding() -> None:
    """Stored fingerprints must survive a deploy: this value may never change (a new field
    enters under a new FINGERPRINT_VERSION)."""
    new = validation.new_invoice(
        [("All resources", 3300), ("Support", 700)], "cus_A", "pm_B", currency="eur", user=("u-1", "Ada")
    )
    canonical = (
        '["create",{"currency":"eur","customer":"cus_A","items":[["All resources",3300],["Support",700]],'
        '"payment_method":"pm_B","user":["u-1","Ada"]}]'
    )
    pinned = "v1:7b3a35465953cdeb610570295b9633d2c64ea06356640a8f927235d80c9d3494"
    assert new.fingerprint() == "v1:" + hashlib.sha256(canonical.encode()).hexdigest() == pinned


async def test_a_key_stored_before_the_canonical_fingerprint_still_answers(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    first = await creator(store, Payments(stripe_client)).create(new, "legacy")
    await pool.execute(
        "UPDATE create_requests SET fingerprint = $2 WHERE idempotency_key = $1", "legacy", new.legacy_fingerprint()
    )
    again = Payments(stripe_client)
    assert await creator(store, again).create(new, "legacy") == first
    assert again.calls == []


async def test_a_create_cut_off_before_the_upgrade_resumes_the_invoice_it_made(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    """What the service before progress records left behind when killed between paying and
    storing the answer: a row without an answer, a paid invoice without the key in its
    metadata. The retry must find that invoice, not bill again."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await pool.execute(
        "INSERT INTO create_requests (idempotency_key, fingerprint, step) VALUES ($1, $2, 'legacy')",
        "before-upgrade",
        new.legacy_fingerprint(),
    )
    made = await old_service_create(stripe_client, new, "before-upgrade")
    # Another order of the customer's, finalized, for another sum: not taken for this one.
    other = await old_service_create(stripe_client, request(customer, method, [999]), "other", pay=False)

    again = Payments(stripe_client)
    answer = await creator(store, again).create(new, "before-upgrade")
    assert (answer["id"], answer["status"]) == (made, "paid")
    assert "invoices.create" not in again.calls
    assert {i.id for i in await stripe_invoices(stripe_client, customer)} == {made, other}


async def old_service_create(client: stripe.StripeClient, new: NewInvoice, label: str, *, pay: bool = True) -> str:
    """An invoice as the service before progress records made it: no key in its metadata."""
    old = StripePayments(client)
    draft = await client.v1.invoices.create_async(
        {
            "customer": new.customer,
            "currency": new.currency,
            "auto_advance": False,
            "default_payment_method": new.payment_method,
            "pending_invoice_items_behavior": "exclude",
        }
    )
    assert draft.id is not None
    await old.add_lines(draft.id, new.items, f"{label}-lines")
    await old.finalize(draft.id, f"{label}-finalize")
    if pay:
        await old.pay(draft.id, new.payment_method, f"{label}-pay")
    return draft.id


async def test_a_row_an_old_replica_claims_during_the_rollout_is_legacy(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    """An old replica still serving after the migration claims keys with its own INSERT:
    the column default makes such a row legacy, so a new replica's retry looks for the
    old replica's invoice by content instead of billing again."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    await pool.execute(
        "INSERT INTO create_requests (idempotency_key, fingerprint) VALUES ($1, $2)",
        "old-replica",
        new.legacy_fingerprint(),
    )
    made = await old_service_create(stripe_client, new, "old-replica")
    answer = await creator(store, Payments(stripe_client)).create(new, "old-replica")
    assert answer["id"] == made
    assert [i.id for i in await stripe_invoices(stripe_client, customer)] == [made]


async def test_a_legacy_create_never_takes_an_invoice_another_key_names(
    store: Storage, stripe_client: stripe.StripeClient, pool: Any
) -> None:
    """The customer ordered the same thing twice before the upgrade: the other key's
    invoice (finished, named by its row) is not this key's, however alike."""
    customer, method = await customer_with_card(stripe_client)
    new = request(customer, method)
    other = await old_service_create(stripe_client, new, "other-order")
    await pool.execute(
        "INSERT INTO create_requests (idempotency_key, fingerprint, stripe_invoice_id, response, step)"
        " VALUES ($1, $2, $3, '{}', 'done'), ($4, $2, NULL, NULL, 'legacy')",
        "other-order",
        new.legacy_fingerprint(),
        other,
        "this-order",
    )
    answer = await creator(store, Payments(stripe_client)).create(new, "this-order")
    assert answer["id"] != other
    assert answer["status"] == "paid"
    assert len(await stripe_invoices(stripe_client, customer)) == 2
