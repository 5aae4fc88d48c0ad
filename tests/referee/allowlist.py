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
            fnmatchcase(difference.problem, self.problem)
            and fnmatchcase(difference.subject, self.subject)
            and fnmatchcase(difference.at, self.at)
        )


_UNREAD = (
    "the emulator's payment objects keep stock localstripe's 2017 shape: they reach the"
    " service only as payment_intent.* / charge.* events, which its sidecar ignores"
    " (service/webhooks.py applies invoice events only), and it never requests them"
)

ALLOWED: tuple[Allowed, ...] = (
    Allowed(
        "*",
        "*total_count",
        "unknown",
        "Stripe answers a list's total_count only when include[]=total_count asks for it;"
        " tests/test_localstripe_invoices.py counts an invoice's 250 lines with it (a list"
        " embeds at most 10), and the service never reads it",
    ),
    Allowed(
        "invoice",
        "payment_intent",
        "unknown",
        "removed from Invoice by 2025-03-31.basil (now under `payments`);"
        " tests/test_localstripe_idempotency.py and tests/test_localstripe_payments.py tell one"
        " charge from two by it, and the service never reads it (service/payments.py reads id,"
        " status, total, currency, customer, customer_name, metadata, invoice_pdf, created,"
        " subtotal and the lines' description and amount)",
    ),
    Allowed("charge", "*", "*", _UNREAD),
    Allowed("payment_intent", "*", "*", _UNREAD),
    Allowed(
        "POST /v1/customers/{customer}",
        "invoice_settings",
        "type",
        "tests/test_localstripe_idempotency.py crashes the emulator on purpose with this invalid"
        " parameter, to test its Stripe-shaped 500 (Stripe would refuse it with a 400 before"
        " running)",
    ),
)


def reason_for(difference: Difference) -> str | None:
    return next((entry.reason for entry in ALLOWED if entry.matches(difference)), None)
