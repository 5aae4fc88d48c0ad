"""Customers with Stripe's `balance` (negative is credit for the next invoices, positive is
owed): POST /v1/customers and /v1/customers/{id} take it, and customers show it. A balance
is in one currency: Stripe applies it only to invoices in that currency ("A CAD invoice
doesn't apply a customer credit balance denominated in USD or any other currency",
https://docs.stripe.com/invoicing/multiple-currencies; "Stripe only applies a balance in a
specific currency to an invoice ... in the same currency", Customer.invoice_credit_balance).
`balance` is the one in the customer's currency, which Stripe fixes with the customer's
first invoice; the emulator takes a balance set before then to be in that currency. The
balances in other currencies (what an invoice in another currency carries forward: an
amount under its minimum charge) are kept apart and applied to that currency's invoices.
A credit note's credit_amount (credit_notes.py) changes the balance in the invoice's
currency through adjust_balance, which records it as Stripe does: a customer balance
transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tools.localstripe.errors import as_int
from tools.localstripe.stock import resources


def _with_int_balance(data: dict[str, Any]) -> dict[str, Any]:
    """Customer `balance` is an integer in minor units (a form sends it as a string)."""
    if "balance" in data:
        data["balance"] = as_int(data["balance"], "balance")
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


def _currency_with(stock: Any) -> Any:
    def currency(self: Any) -> Any:
        """The currency the customer's first invoice fixed; before, stock's guess."""
        return self.__dict__.get("_currency") or stock.fget(self)

    return property(currency)


def _in_its_currency(customer: Any, currency: str) -> bool:
    fixed = customer.__dict__.get("_currency")
    return fixed is None or fixed == currency


def _other_balances(customer: Any) -> dict[str, int]:
    """The customer's balances in currencies other than its own (Stripe's sign)."""
    others: dict[str, int] = customer.__dict__.setdefault("_other_balances", {})
    return others


def balance_of(customer_id: str, currency: str) -> int:
    """The customer's Stripe balance in `currency`; 0 for one the store does not hold."""
    customer = resources.store.get(f"customer:{customer_id}")
    if customer is None:
        return 0
    if _in_its_currency(customer, currency):
        return int(customer.balance)
    return _other_balances(customer).get(currency, 0)


def settle_balance(customer_id: str, currency: str, balance: int) -> None:
    """The customer's balance in `currency` after an invoice in it was finalized; the
    customer's first invoice fixes its currency."""
    customer = resources.store.get(f"customer:{customer_id}")
    if customer is None:
        return
    if customer.__dict__.get("_currency") is None:
        customer._currency = currency
    if _in_its_currency(customer, currency):
        customer.balance = balance
    else:
        _other_balances(customer)[currency] = balance


def patch() -> None:
    """Patches localstripe's classes in place (see app.install)."""
    customer = resources.Customer
    customer.balance = property(_get_customer_balance, _set_customer_balance)
    customer.currency = _currency_with(customer.currency)
    customer._api_create = classmethod(_customer_create_with(customer._api_create))
    customer._api_update = classmethod(_customer_update_with(customer._api_update))


class CustomerBalanceTransaction(resources.StripeObject):  # type: ignore[misc]  # localstripe is untyped
    """Stripe's record of a change to a customer's balance; the emulator makes the ones
    credit notes make (type `credit_note`), so a credit note's customer_balance_transaction
    names a real object (expandable)."""

    object = "customer_balance_transaction"
    _id_prefix = "cbtxn_"

    def __init__(self, customer: str, currency: str, amount: int, ending_balance: int, credit_note: str) -> None:
        super().__init__()
        self.amount, self.currency, self.customer, self.ending_balance = amount, currency, customer, ending_balance
        self.credit_note, self.invoice, self.type = credit_note, None, "credit_note"
        self.checkout_session = self.customer_account = self.description = None
        self.metadata: dict[str, str] = {}


def adjust_balance(customer_id: str, currency: str, amount: int, credit_note: str) -> str:
    """Adds `amount` (negative is credit) to the customer's balance in `currency` on behalf
    of a credit note, as Stripe records it: the id of the customer balance transaction."""
    ending = balance_of(customer_id, currency) + amount
    settle_balance(customer_id, currency, ending)
    return str(CustomerBalanceTransaction(customer_id, currency, amount, ending, credit_note).id)
