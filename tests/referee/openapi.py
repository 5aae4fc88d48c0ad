"""Stripe's OpenAPI description (the JSON `make install` extracts, tools/stripe_spec.py)
as a checker: which operation a request is, whether its parameters are ones that
operation takes (names, types, enums, lengths, at every depth, form-encoded or in the
query), and whether an answer or an event object is what the response schemas describe.

It knows only what the OpenAPI subset Stripe uses needs: $ref, anyOf/oneOf, nullable,
object properties / required / additionalProperties, arrays, enums, maxLength, pattern.
Differences are named by where they are, relative to the Stripe resource they are in
(`invoice` `status_transitions.paid_at`), so that one finding stands for every answer
that carries the object: a create, a list page, an event's data.object."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tests.referee.forms import Tree

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / ".build" / "stripe-openapi.json"
FORM = "application/x-www-form-urlencoded"
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True, order=True)
class Difference:
    """One way a request or an answer is not what Stripe's description says."""

    subject: str  # "POST /v1/invoices/{invoice}/pay" (a request), "invoice" (a resource), "event"
    at: str  # where, inside the subject: "lines[].amount", "status_transitions.paid_at"
    problem: str  # unknown | missing | type | enum | length | pattern | operation | status | encoding
    detail: str = field(default="", compare=False)
    value: str = field(default="", compare=False)  # the value refused, for an enum

    def __str__(self) -> str:
        return f"{self.subject} {self.at or '(top)'}: {self.problem}" + (f" ({self.detail})" if self.detail else "")


def join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def load(path: Path = SPEC) -> dict[str, Any]:
    if not path.exists():
        raise RuntimeError(f"{path} is missing: `make install` downloads and extracts Stripe's OpenAPI description")
    spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return spec


class Checker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.schemas: dict[str, Any] = spec["components"]["schemas"]
        # Literal segments before parameters: /v1/invoices/search before /v1/invoices/{invoice}.
        templates = sorted(spec["paths"], key=lambda t: (t.count("{"), -len(t)))
        self._routes = [(re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", t) + "$"), t) for t in templates]

    @property
    def version(self) -> str:
        return str(self.spec["info"]["version"])

    @cached_property
    def resources(self) -> dict[str, str]:
        """Object type (`invoice`, `line_item`) -> the name of its schema."""
        found: dict[str, str] = {}
        for name, schema in self.schemas.items():
            enum = schema.get("properties", {}).get("object", {}).get("enum")
            deleted = "deleted" in schema.get("properties", {})  # deleted_invoice is an `invoice` too
            if "x-resourceId" in schema and enum and len(enum) == 1 and not deleted:
                found.setdefault(enum[0], name)
        return found

    @cached_property
    def event_types(self) -> frozenset[str]:
        """Every event type Stripe sends: the enum of a webhook endpoint's enabled_events."""
        body = self.spec["paths"]["/v1/webhook_endpoints"]["post"]["requestBody"]["content"][FORM]["schema"]
        return frozenset(body["properties"]["enabled_events"]["items"]["enum"]) - {"*"}

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        for pattern, template in self._routes:
            if pattern.match(path):
                op = self.spec["paths"][template].get(method.lower())
                return (template, op) if op is not None else None
        return None

    # -- requests -------------------------------------------------------------------------

    def request(
        self, method: str, template: str, query: dict[str, Tree], form: dict[str, Tree] | None
    ) -> list[Difference]:
        op = self.spec["paths"][template][method.lower()]
        subject = f"{method} {template}"
        found: list[Difference] = []
        params = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "query"}
        body = op.get("requestBody", {}).get("content", {}).get(FORM, {}).get("schema", {"type": "object"})
        if method == "GET":
            for name, value in query.items():
                if name in params:
                    found += self.check(params[name]["schema"], value, subject, name, form=True)
                else:
                    found.append(Difference(subject, name, "unknown", "not a parameter of this operation"))
            found += [
                Difference(subject, n, "missing") for n, p in params.items() if p.get("required") and n not in query
            ]
        else:
            found += self.check(body, {**query, **(form or {})}, subject, "", form=True)
        return found

    # -- answers and events ---------------------------------------------------------------

    def response(self, method: str, template: str, status: int, body: Any) -> list[Difference]:
        responses = self.spec["paths"][template][method.lower()]["responses"]
        subject = f"{method} {template} answer"
        described = responses.get(str(status)) or (responses.get("default") if status >= 400 else None)
        if described is None:
            return [Difference(subject, "", "status", f"{status} is not an answer this operation gives")]
        schema = described.get("content", {}).get("application/json", {}).get("schema")
        return [] if schema is None else self.check(schema, body, subject, "", form=False)

    def event(self, event: Any) -> list[Difference]:
        found = self.check({"$ref": "#/components/schemas/event"}, event, "event", "", form=False)
        if not isinstance(event, dict):
            return found
        if event.get("type") not in self.event_types:
            found.append(
                Difference(
                    "event", "type", "enum", f"{event.get('type')!r} is not an event type", str(event.get("type"))
                )
            )
        obj = (event.get("data") or {}).get("object")
        kind = obj.get("object") if isinstance(obj, dict) else None
        if kind not in self.resources:
            return [*found, Difference("event", "data.object.object", "enum", f"{kind!r} is not a Stripe object")]
        return found + self.check(
            {"$ref": f"#/components/schemas/{self.resources[kind]}"}, obj, "event", "", form=False
        )

    # -- the schema walk ------------------------------------------------------------------

    def deref(self, schema: dict[str, Any], subject: str, at: str) -> tuple[dict[str, Any], str, str]:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            schema = self.schemas[name]
            if "x-resourceId" in schema:  # named from its resource on, wherever it is nested
                subject, at = name, ""
        return schema, subject, at

    def check(self, schema: dict[str, Any], value: Any, subject: str, at: str, *, form: bool) -> list[Difference]:
        schema, subject, at = self.deref(schema, subject, at)
        if value is None and not form:
            return (
                []
                if self.nullable(schema)
                else [Difference(subject, at, "type", "null where the field is not nullable")]
            )
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives:
            return self.any_of(alternatives, value, subject, at, form=form)
        kind = schema.get("type")
        if kind is None:
            return []
        value, mismatch = self.typed(kind, value, form=form)
        if mismatch:
            return [Difference(subject, at, "type", f"expected {kind}, got {type(value).__name__} {str(value)[:40]!r}")]
        found: list[Difference] = []
        if "enum" in schema and value not in schema["enum"]:
            shown = f"{str(value)[:60]!r} is not one of {schema['enum'][:12]}"
            found.append(Difference(subject, at, "enum", shown, str(value)))
        if kind == "string":
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                found.append(Difference(subject, at, "length", f"{len(value)} > {schema['maxLength']}"))
            if "pattern" in schema and not re.search(schema["pattern"], value):
                found.append(Difference(subject, at, "pattern", f"{value[:60]!r} !~ {schema['pattern']}"))
        elif kind == "array":
            for item in value:
                found += self.check(schema.get("items", {}), item, subject, f"{at}[]", form=form)
        elif kind == "object":
            found += self.properties(schema, value, subject, at, form=form)
        return found

    def properties(
        self, schema: dict[str, Any], value: dict[str, Any], subject: str, at: str, *, form: bool
    ) -> list[Difference]:
        props: dict[str, Any] | None = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and extra is None:  # a free-form object (an event's data.object)
            return []
        found: list[Difference] = []
        for key, item in value.items():
            if props is not None and key in props:
                found += self.check(props[key], item, subject, join(at, key), form=form)
            elif isinstance(extra, dict):
                found += self.check(extra, item, subject, join(at, "*"), form=form)
            elif extra is not True:
                found.append(Difference(subject, join(at, key), "unknown"))
        found += [Difference(subject, join(at, k), "missing") for k in schema.get("required", ()) if k not in value]
        return found

    def any_of(
        self, alternatives: list[dict[str, Any]], value: Any, subject: str, at: str, *, form: bool
    ) -> list[Difference]:
        """Valid if one alternative is; else the differences from the closest of those of
        the value's type (an object is not judged against the id that could stand for it)."""
        best: list[Difference] | None = None
        kinds = []
        for alternative in alternatives:
            resolved = self.deref(alternative, subject, at)[0]
            kind = resolved.get("type")
            kinds.append(str(kind))
            if kind is not None and "anyOf" not in resolved and self.typed(kind, value, form=form)[1]:
                continue
            if not form and isinstance(value, dict) and not self.same_object(resolved, value):
                continue
            found = self.check(alternative, value, subject, at, form=form)
            if not found:
                return []
            if best is None or len(found) < len(best):
                best = found
        if best is None:
            shown = f"{type(value).__name__} {str(value)[:40]!r}"
            return [Difference(subject, at, "type", f"expected one of {sorted(set(kinds))}, got {shown}")]
        return best

    @staticmethod
    def same_object(schema: dict[str, Any], value: dict[str, Any]) -> bool:
        """Whether an object could be the one this schema describes, by what Stripe marks
        every object with: its `object` type, and `deleted` for a deleted one."""
        props = schema.get("properties", {})
        enum = props.get("object", {}).get("enum")
        if enum and "object" in value and value["object"] not in enum:
            return False
        return ("deleted" in props) == ("deleted" in value) if "object" in props else True

    def nullable(self, schema: dict[str, Any]) -> bool:
        if schema.get("nullable"):
            return True
        return any(self.nullable(self.deref(a, "", "")[0]) for a in schema.get("anyOf") or schema.get("oneOf") or ())

    @staticmethod
    def typed(kind: str, value: Any, *, form: bool) -> tuple[Any, bool]:
        """(the value as that type, whether it is not one). A form leaf is a string: an
        integer is digits, a boolean true/false, an array indexed keys or `[]`."""
        if not form:
            ok = isinstance(value, JSON_TYPES[kind]) and not (isinstance(value, bool) and kind in ("integer", "number"))
            return value, not ok
        if kind == "object":
            return value, not isinstance(value, dict)
        if kind == "array":
            if isinstance(value, dict) and all(k.isdigit() for k in value):
                return [value[k] for k in sorted(value, key=int)], False
            return value, not isinstance(value, list)
        if not isinstance(value, str):
            return value, True
        if kind == "integer":
            return (int(value), False) if _INTEGER.fullmatch(value) else (value, True)
        if kind == "number":
            try:
                return float(value), False
            except ValueError:
                return value, True
        if kind == "boolean":
            return (value == "true", False) if value in ("true", "false") else (value, True)
        return value, False
