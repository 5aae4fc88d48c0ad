"""Reading Stripe's invoice object (service/stripe_objects.py), without I/O: who the invoice
belongs to, and what is not an invoice."""

from __future__ import annotations

import pytest

from service.domain import InvalidArgument, User
from service.stripe_objects import USER_ID, USER_NAME, invoice_from_stripe


def test_the_owner_is_the_named_user_or_else_the_customer() -> None:
    base = {"id": "in_1", "status": "paid", "total": 3300, "customer": "cus_1", "customer_name": "John Doe"}
    named = invoice_from_stripe({**base, "metadata": {USER_ID: "u1", USER_NAME: "Ada"}})
    assert named.user == User("u1", "Ada")
    assert invoice_from_stripe({**base, "metadata": {}}).user == User("cus_1", "John Doe")
    assert invoice_from_stripe({**base, "customer_name": None}).user == User("cus_1", "")
    assert invoice_from_stripe(base).invoice_pdf == ""


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"id": "in_1"},
        {"id": "ch_1", "status": "paid", "customer": "c"},
        {"id": "in_1", "status": "x", "customer": "c"},
    ],
)
def test_a_malformed_invoice_object_is_invalid(broken: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        invoice_from_stripe(broken)
