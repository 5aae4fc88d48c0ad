"""ADMIN_API_KEYS' syntax (service/auth.py): named keys with scopes, bare keys as before,
and a configuration that cannot be meant refused at start with the entry's place, never
its key."""

from __future__ import annotations

import pytest

from service.auth import ApiKeys, Caller, parse_keys
from service.config import Settings


def test_named_keys_have_their_scope_and_bare_keys_mean_write() -> None:
    keys = parse_keys(["console:write:k-one", "provisioner:read:k:with:colons", "k-bare"])
    assert keys == [
        (Caller("console", "write"), "k-one"),
        (Caller("provisioner", "read"), "k:with:colons"),
        (Caller("key3", "write"), "k-bare"),
    ]


def test_a_read_caller_may_only_list_get_and_watch() -> None:
    reader, writer = Caller("r", "read"), Caller("w", "write")
    assert [
        m for m in ("ListInvoices", "GetInvoice", "WatchInvoices", "ListInvoiceCreditNotes") if not reader.may_call(m)
    ] == []
    assert [
        m
        for m in (
            "CreateInvoice",
            "PayInvoice",
            "VoidInvoice",
            "MarkUncollectible",
            "RefundInvoice",
            "ListInvoiceAudit",
        )
        if reader.may_call(m)
    ] == []
    assert writer.may_call("VoidInvoice") and writer.may_call("SomeMethodAddedLater")
    assert not reader.may_call("SomeMethodAddedLater")


def test_the_offered_key_names_its_caller() -> None:
    keys = ApiKeys(["console:write:k-one", "provisioner:read:k-two"])
    assert keys.identify("k-two") == Caller("provisioner", "read")
    assert keys.identify(b"k-one") == Caller("console", "write")
    assert keys.identify("k-thr") is None
    assert keys.identify(None) is None
    assert keys.identify("") is None


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ("console:admin:secret-value", "entry 1: the scope must be one of read, write"),
        ("a:read:secret-value,:write:secret-value", "entry 2: expected name:scope:key"),
        ("a:read:secret-value,a:write:other-secret", "every key needs a name of its own"),
        ("secret-value,key1:read:other-secret", "every key needs a name of its own"),
    ],
)
def test_a_key_list_that_cannot_be_meant_is_refused_without_its_keys(entries: str, error: str) -> None:
    settings = Settings(admin_api_keys=entries)  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as info:
        settings.require("serve")
    assert error in str(info.value)
    assert "secret-value" not in str(info.value) and "other-secret" not in str(info.value)
