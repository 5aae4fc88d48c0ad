"""The one list of differences from Stripe's published API that the suite accepts, each
with its reason. A difference the referee finds that no entry here matches fails the
suite (tests/conftest.py's session check and tests/test_stripe_referee.py).

`subject` and `at` are fnmatch patterns over a Difference's fields (see
tests/referee/openapi.py): the subject is a request (`POST /v1/invoices`) or the
resource a field belongs to (`invoice`, `event`), `at` the field inside it."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from tests.referee.openapi import Difference


@dataclass(frozen=True)
class Allowed:
    subject: str
    at: str
    problem: str
    reason: str

    def matches(self, difference: Difference) -> bool:
        return (
            self.problem == difference.problem
            and fnmatchcase(difference.subject, self.subject)
            and fnmatchcase(difference.at, self.at)
        )


ALLOWED: tuple[Allowed, ...] = ()


def reason_for(difference: Difference) -> str | None:
    return next((entry.reason for entry in ALLOWED if entry.matches(difference)), None)
