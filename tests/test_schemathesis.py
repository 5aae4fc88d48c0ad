"""Property-based tests of the REST API from its own OpenAPI document, through the real
Envoy: whatever schemathesis sends, valid or not, the gateway answers without a 5xx,
with a status the document lists, and with a body that matches the document's schema."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import API_KEY, Stack

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_document(stack: Stack, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/admin/api/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.label for op in operations} == {
        "GET /admin/api/invoices",
        "GET /admin/api/invoices/{id}",
        "POST /admin/api/invoices",
        "POST /admin/api/invoices/{id}:pay",
        "POST /admin/api/invoices/{id}:void",
        "POST /admin/api/invoices/{id}:markUncollectible",
        "POST /admin/api/invoices/{id}:refund",
        "GET /admin/api/invoices/{id}/creditNotes",
        "GET /admin/api/invoices/{id}/audit",
        "GET /admin/api/invoices:watch",
    }
    # A watch answers 200 and streams until it ends, so a generated case would never return;
    # its refusals (4xx JSON before the stream starts) are in tests/test_watch_gateway.py.
    for operation in (op for op in operations if op.label != "GET /admin/api/invoices:watch"):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def conforms(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(base_url=stack.base_url, headers={"Api-Key": API_KEY}, checks=CHECKS)

        conforms()
