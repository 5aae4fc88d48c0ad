"""localstripe's store, indexed by object type, so that listing one type costs the objects
of that type, not every object the emulator ever made.

Stock lists scan the whole store (`StripeObject._api_list_all`), and an invoice's export
lists its charge's refunds three times (`Charge.refunds`, `amount_refunded`, `refunded`).
Measured on 2026-12-06: with 1,100 paid invoices and their events in the store,
`GET /v1/invoices?limit=100` took 0.75-0.93 s idle, 741 of its 770 py-spy samples in that
scan. Under the Stripe-fault Creates of `make chaos` (1 s Stripe timeout) the lists a
resuming Create makes then timed out, each abandoned one still ran, and the emulator's
queue grew until a retrieve took 13-17 s: five Creates never got an answer in 300 s.
Stripe's lists do not slow down with an account's history; the emulator's must not either.

The index lives on the store itself (global by localstripe's design, see stock.py) and
is kept by the store's own writes: set, delete, clear, and the update its pickle loads with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tools.localstripe.stock import UserError, resources

_INDEX = "_invoice_service_by_type"


def _type_of(key: str) -> str:
    """The object type a store key holds (`invoice:in_…`; the balance's key is `balance`)."""
    return key.split(":", 1)[0]


def _index(store: Any) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] | None = store.__dict__.get(_INDEX)
    if index is None:
        index = {}
        for key, value in dict.items(store):
            index.setdefault(_type_of(key), {})[key] = value
        store.__dict__[_INDEX] = index
    return index


def of_type(object_name: str) -> list[Any]:
    """Every stored object of this type (`credit_note`, `invoice_payment`, ...), oldest first."""
    return list(_index(resources.store).get(object_name, {}).values())


def _set_with(stock: Callable[..., None]) -> Callable[..., None]:
    def set_item(self: Any, key: str, value: Any) -> None:
        try:
            stock(self, key, value)  # the dict's write, then stock's save to its pickle
        finally:  # a save that failed leaves the write made
            _index(self).setdefault(_type_of(key), {})[key] = value

    return set_item


def _delete_with(stock: Callable[..., None]) -> Callable[..., None]:
    def delete_item(self: Any, key: str) -> None:
        try:
            stock(self, key)
        finally:
            if key not in self:  # deleted, even if the save after it failed
                _index(self).get(_type_of(key), {}).pop(key, None)

    return delete_item


def _clear(self: Any) -> None:
    dict.clear(self)
    self.__dict__.pop(_INDEX, None)


def _update(self: Any, *args: Any, **kwargs: Any) -> None:
    dict.update(self, *args, **kwargs)
    self.__dict__.pop(_INDEX, None)  # rebuilt from the contents on its next use


def _list_all(cls: Any, /, url: str, limit: Any = None, starting_after: Any = None, **kwargs: Any) -> Any:
    """Stock's base listing (every object of the class, in the order stored), by the index."""
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    page = resources.List(url, limit=limit, starting_after=starting_after)
    page._list = of_type(cls.object)
    return page


def patch() -> None:
    """Patches localstripe's Store and its base listing in place (see app.install)."""
    store = resources.Store
    store.__setitem__ = _set_with(store.__setitem__)
    store.__delitem__ = _delete_with(store.__delitem__)
    store.clear = _clear
    store.update = _update
    resources.StripeObject._api_list_all = classmethod(_list_all)
