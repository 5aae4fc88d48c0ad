"""The second referee: the types of the pinned stripe SDK (16.1.0, API 2026-10-28.endive),
exact for the version the service speaks, where Stripe's published description that
`make install` extracts is older (2026-05-27.dahlia).

- requests: the SDK's `stripe.params` TypedDict of the operation (found by the path the
  SDK's service method requests), checked over the whole form: names at every depth,
  `Literal` enums, lists, maps, and leaves that are integers or booleans;
- answers: the SDK's resource classes (`stripe.Invoice` and their nested classes), by
  field name, for the differences the description finds (a field it does not know, or
  one it requires that the SDK no longer has, or an enum value it lacks).

The SDK is read, never called: nothing here talks to Stripe."""

from __future__ import annotations

import importlib
import re
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any, ForwardRef, Literal, NotRequired, Required, Union, get_args, get_origin

import stripe
from stripe._object_classes import OBJECT_CLASSES
from stripe._request_options import RequestOptions
from typing_extensions import is_typeddict

from tests.referee.forms import Tree
from tests.referee.openapi import Checker, Difference, join

API_VERSION = stripe.api_version
SDK = Path(stripe.__file__).parent
MISSING: Any = object()  # a field the SDK's types do not have
_OPTIONS = frozenset(RequestOptions.__annotations__)  # idempotency_key and the like: headers, not parameters
_SERVICE_CALL = re.compile(
    r'params:\s*(?:Optional\[)?"(?P<params>\w+)"\]?(?:\s*=\s*None)?,.*?_request(?:_async)?\(\s*"(?P<method>\w+)",\s*"(?P<path>/v1/[^"]*)"',
    re.S,
)


@cache
def params_types() -> dict[tuple[str, str], type]:
    """(METHOD, path template) -> the SDK's params TypedDict, from its service methods."""
    found: dict[tuple[str, str], type] = {}
    for source in sorted(SDK.glob("**/_*_service.py")):
        for chunk in re.split(r"\n    (?:async )?def ", source.read_text(encoding="utf-8"))[1:]:
            match = _SERVICE_CALL.search(chunk)
            if match and hasattr(stripe.params, match["params"]):
                found[(match["method"].upper(), match["path"])] = getattr(stripe.params, match["params"])
    return found


def _resolve(tp: Any, module: types.ModuleType) -> Any:
    """An annotation evaluated as typing would; a name the SDK imports only for type
    checkers (NameError) stands for anything."""
    text = tp if isinstance(tp, str) else tp.__forward_arg__ if isinstance(tp, ForwardRef) else None
    if text is None:
        return tp
    try:
        return eval(text, vars(module))  # noqa: S307 - the SDK's own annotations
    except NameError:
        return Any


def options(tp: Any, module: types.ModuleType) -> list[Any]:
    """The alternatives a (possibly forward, NotRequired or Optional) annotation allows."""
    tp = _resolve(tp, module)
    origin = get_origin(tp)
    if origin in (NotRequired, Required):
        return options(get_args(tp)[0], module)
    if origin is Union or isinstance(tp, types.UnionType):
        return [alt for arg in get_args(tp) for alt in options(arg, module)]
    return [tp]


def fields(cls: type) -> dict[str, Any]:
    """A TypedDict's or resource class's annotated fields, inherited ones included."""
    merged: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        merged |= getattr(base, "__annotations__", {})
    return merged if not is_typeddict(cls) else {k: v for k, v in merged.items() if k not in _OPTIONS}


def module_of(tp: Any) -> types.ModuleType:
    return sys.modules[getattr(tp, "__module__", "stripe")]


# -- requests ---------------------------------------------------------------------------


def check_request(method: str, template: str, params: dict[str, Tree]) -> list[Difference] | None:
    """The SDK's objections to these parameters, or None when it has no type for the operation."""
    typed = params_types().get((method, template))
    if typed is None:
        return None
    return check(typed, params, module_of(typed), f"{method} {template}", "")


def check(tp: Any, value: Tree, module: types.ModuleType, subject: str, at: str) -> list[Difference]:
    best: list[Difference] | None = None
    for alternative in options(tp, module):
        found = _check_one(alternative, value, module, subject, at)
        if not found:
            return []
        if best is None or len(found) < len(best):
            best = found
    return best or []


def _check_one(tp: Any, value: Tree, module: types.ModuleType, subject: str, at: str) -> list[Difference]:
    def wrong(expected: str) -> list[Difference]:
        return [Difference(subject, at, "type", f"the SDK expects {expected}, got {str(value)[:40]!r}")]

    if is_typeddict(tp):
        if not isinstance(value, dict):
            return wrong(tp.__name__)
        known, inner = fields(tp), module_of(tp)
        found = [Difference(subject, join(at, k), "unknown", "not in the SDK's types") for k in value if k not in known]
        for key, item in value.items():
            if key in known:
                found += check(known[key], item, inner, subject, join(at, key))
        return found
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return [] if value in [str(a) for a in args] else [Difference(subject, at, "enum", f"{value!r} not in {args}")]
    if origin is list:
        items = value if isinstance(value, list) else None
        if isinstance(value, dict) and all(k.isdigit() for k in value):
            items = [value[k] for k in sorted(value, key=int)]
        if items is None:
            return wrong("a list")
        return [d for item in items for d in check(args[0], item, module, subject, f"{at}[]")]
    if isinstance(origin, type) and issubclass(origin, dict):  # Dict[str, X], UntypedStripeObject[X]
        if not isinstance(value, dict):
            return wrong("a map")
        return [d for item in value.values() for d in check(args[-1], item, module, subject, join(at, "*"))]
    if tp is bool:
        return [] if value in ("true", "false") else wrong("true or false")
    if tp is int:
        return [] if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value) else wrong("an integer")
    if tp is str:
        return [] if isinstance(value, str) else wrong("a string")
    return []  # Decimal, float, Any: the description's check covers their form


# -- answers ----------------------------------------------------------------------------


@cache
def resource_class(object_type: str) -> type | None:
    found = OBJECT_CLASSES.get(object_type)
    return getattr(importlib.import_module(found[0]), found[1]) if found else None


def answer_root(checker: Checker, schema_name: str) -> type | None:
    """The SDK's class of the resource a description schema describes (`invoice`: Invoice)."""
    enum = checker.schemas.get(schema_name, {}).get("properties", {}).get("object", {}).get("enum") or [None]
    return resource_class(str(enum[0]))


def request_root(subject: str) -> type | None:
    """The SDK's params TypedDict of a request subject (`POST /v1/invoices`)."""
    method, _, template = subject.partition(" ")
    return params_types().get((method, template))


def types_at(root: type | None, at: str) -> tuple[bool, Any]:
    """(whether the SDK has the field's parent, the field's types or MISSING) for a field
    named as the description names it (`status_transitions.paid_at`, `lines[].amount`)."""
    if root is None:
        return False, MISSING
    current: list[Any] = [root]
    parts = [p for p in re.split(r"\.|(\[\])", at) if p]
    for depth, part in enumerate(parts):
        following: list[Any] = []
        for tp in current:
            for alternative in options(tp, module_of(root)):
                following += _step(alternative, part)
        if not following:
            return depth == len(parts) - 1, MISSING
        current = following
    return True, current


def _step(tp: Any, part: str) -> list[Any]:
    origin, args = get_origin(tp), get_args(tp)
    if part == "[]":
        return [args[0]] if origin is list and args else []
    if part == "*":
        return [args[-1]] if isinstance(origin, type) and issubclass(origin, dict) and args else []
    if isinstance(origin, type) and origin.__name__ == "ListObject" and part == "data":
        return [list[args[0]]]  # type: ignore[valid-type]
    if isinstance(tp, type) and part in fields(tp):
        return [fields(tp)[part]]
    if part.isdigit() and origin is list:
        return [args[0]]
    return []


def names_value(root: type, types_: Any, value: str) -> bool:
    """Whether a Literal among the field's types has this value. The SDK's enums, of
    answers and of parameters alike, are `Literal[...] | str` (open to values newer than
    itself): only the Literal says that the SDK's version knows the value."""
    for tp in types_ if isinstance(types_, list) else []:
        for alternative in options(tp, module_of(root)):
            if get_origin(alternative) is Literal and value in [str(a) for a in get_args(alternative)]:
                return True
    return False
