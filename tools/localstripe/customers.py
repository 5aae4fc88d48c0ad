"""Customers with Stripe's `balance` (negative is credit for the next invoices, positive is
owed): POST /v1/customers and /v1/customers/{id} take it, and customers show it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tools.localstripe.errors import bad_request
from tools.localstripe.stock import resources


def _with_int_balance(data: dict[str, Any]) -> dict[str, Any]:
    """Customer `balance` is an integer in minor units (a form sends it as a string)."""
    if "balance" in data:
        value = resources.try_convert_to_int(data["balance"])
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_request(f"Invalid integer: {data['balance']}", param="balance", code="parameter_invalid_integer")
        data["balance"] = value
    return data


def _customer_create_with(stock_create: Callable[..., Any]) -> Callable[..., Any]:
    def create(cls: Any, /, **data: Any) -> Any:
        """POST /v1/customers, with Stripe's message for a bad `balance` (stock: "Bad request")."""
        return stock_create(**_with_int_balance(data))

    return create


def _customer_update_with(stock_update: Callable[..., Any]) -> Callable[..., Any]:
    def update(cls: Any, /, id: str, **data: Any) -> Any:
        """POST /v1/customers/{id}: stock refuses `balance`, a field it has no attribute for."""
        return stock_update(id, **_with_int_balance(data))

    return update


def _get_customer_balance(self: Any) -> int:
    """Stripe's `balance`: negative is credit for the next invoices, positive is owed.
    Stock keeps it, inverted, as account_balance (what old pickled stores hold)."""
    return -int(self.account_balance)


def _set_customer_balance(self: Any, value: int) -> None:
    self.account_balance = -int(value)


def balance_of(customer_id: str) -> int:
    """The customer's Stripe balance; 0 for one the store does not hold."""
    customer = resources.store.get(f"customer:{customer_id}")
    return 0 if customer is None else int(customer.balance)


def patch() -> None:
    """Patches localstripe's classes in place (see app.install)."""
    customer = resources.Customer
    customer.balance = property(_get_customer_balance, _set_customer_balance)
    customer._api_create = classmethod(_customer_create_with(customer._api_create))
    customer._api_update = classmethod(_customer_update_with(customer._api_update))
