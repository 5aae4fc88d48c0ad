"""Payment methods and their charges as Stripe has them: attaching one of Stripe's
declining test cards (4000000000000002, ...) is a card_error naming the decline, such a
card also declines when charged directly, and a declined charge carries the card's own
code and decline_code (4000000000000341 attaches, then declines every charge)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tools.localstripe.errors import Decline, bad_request, card_error, decline_for, invalid_param
from tools.localstripe.stock import UserError, resources


def payment_method_of(customer_id: str, pm_id: Any, param: str) -> Any:
    """The payment method, which Stripe requires to be attached to the invoice's customer."""
    if not isinstance(pm_id, str) or not pm_id.startswith(("pm_", "card_", "src_")):
        raise invalid_param(f"Invalid payment method id: {pm_id!r}", param=param)
    method = resources.PaymentMethod._api_retrieve(pm_id)
    if getattr(method, "customer", None) != customer_id:
        raise bad_request(
            f"The customer does not have a payment method with the ID {pm_id}. "
            "The payment method must be attached to the customer.",
            param=param,
        )
    return method


def attach_with(stock_attach: Callable[..., Any]) -> Callable[..., Any]:
    """POST /v1/payment_methods/{id}/attach, wrapping localstripe's own."""

    def attach(id: str, **params: Any) -> Any:
        """Stock declines attaching Stripe's declining test cards (as Stripe does) with an
        invalid_request_error; Stripe answers a card_error naming the decline."""
        try:
            return stock_attach(id, **params)
        except UserError as exc:
            if exc.code != 402:
                raise
            raise card_error(decline_for(resources.PaymentMethod._api_retrieve(id))) from exc

    return attach


def _charging_is_declined_with(stock: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def charging_is_declined(self: Any) -> bool:
        """Cards Stripe refuses to attach (4000000000000002, ...) also decline when charged directly."""
        return bool(stock(self) or self._attaching_is_declined())

    return charging_is_declined


def _set_auth_failure(self: Any) -> None:
    """Charge._set_auth_failure with the card's own Stripe code and decline_code."""
    decline = decline_for(resources.PaymentMethod._api_retrieve(self.payment_method))
    self.status = "failed"
    self.failure_code = decline.code
    self.failure_message = decline.message
    self._decline_code = decline.decline_code  # private: a plain str, so the pickled store stays loadable


def _raise_failure(self: Any) -> None:
    decline = Decline(self.failure_code, getattr(self, "_decline_code", None), self.failure_message)
    raise card_error(decline, charge=self.id)


def patch() -> None:
    """Patches localstripe's classes in place (see app.install)."""
    r = resources
    r.PaymentMethod._charging_is_declined = _charging_is_declined_with(r.PaymentMethod._charging_is_declined)
    r.Charge._set_auth_failure = _set_auth_failure
    r.Charge._raise_failure = _raise_failure
