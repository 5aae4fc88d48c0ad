"""Judges recorded exchanges with the emulator (tools/localstripe/recorder.py) against
Stripe's published description (openapi) and the pinned SDK's types (sdk):

- each request: an operation Stripe has, form-encoded, parameters it takes;
- each answer: the response schema of its operation and status (errors: Stripe's `error`);
- each event scheduled for the webhooks: the `event` schema, an event type Stripe sends,
  and its data.object the schema of its object type.

A difference the description finds but the SDK's version names (a field, parameter or
enum value newer than the description) is a version gap, counted but accepted; one the
allowlist names is accepted with its reason; the rest fail. A request the description
refuses that the emulator refused too (4xx) is Stripe's behaviour, not a difference,
unless `strict` (the service's own requests must all be valid)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.referee import allowlist, sdk
from tests.referee.forms import FormError, decode
from tests.referee.openapi import FORM, Checker, Difference, load

_ID = re.compile(r"(?<=/)[a-z]+_[A-Za-z0-9]+")


@dataclass
class Verdict:
    """Differences by (subject, at, problem), each with the first record that showed it."""

    failing: dict[tuple[str, str, str], tuple[Difference, str]] = field(default_factory=dict)
    allowed: Counter[str] = field(default_factory=Counter)
    gaps: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    judged: Counter[str] = field(default_factory=Counter)

    def report(self) -> str:
        lines = [f"Stripe referee ({', '.join(f'{n} {k}s' for k, n in sorted(self.judged.items()))}):"]
        lines += [f"  {d}\n      e.g. {example}" for d, example in sorted(self.failing.values())]
        lines.append(
            f"  {len(self.failing)} differences, {sum(self.allowed.values())} allowed, "
            f"{len(self.gaps)} version gaps, {sum(self.refused.values())} invalid requests refused"
        )
        return "\n".join(lines)


class Referee:
    def __init__(self, checker: Checker | None = None) -> None:
        self.checker = checker or Checker(load())
        self.gaps: set[Difference] = set()  # of the last judge(): explained by the SDK's newer version

    # -- one record -------------------------------------------------------------------

    def request(self, record: dict[str, Any]) -> list[Difference]:
        method, path = record["method"], record["path"]
        found = self.checker.operation(method, path)
        if found is None:
            return [Difference(f"{method} {_ID.sub('{id}', path)}", "", "operation", "not in Stripe's API")]
        template, _ = found
        subject = f"{method} {template}"
        try:
            query = decode(record["query"])
            form = decode(record["body"]) if record["body"] else None
        except FormError as exc:
            return [Difference(subject, "", "encoding", str(exc))]
        if form is not None and record["content_type"] != FORM:
            return [Difference(subject, "", "encoding", f"{record['content_type']}, not {FORM}")]
        spec = self.checker.request(method, template, query, form)
        objections = sdk.check_request(method, template, {**query, **(form or {})}) or []
        root = sdk.request_root(subject)
        return self._gaps(spec, root) + [
            d for d in objections if (d.at, d.problem) not in {(s.at, s.problem) for s in spec}
        ]

    def answer(self, record: dict[str, Any]) -> list[Difference]:
        found = self.checker.operation(record["method"], record["path"])
        if found is None:
            return []  # the request's difference says it
        body = record["response"]
        spec = self.checker.response(record["method"], found[0], record["status"], body)
        return self._resolved(spec) + self._removed(body)

    def event(self, event: Any) -> list[Difference]:
        obj = (event.get("data") or {}).get("object") if isinstance(event, dict) else None
        return self._resolved(self.checker.event(event)) + self._removed(event) + self._removed(obj)

    # -- the SDK's say ----------------------------------------------------------------

    def _resolved(self, found: list[Difference]) -> list[Difference]:
        roots = {d.subject: sdk.answer_root(self.checker, d.subject) for d in found}
        return [d for d in found if self._gaps([d], roots[d.subject])]

    def _gaps(self, found: list[Difference], root: type | None) -> list[Difference]:
        """The differences the SDK's version does not explain."""
        kept = []
        for difference in found:
            parent, types_ = sdk.types_at(root, difference.at)
            newer = (
                (difference.problem == "unknown" and types_ is not sdk.MISSING)
                or (difference.problem == "missing" and parent and types_ is sdk.MISSING)
                or (
                    difference.problem == "enum"
                    and root is not None
                    and sdk.names_value(root, types_, difference.value)
                )
            )
            if newer:
                self.gaps.add(difference)
            else:
                kept.append(difference)
        return kept

    def _removed(self, obj: Any) -> list[Difference]:
        """Fields of a resource the description knows but the SDK's version does not
        (removed since): on the top level of the object, and of a list's items."""
        if not isinstance(obj, dict):
            return []
        if obj.get("object") == "list":
            return [d for item in obj.get("data") or () for d in self._removed(item)]
        name = self.checker.resources.get(str(obj.get("object")))
        root = sdk.resource_class(str(obj.get("object")))
        if name is None or root is None:
            return []
        known, described = sdk.fields(root), self.checker.schemas[name].get("properties", {})
        return [
            Difference(name, key, "unknown", f"removed by API {sdk.API_VERSION} (not in the SDK)")
            for key in obj
            if key in described and key not in known
        ]

    # -- many records -----------------------------------------------------------------

    def judge(self, records: Iterable[dict[str, Any]], *, strict: bool = False) -> Verdict:
        verdict = Verdict()
        self.gaps = set()
        for record in records:
            if record["kind"] == "event":
                verdict.judged["event"] += 1
                example = f"event {record['event'].get('type')} {record['event'].get('id')}"
                self._file(verdict, self.event(record["event"]), example)
                continue
            verdict.judged["exchange"] += 1
            example = f"{record['method']} {record['path']} -> {record['status']}"
            asked = self.request(record)
            if asked and not strict and 400 <= record["status"] < 500:
                verdict.refused[example] += 1  # refused, as Stripe refuses it
            else:
                self._file(verdict, asked, f"{example}, sent {record['body'] or record['query']!r}"[:300])
            self._file(verdict, self.answer(record), example)
        verdict.gaps.update(str(d) for d in self.gaps)
        return verdict

    @staticmethod
    def _file(verdict: Verdict, found: list[Difference], example: str) -> None:
        for difference in found:
            reason = allowlist.reason_for(difference)
            if reason is not None:
                verdict.allowed[reason] += 1
            else:
                verdict.failing.setdefault(
                    (difference.subject, difference.at, difference.problem), (difference, example)
                )


def records(folder: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(folder.glob("exchanges-*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.endswith("\n"):  # a line cut by a killed emulator is not judged
                    yield json.loads(line)
