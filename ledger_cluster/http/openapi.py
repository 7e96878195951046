"""The OpenAPI 3.1 document of the HTTP API, derived from the proto descriptors and the route
table, so it cannot drift from what the handlers parse: each message is a schema under its
proto3 JSON names."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ledger_cluster import __version__
from ledger_cluster.http.routes import ROUTES, HttpRoute

OPENAPI_VERSION = "3.1.0"
# Swagger UI's page loads its script from this CDN: the server ships no JavaScript.
SWAGGER_UI_CDN = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
# The proto3 JSON mapping writes 64-bit integers as strings (JSON numbers lose precision past
# 2**53), and reads either form.
_INT64_SCHEMA: dict[str, Any] = {"type": ["string", "integer"], "format": "int64"}
_SCALAR_SCHEMAS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_INT64: _INT64_SCHEMA,
    FieldDescriptor.TYPE_UINT64: _INT64_SCHEMA,
    FieldDescriptor.TYPE_SINT64: _INT64_SCHEMA,
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["code", "reason", "message"],
    "properties": {
        "code": {"type": "string", "description": "gRPC status code name, e.g. NOT_FOUND"},
        "reason": {"type": "string", "description": "the ErrorInfo reason, e.g. ACCOUNT_NOT_FOUND"},
        "message": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _reference(descriptor: Descriptor) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{descriptor.name}"}


def _field_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single_schema(value_field, schemas)}
    single = _single_schema(field, schemas)
    return {"type": "array", "items": single} if field.is_repeated else single


def _single_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None:
        _add_schema(field.message_type, schemas)
        return _reference(field.message_type)
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    return dict(_SCALAR_SCHEMAS[field.type])


def _add_schema(descriptor: Descriptor, schemas: dict[str, Any]) -> None:
    if descriptor.name in schemas:
        return
    schemas[descriptor.name] = {}  # before the fields: a message may contain itself
    properties = {field.json_name: _field_schema(field, schemas) for field in descriptor.fields}
    schemas[descriptor.name] = {"type": "object", "properties": properties}


def _error_responses() -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    described = {
        "400": "Invalid argument, malformed JSON, or a failed precondition",
        "401": "Missing or wrong bearer token",
        "404": "No such resource",
        "409": "Already exists (a request id reused with another payload) or aborted",
        "429": "Too many calls in flight",
        "503": "A shard is unavailable; retry with the same request id",
        "504": "Deadline exceeded: the outcome is unknown; retry with the same request id",
    }
    return {status: {"description": text, **error} for status, text in described.items()}


def _operation(route: HttpRoute, schemas: dict[str, Any]) -> dict[str, Any]:
    request = route.request_descriptor
    _add_schema(request, schemas)
    _add_schema(route.response_descriptor, schemas)
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.path_fields
    ]
    if not route.has_body:
        parameters += [
            {"name": field.name, "in": "query", "required": False, "schema": _field_schema(field, schemas)}
            for field in request.fields
            if field.name not in route.path_fields
        ]
    if route.takes_idempotency_key:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": (
                    "The request id: a retry with the same key and payload is answered, not applied again"
                ),
                "schema": {"type": "string"},
            }
        )
    operation: dict[str, Any] = {
        "operationId": route.rpc,
        "summary": route.summary,
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": _reference(route.response_descriptor)}},
            },
            **_error_responses(),
        },
    }
    if route.has_body:
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": _reference(request)}},
        }
    return operation


def openapi_document(*, bearer_tokens: bool) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.openapi_path, {})[route.http_method.lower()] = _operation(route, schemas)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ledger-cluster LedgerService",
            "version": __version__,
            "description": "The gRPC LedgerService over HTTP/JSON (proto3 JSON mapping).",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if bearer_tokens:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def swagger_page(document_url: str) -> str:
    return f"""<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>ledger-cluster LedgerService</title>
<link rel="stylesheet" href="{SWAGGER_UI_CDN}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{SWAGGER_UI_CDN}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{document_url}", dom_id: "#swagger-ui"}});</script>
</body>
</html>
"""
