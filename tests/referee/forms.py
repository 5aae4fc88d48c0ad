"""Stripe's form encoding, read back: `lines[0][amount]=3300&expand[]=lines` (the spec's
`style: deepObject, explode: true`) into the tree the SDK built it from, with every leaf
still a string ({"lines": {"0": {"amount": "3300"}}, "expand": ["lines"]}): which leaf is
an integer, a boolean or a list index is for the schema to say."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

Tree = dict[str, "Tree"] | list["Tree"] | str

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class FormError(ValueError):
    """A key that is not bracket notation, or one name used both as a leaf and a node."""


def keys_of(name: str) -> list[str]:
    """`lines[0][amount]` -> ["lines", "0", "amount"]; `expand[]` -> ["expand", ""]."""
    match = _KEY.match(name)
    if match is None:
        raise FormError(f"{name!r} is not bracket notation")
    return [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]


def decode(encoded: str) -> dict[str, Tree]:
    root: dict[str, Tree] = {}
    for name, value in parse_qsl(encoded, keep_blank_values=True, strict_parsing=False):
        *parents, last = keys_of(name)
        node: dict[str, Tree] | list[Tree] = root
        for depth, key in enumerate(parents):
            following = [*parents, last][depth + 1]
            child: Tree = [] if following == "" else {}
            node = _step(node, key, child, name)
        if isinstance(node, list):
            node.append(value)
        elif last == "" or last in node:
            raise FormError(f"{name!r} is given twice or mixes a list with a value")
        else:
            node[last] = value
    return root


def _step(node: dict[str, Tree] | list[Tree], key: str, child: Tree, name: str) -> dict[str, Tree] | list[Tree]:
    if isinstance(node, list):
        raise FormError(f"{name!r}: `[]` must be the last bracket")
    existing = node.setdefault(key, child)
    if isinstance(existing, str) or type(existing) is not type(child):
        raise FormError(f"{name!r} is both a value and a nested parameter")
    return existing
