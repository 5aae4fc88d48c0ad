"""docs/configuration.md, written from service/config.py's Settings: every environment
variable with its default, what it accepts and its docstring, in the order the settings are
declared. The settings are the one place this is written; `make generate` writes the file
(tools/generate.py), and `make check-generated` and tests/test_configdoc.py fail when it is stale."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"

HEADER = """# Configuration

Every setting is an environment variable, read once at start by `service/config.py` (names are
case-insensitive). The server (`python -m service serve`), the webhook sidecar (`webhooks`),
`migrate`, `reconcile` and the gateway's renderer read the same variables; a command stops at
start, saying why, when a setting it needs is missing or two settings disagree.

This file is generated from the settings' docstrings by `make generate` (`tools/configdoc.py`):
edit `service/config.py`, not this file. `make test` fails when the two differ.

| variable | default | accepts | meaning |
|---|---|---|---|
"""


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _kind(annotation: Any) -> str:
    """What a value of the field's type looks like, in words."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return _kind(args[0]) if len(args) == 1 else " or ".join(_kind(a) for a in args)
    if origin is tuple:
        return "comma-separated list"
    if annotation is SecretStr:
        return "secret text"
    return {bool: "`true` or `false`", int: "integer", float: "number", str: "text"}[annotation]


def _bounds(field: FieldInfo) -> str:
    found = []
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            found.append(f"≥ {rule.ge}")
        elif isinstance(rule, annotated_types.Gt):
            found.append(f"> {rule.gt}")
        elif isinstance(rule, annotated_types.Le):
            found.append(f"≤ {rule.le}")
        elif isinstance(rule, annotated_types.Lt):
            found.append(f"< {rule.lt}")
        elif getattr(rule, "pattern", None):
            found.append(f"matching `{rule.pattern}`")
    return ", ".join(found)


def _row(name: str, field: FieldInfo) -> str:
    if not field.description:
        raise SystemExit(f"Settings.{name} has no docstring: say what it does (service/config.py)")
    accepts = ", ".join(part for part in (_kind(field.annotation), _bounds(field)) if part)
    meaning = " ".join(field.description.split()).replace("|", "\\|")
    return f"| `{name.upper()}` | {_default(field)} | {accepts} | {meaning} |"


def document(settings: type[BaseSettings] = Settings) -> str:
    """The whole of docs/configuration.md."""
    return HEADER + "\n".join(_row(name, field) for name, field in settings.model_fields.items()) + "\n"
