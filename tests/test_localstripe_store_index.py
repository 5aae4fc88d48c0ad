"""The emulator's store index (tools/localstripe/store_index.py), in process: every
listing by the index holds what stock's scan of the whole store holds, in its order,
through the writes the store sees (objects made, a draft deleted, a key set again, the
store cleared and loaded as its pickle is)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tools.localstripe import app, store_index
from tools.localstripe.stock import resources

TYPES = ("customer", "invoiceitem", "invoice", "credit_note")


def scanned(object_name: str) -> list[Any]:
    """Stock's listing: a scan of every key of the store."""
    return [v for k, v in dict.items(resources.store) if k.startswith(object_name + ":")]


def listed(cls: Any) -> list[Any]:
    return list(cls._api_list_all("/v1/x", limit=100)._list)


@pytest.fixture
def store() -> Iterator[Any]:
    app.install()
    app.use_store(from_scratch=True)  # no pickle written
    saved = dict(resources.store)
    resources.store.clear()
    yield resources.store
    resources.store.clear()
    resources.store.update(saved)


def agree(store: Any) -> None:
    for name in TYPES:
        assert store_index.of_type(name) == scanned(name), name
    assert store_index.of_type("balance") == [v for k, v in dict.items(store) if k == "balance"]
    assert listed(resources.Customer) == scanned("customer")  # stock's base listing, by the index


def test_the_index_lists_what_a_scan_finds_through_every_write(store: Any) -> None:
    # Plain objects under the store's keys: the index knows keys, and real objects would
    # schedule webhooks outside the emulator's event loop.
    customers = [SimpleNamespace(id=f"cus_{n}") for n in range(3)]
    items = [SimpleNamespace(id=f"ii_{n}") for n in range(3)]
    for obj in customers:
        store[f"customer:{obj.id}"] = obj
    for obj in items:
        store[f"invoiceitem:{obj.id}"] = obj
    store["balance"] = SimpleNamespace(id="balance")
    agree(store)
    assert listed(resources.Customer) == customers

    del store["customer:cus_1"]  # as _api_delete does
    store["invoiceitem:ii_0"] = items[0]  # set again: keeps its place, as a dict does
    agree(store)
    assert store_index.of_type("customer") == [customers[0], customers[2]]
    assert store_index.of_type("balance") == [store["balance"]]

    store.update({"customer:cus_9": SimpleNamespace(id="cus_9")})  # onto an index in use
    agree(store)

    snapshot = dict(store)
    store.clear()
    assert store_index.of_type("customer") == []
    store.update(snapshot)  # how stock loads its pickle
    agree(store)
    assert store_index.of_type("invoiceitem") == items


def test_a_write_whose_save_fails_is_still_listed(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def unwritable(self: Any) -> None:
        raise OSError("localstripe.pickle: read-only file system")

    monkeypatch.setattr(resources.Store, "dump_to_disk", unwritable)
    with pytest.raises(OSError):
        store["customer:cus_1"] = SimpleNamespace(id="cus_1")
    agree(store)
    with pytest.raises(OSError):
        del store["customer:cus_1"]
    agree(store)
