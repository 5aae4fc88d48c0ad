"""The OpenAPI generator, on the real descriptor set built from protos/."""

from __future__ import annotations

from typing import Any

from openapi_spec_validator import validate

from tools import generate, openapi


def _document() -> dict[str, Any]:
    generate.generate_build_files()
    return openapi.build(generate.DESCRIPTOR.read_bytes(), services=generate.SERVICES, title="t", version="v")


def test_paths_and_parameters_follow_the_http_annotations() -> None:
    doc = _document()
    validate(doc)
    assert set(doc["paths"]) == {
        "/admin/api/invoices",
        "/admin/api/invoices/{id}",
        "/admin/api/invoices/{id}:pay",
        "/admin/api/invoices/{id}:void",
        "/admin/api/invoices/{id}:markUncollectible",
        "/admin/api/invoices/{id}:refund",
        "/admin/api/invoices/{id}/creditNotes",
        "/admin/api/invoices/{id}/audit",
        "/admin/api/invoices:watch",
    }
    listing = doc["paths"]["/admin/api/invoices"]["get"]
    assert [(p["name"], p["in"], p["required"]) for p in listing["parameters"]] == [
        ("page", "query", False),
        ("limit", "query", False),
        ("pageToken", "query", False),
        ("status", "query", False),
        ("userId", "query", False),
        ("createdAfter", "query", False),
        ("createdBefore", "query", False),
        ("givenBack", "query", False),
    ]
    assert listing["parameters"][5]["schema"] == {"type": "string", "format": "date-time"}
    assert listing["parameters"][7]["schema"] == {"type": "boolean"}
    get = doc["paths"]["/admin/api/invoices/{id}"]["get"]
    assert [(p["name"], p["in"], p["required"]) for p in get["parameters"]] == [
        ("id", "path", True),
        ("page", "query", False),  # accepted and ignored, as the original API did
        ("limit", "query", False),
    ]
    create = doc["paths"]["/admin/api/invoices"]["post"]
    assert create["parameters"] == []
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/billing_v1_CreateInvoiceRequest"}
    # The Stripe invoice comes back as a plain JSON object (google.protobuf.Struct).
    assert create["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "object"
    assert doc["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header", "name": "Api-Key"}
    # A custom verb after a path field: `id` is a path parameter, the optional body the rest.
    pay = doc["paths"]["/admin/api/invoices/{id}:pay"]["post"]
    assert [(p["name"], p["in"], p["required"]) for p in pay["parameters"]] == [("id", "path", True)]
    assert pay["requestBody"]["required"] is False
    assert set(pay["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {"paymentMethod"}


def test_schemas_use_json_names_and_json_types() -> None:
    schemas = _document()["components"]["schemas"]
    invoice = schemas["billing_v1_Invoice"]
    assert invoice["required"] == [
        "_id",
        "invoiceId",
        "user",
        "status",
        "amountInt32",
        "invoicePdf",
        "createdAt",
        "updatedAt",
        "amount",
        "currency",
        "amountCredited",
        "amountRefunded",
    ]
    # A double on the wire, printed by Envoy as a JSON number (whole: see the proto).
    for amount in ("amount", "amountCredited", "amountRefunded"):
        assert invoice["properties"][amount]["type"] == "number"
    created = invoice["properties"]["createdAt"]
    assert (created["type"], created["format"]) == ("string", "date-time")
    assert created["description"].startswith("When Stripe created the invoice")
    assert schemas["billing_v1_User"]["required"] == ["_id", "name"]
    request = schemas["billing_v1_CreateInvoiceRequest"]
    assert "required" not in request
    assert set(request["properties"]) == {"items", "customer", "paymentMethod", "currency", "user"}
    assert request["additionalProperties"] is False
    assert schemas["google_rpc_Status"]["properties"]["details"]["items"]["required"] == ["@type"]
    assert schemas["billing_v1_ListInvoicesResponse"]["properties"]["count"]["type"] == "integer"


def test_the_watch_is_documented_as_a_stream_of_events() -> None:
    watch = _document()["paths"]["/admin/api/invoices:watch"]["get"]
    assert [p["name"] for p in watch["parameters"]] == ["resumeToken", "invoiceId", "userId", "status"]
    ok = watch["responses"]["200"]
    assert "one JSON object per line" in ok["description"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/billing_v1_InvoiceEvent"}
