"""Pure rules, without I/O: the invoice state machine and request validation."""

from __future__ import annotations

import pytest

from service import validation
from service.domain import STATUSES, InvalidArgument, User, supersedes


@pytest.mark.parametrize(
    ("current", "new", "expected"),
    [
        ("draft", "open", True),
        ("draft", "paid", True),
        ("open", "paid", True),
        ("open", "void", True),
        ("open", "uncollectible", True),
        ("uncollectible", "paid", True),
        ("uncollectible", "void", True),
        ("open", "draft", False),
        ("paid", "open", False),
        ("paid", "void", False),
        ("void", "paid", False),
        ("uncollectible", "open", False),
    ],
)
def test_the_state_machine_never_moves_back(current: str, new: str, expected: bool) -> None:
    assert supersedes(current, new) is expected


def test_no_state_supersedes_itself() -> None:
    assert not any(supersedes(s, s) for s in STATUSES)


def test_create_validation_defaults_and_normalises() -> None:
    new = validation.new_invoice([("a", 1)], "cus_1", "pm_1", currency="EUR", user=("u", "Ada"))
    assert (new.currency, new.user) == ("eur", User("u", "Ada"))
    again = validation.new_invoice([("a", 1)], "cus_1", "pm_1", currency="eur", user=("u", "Ada"))
    assert new.fingerprint() == again.fingerprint()
    other = validation.new_invoice([("a", 2)], "cus_1", "pm_1", currency="eur", user=("u", "Ada"))
    assert new.fingerprint() != other.fingerprint()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"currency": "euro"}, "currency"),
        ({"currency": "e1r"}, "currency"),
        ({"currency": "eur", "user": ("", "Ada")}, "user._id"),
        ({"currency": "eur", "user": ("u", "x" * 201)}, "user.name"),
    ],
)
def test_create_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.new_invoice([("a", 1)], "cus_1", "pm_1", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize("key", ["", " ", "x" * 201, "ключ", "a b"])
def test_bad_idempotency_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidArgument):
        validation.idempotency_key(key)
    assert validation.idempotency_key("order-42:retry") == "order-42:retry"
