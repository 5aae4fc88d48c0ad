"""Builds the OpenAPI 3 document of the REST API from the descriptor set: the
google.api.http annotations give the paths, the messages give the schemas, and the
proto comments give the descriptions. It mirrors what Envoy's transcoder does with the
same descriptor set, so the document and the gateway cannot disagree."""

from __future__ import annotations

import re
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

FDP = descriptor_pb2.FieldDescriptorProto
SCALARS: dict[int, dict[str, Any]] = {
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FDP.TYPE_FIXED32: {"type": "integer", "format": "int32", "minimum": 0},
    # The proto3 JSON mapping prints 64-bit integers as strings.
    FDP.TYPE_INT64: {"type": "string", "format": "int64"},
    FDP.TYPE_SINT64: {"type": "string", "format": "int64"},
    FDP.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FDP.TYPE_UINT64: {"type": "string", "format": "int64"},
    FDP.TYPE_FIXED64: {"type": "string", "format": "int64"},
    FDP.TYPE_DOUBLE: {"type": "number"},
    FDP.TYPE_FLOAT: {"type": "number"},
    FDP.TYPE_BYTES: {"type": "string", "format": "byte"},
}
WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    ".google.protobuf.Value": {},
    ".google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
# Messages that travel as one query parameter (the transcoder parses RFC 3339).
QUERY_MESSAGES = {".google.protobuf.Timestamp"}
VERBS = ("get", "put", "post", "delete", "patch")
ERROR_STATUSES = {
    "400": "The request is invalid: a field, a query parameter or the JSON body.",
    "401": "The Api-Key header is missing or wrong.",
    "404": "No such invoice, or no such path.",
    "409": "The Idempotency-Key was already used for a different request.",
    "413": "The body is over the size limit.",
    "429": "Stripe's rate limit was reached; retry with backoff.",
    "503": "A dependency is unavailable; retry later.",
    "504": "The call took too long.",
}
STATUS = ".google.rpc.Status"


class _Index:
    """Messages by full name, with their comments, from a FileDescriptorSet."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.comments: dict[tuple[str, ...], str] = {}
        for file in files.file:
            comments = {tuple(map(str, loc.path)): loc.leading_comments for loc in file.source_code_info.location}
            for i, message in enumerate(file.message_type):
                name = f".{file.package}.{message.name}"
                self.messages[name] = message
                self.comments[(name,)] = comments.get(("4", str(i)), "")
                for j, field in enumerate(message.field):
                    self.comments[(name, field.name)] = comments.get(("4", str(i), "2", str(j)), "")
            for s, service in enumerate(file.service):
                self.comments[(f".{file.package}.{service.name}",)] = comments.get(("6", str(s)), "")
                for m, method in enumerate(service.method):
                    key = (f".{file.package}.{service.name}", method.name)
                    self.comments[key] = comments.get(("6", str(s), "2", str(m)), "")

    def describe(self, *key: str) -> str:
        lines = [ln.strip() for ln in self.comments.get(key, "").splitlines()]
        return "\n".join(ln for ln in lines if not ln.startswith("buf:lint:")).strip()


def _field_schema(field: descriptor_pb2.FieldDescriptorProto, refs: set[str]) -> dict[str, Any]:
    if field.type == FDP.TYPE_MESSAGE:
        if field.type_name in WELL_KNOWN:
            schema = dict(WELL_KNOWN[field.type_name])
        else:
            refs.add(field.type_name)
            schema = {"$ref": f"#/components/schemas/{_schema_name(field.type_name)}"}
    elif field.type == FDP.TYPE_ENUM:
        schema = {"type": "string"}
    else:
        schema = dict(SCALARS[field.type])
    if field.label == FDP.LABEL_REPEATED:
        schema = {"type": "array", "items": schema}
    return schema


def _schema_name(type_name: str) -> str:
    return type_name.lstrip(".").replace(".", "_")


def _message_schema(index: _Index, name: str, refs: set[str], *, output: bool) -> dict[str, Any]:
    """Output messages list every field as required: the gateway prints zero values."""
    message = index.messages[name]
    properties = {}
    for field in message.field:
        prop = _field_schema(field, refs)
        description = index.describe(name, field.name)
        if description and "$ref" not in prop:
            prop = {"description": description, **prop}
        properties[field.json_name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if output:
        schema["required"] = [f.json_name for f in message.field if not f.proto3_optional]
        schema.pop("additionalProperties")
    if index.describe(name):
        schema["description"] = index.describe(name)
    return schema


# Envoy's transcoder (print_options.stream_newline_delimited) answers a server stream as one
# JSON object per line, under the 200 it sends before the first.
STREAMED = "OK: a stream of these objects, one JSON object per line (NDJSON), for as long as the stream lasts"


def _operation(
    index: _Index, service: str, method: descriptor_pb2.MethodDescriptorProto, path: str, body: str
) -> tuple[dict[str, Any], set[str], set[str]]:
    inputs: set[str] = set()
    outputs: set[str] = set()
    request = index.messages[method.input_type]
    # `{id}` and custom verbs after it: `/invoices/{id}:pay`.
    path_fields = set(re.findall(r"\{([^}=]+)", path))
    parameters = []
    for field in request.field:
        if field.name in path_fields:
            where = "path"
        elif body == "*" or (field.type == FDP.TYPE_MESSAGE and field.type_name not in QUERY_MESSAGES):
            continue
        else:
            where = "query"
        parameters.append(
            {
                "name": field.json_name if where == "query" else field.name,
                "in": where,
                "required": where == "path",
                "description": index.describe(method.input_type, field.name),
                "schema": _field_schema(field, inputs),
            }
        )
    response = (
        dict(WELL_KNOWN[method.output_type])
        if method.output_type in WELL_KNOWN
        else {"$ref": f"#/components/schemas/{_schema_name(method.output_type)}"}
    )
    if method.output_type not in WELL_KNOWN:
        outputs.add(method.output_type)
    error = {"$ref": f"#/components/schemas/{_schema_name(STATUS)}"}
    operation: dict[str, Any] = {
        "operationId": method.name,
        "summary": index.describe(service, method.name).split("\n\n")[0].replace("\n", " "),
        "description": index.describe(service, method.name),
        "parameters": parameters,
        "responses": {
            "200": {
                "description": STREAMED if method.server_streaming else "OK",
                "content": {"application/json": {"schema": response}},
            },
            **{
                code: {"description": text, "content": {"application/json": {"schema": error}}}
                for code, text in ERROR_STATUSES.items()
            },
        },
    }
    if body:
        if body != "*":
            raise ValueError(f"{method.name}: only body '*' is supported, got {body!r}")
        if path_fields:
            # Body "*" beside path fields is every other field, and may be left out.
            schema = _message_schema(index, method.input_type, inputs, output=False)
            schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in path_fields}
            operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": schema}}}
        else:
            inputs.add(method.input_type)
            schema = {"$ref": f"#/components/schemas/{_schema_name(method.input_type)}"}
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return operation, inputs, outputs


def _closure(index: _Index, roots: set[str], *, output: bool, schemas: dict[str, Any]) -> None:
    pending = set(roots)
    while pending:
        name = pending.pop()
        key = _schema_name(name)
        if key in schemas:
            continue
        found: set[str] = set()
        schemas[key] = _message_schema(index, name, found, output=output)
        pending |= found


def build(descriptor_set: bytes, *, services: list[str], title: str, version: str) -> dict[str, Any]:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    index = _Index(files)
    paths: dict[str, dict[str, Any]] = {}
    inputs: set[str] = set()
    outputs: set[str] = {STATUS}
    descriptions = []
    for file in files.file:
        for service in file.service:
            full = f".{file.package}.{service.name}"
            if full.lstrip(".") not in services:
                continue
            descriptions.append(index.describe(full))
            for method in service.method:
                rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]  # type: ignore[index]
                verb = rule.WhichOneof("pattern")
                if verb not in VERBS:
                    continue
                path = getattr(rule, verb)
                operation, i, o = _operation(index, full, method, path, rule.body)
                paths.setdefault(path, {})[verb] = operation
                inputs |= i
                outputs |= o
    schemas: dict[str, Any] = {}
    _closure(index, outputs, output=True, schemas=schemas)
    _closure(index, inputs, output=False, schemas=schemas)
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version, "description": "\n\n".join(descriptions)},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "Api-Key"}},
        },
        "security": [{"ApiKey": []}],
    }
