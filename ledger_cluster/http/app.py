"""The Starlette application: each route turns its path, query string, JSON body and
`Idempotency-Key` header into the RPC's request message, and calls the gRPC servicer's own
method in-process, on the event loop the gRPC server runs on. Validation, admission
(`CallGate`), metrics and the backend are the servicer's; this module only translates.

Messages are read and written in the proto3 JSON mapping (`json_format`): lowerCamelCase
names (the proto names are accepted too), int64 values as strings (numbers are accepted)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ledger_cluster.gateway.service import Context, LedgerService
from ledger_cluster.http.openapi import openapi_document, swagger_page
from ledger_cluster.http.routes import REQUEST_ID_FIELD, ROUTES, HttpRoute
from ledger_cluster.limits import PUBLIC_MESSAGE_BYTES_MAX
from ledger_cluster.security import UNAUTHENTICATED_REASON, BearerTokenInterceptor
from ledger_cluster.status import ApiError, status_details

# google/rpc/code.proto's HTTP mapping of each gRPC code.
HTTP_STATUS_BY_CODE: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
IDEMPOTENCY_KEY_HEADER = "idempotency-key"
STATUS_DETAILS_METADATA_KEY = "grpc-status-details-bin"
MALFORMED_JSON_REASON = "MALFORMED_JSON"
MALFORMED_REQUEST_REASON = "MALFORMED_REQUEST"
PATH_MISMATCH_REASON = "PATH_MISMATCH"
IDEMPOTENCY_KEY_MISMATCH_REASON = "IDEMPOTENCY_KEY_MISMATCH"
IDEMPOTENCY_KEY_NOT_ACCEPTED_REASON = "IDEMPOTENCY_KEY_NOT_ACCEPTED"
NO_SUCH_PATH_REASON = "NO_SUCH_PATH"
BODY_TOO_LARGE_REASON = "BODY_TOO_LARGE"
METHOD_NOT_ALLOWED_REASON = "METHOD_NOT_ALLOWED"
# Where the OpenAPI document is served, and where the Swagger UI page loads it from.
OPENAPI_PATH = "/openapi.json"


class ResourceConvertor(Convertor[str]):
    """One path segment up to a colon: `/v1/transactions/{id}:settle` splits at the colon."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("resource", ResourceConvertor())


@dataclass(frozen=True)
class HttpSecurity:
    """The bearer tokens the HTTP API accepts: the gRPC port's client tokens (none: open)."""

    tokens: tuple[str, ...] = ()
    who: str = "a client token (Authorization: Bearer ...)"


class _CallFailedError(Exception):
    """A call that ends with `failure`, answered with `http_status` when the gRPC code's own
    HTTP status would mislead (a body too large)."""

    def __init__(self, failure: ApiError, http_status: int | None = None) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.http_status = http_status


class HttpCallContext:
    """What LedgerService uses of grpc's ServicerContext: `time_remaining()` (an HTTP call
    brings no deadline, so the service's default applies) and `abort_with_status()`, where
    CallGate ends a failed call. The status carries the google.rpc.Status it was made from,
    which comes back out as the ApiError it stands for."""

    def time_remaining(self) -> float | None:
        return None

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise _CallFailedError(_api_error_of(status))


def _api_error_of(status: grpc.Status) -> ApiError:
    for key, value in status.trailing_metadata or ():
        if key == STATUS_DETAILS_METADATA_KEY and isinstance(value, bytes):
            details = status_details(status_pb2.Status.FromString(value))
            return ApiError(details.code, details.reason, details.message, details.metadata)
    return ApiError(status.code, status.code.name, status.details)


def error_response(
    failure: ApiError, headers: Mapping[str, str] | None = None, http_status: int | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"code": failure.code.name, "reason": failure.reason, "message": failure.message}
    if failure.metadata:
        body["metadata"] = dict(failure.metadata)
    status = http_status or HTTP_STATUS_BY_CODE.get(failure.code, 500)
    return JSONResponse(body, status_code=status, headers=headers)


def _invalid(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def _field_named(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON name, as json_format accepts either."""
    field = descriptor.fields_by_name.get(name)
    if field is not None:
        return field
    return next((field for field in descriptor.fields if field.json_name == name), None)


def _set_field(
    values: dict[str, Any], descriptor: Descriptor, name: str, value: object, mismatch: ApiError
) -> None:
    """`values[name] = value`, in its proto name; `mismatch` when the request gave the same
    field (by either name) another value."""
    field = descriptor.fields_by_name[name]
    for alias in {field.name, field.json_name}:
        if alias in values and values.pop(alias) != value:
            raise mismatch
    values[field.name] = value


def _too_large() -> _CallFailedError:
    failure = ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        BODY_TOO_LARGE_REASON,
        f"a body holds at most {PUBLIC_MESSAGE_BYTES_MAX} bytes",
    )
    return _CallFailedError(failure, http_status=413)


async def _body(request: Request) -> bytes:
    """The body, refused past PUBLIC_MESSAGE_BYTES_MAX before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > PUBLIC_MESSAGE_BYTES_MAX:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > PUBLIC_MESSAGE_BYTES_MAX:
            raise _too_large()
    return bytes(body)


async def _body_values(request: Request) -> dict[str, Any]:
    raw = await _body(request)
    if not raw.strip():
        return {}
    try:
        values = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _invalid(MALFORMED_JSON_REASON, f"the body is not JSON: {error}") from None
    except RecursionError:
        raise _invalid(MALFORMED_JSON_REASON, "the body nests too deep") from None
    if not isinstance(values, dict):
        raise _invalid(MALFORMED_JSON_REASON, "the body must be a JSON object")
    return values


def _query_values(request: Request, descriptor: Descriptor) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, text in request.query_params.multi_items():
        field = _field_named(descriptor, name)
        if field is None:
            raise _invalid(MALFORMED_REQUEST_REASON, f"unknown query parameter {name!r}")
        if field.type == FieldDescriptor.TYPE_BOOL:
            if text not in ("true", "false"):
                raise _invalid(MALFORMED_REQUEST_REASON, f"query parameter {name!r} must be true or false")
            values[field.name] = text == "true"
        else:
            values[field.name] = text
    return values


async def request_message(route: HttpRoute, request: Request) -> Message:
    """The RPC's request from the HTTP request, or INVALID_ARGUMENT with a reason."""
    descriptor = route.request_descriptor
    values = await _body_values(request) if route.has_body else _query_values(request, descriptor)
    for name in route.path_fields:
        mismatch = _invalid(PATH_MISMATCH_REASON, f"{name} in the body differs from the one in the path")
        _set_field(values, descriptor, name, request.path_params[name], mismatch)
    idempotency_key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if idempotency_key is not None:
        if not route.takes_idempotency_key:
            raise _invalid(
                IDEMPOTENCY_KEY_NOT_ACCEPTED_REASON,
                f"{route.rpc} has no request id; give each item its own requestId",
            )
        mismatch = _invalid(
            IDEMPOTENCY_KEY_MISMATCH_REASON, "requestId in the body differs from the Idempotency-Key header"
        )
        _set_field(values, descriptor, REQUEST_ID_FIELD, idempotency_key, mismatch)
    message = message_factory.GetMessageClass(descriptor)()
    try:
        json_format.ParseDict(values, message)
    except json_format.ParseError as error:
        raise _invalid(MALFORMED_REQUEST_REASON, str(error)) from None
    return message


Endpoint = Callable[[Request], Awaitable[Response]]


def _endpoint(
    route: HttpRoute, service: LedgerService, authorize: Callable[[Request], ApiError | None]
) -> Endpoint:
    method = cast(Callable[[Message, Context], Awaitable[Message]], getattr(service, route.rpc))

    async def endpoint(request: Request) -> Response:
        refusal = authorize(request)
        if refusal is not None:
            return error_response(refusal, {"WWW-Authenticate": "Bearer"})
        try:
            message = await request_message(route, request)
            response = await method(message, cast(Context, HttpCallContext()))
        except _CallFailedError as failed:
            return error_response(failed.failure, http_status=failed.http_status)
        except ApiError as failure:
            return error_response(failure)
        return JSONResponse(json_format.MessageToDict(response, always_print_fields_with_no_presence=True))

    return endpoint


def _authorizer(security: HttpSecurity) -> Callable[[Request], ApiError | None]:
    if not security.tokens:
        return lambda request: None
    interceptor = BearerTokenInterceptor(security.tokens, security.who)

    def authorize(request: Request) -> ApiError | None:
        header = request.headers.get("authorization")
        if header is not None and interceptor.admits([("authorization", header)]):
            return None
        return ApiError(
            grpc.StatusCode.UNAUTHENTICATED,
            UNAUTHENTICATED_REASON,
            f"{request.url.path} needs {security.who}",
        )

    return authorize


def ledger_http_app(service: LedgerService, security: HttpSecurity) -> Starlette:
    """The HTTP API of `service`, with its OpenAPI document at /openapi.json and Swagger UI at
    /docs (both open: they describe the API, they do not reach the ledger)."""
    authorize = _authorizer(security)
    document = openapi_document(bearer_tokens=bool(security.tokens))

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def docs(request: Request) -> Response:
        return HTMLResponse(swagger_page(OPENAPI_PATH))

    routes = [
        Route(route.path, _endpoint(route, service, authorize), methods=[route.http_method], name=route.rpc)
        for route in ROUTES
    ]
    routes += [Route(OPENAPI_PATH, openapi, methods=["GET"]), Route("/docs", docs, methods=["GET"])]
    handlers = {404: _no_such_path, 405: _method_not_allowed, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _internal_error(request: Request, error: Exception) -> Response:
    """A bug in this layer (the servicer turns its own into INTERNAL already): the same JSON
    error shape as every other answer; Starlette logs the exception."""
    return error_response(
        ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error: {type(error).__name__}")
    )


async def _no_such_path(request: Request, error: Exception) -> Response:
    return error_response(
        ApiError(grpc.StatusCode.NOT_FOUND, NO_SUCH_PATH_REASON, f"no route for {request.url.path}")
    )


async def _method_not_allowed(request: Request, error: Exception) -> Response:
    headers = error.headers if isinstance(error, HTTPException) else None
    # No gRPC code stands for 405; UNIMPLEMENTED is the closest, with the HTTP status kept.
    failure = ApiError(
        grpc.StatusCode.UNIMPLEMENTED,
        METHOD_NOT_ALLOWED_REASON,
        f"{request.method} is not served on {request.url.path}",
    )
    return error_response(failure, headers, http_status=405)
