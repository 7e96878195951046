"""Errors on the wire: `google.rpc.Status` with one `google.rpc.ErrorInfo` (domain
`ledger-cluster`, an UPPER_SNAKE reason, string metadata), for servers to raise and clients to
read."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ledger_cluster.errors import LedgerError

ERROR_DOMAIN = "ledger-cluster"

logger = logging.getLogger(__name__)
Response = TypeVar("Response")


@dataclass(frozen=True)
class ApiError(LedgerError):
    """A request that fails with a precise status; raised inside servicers, turned into the
    RPC's status at the edge. Nothing has changed state when one is raised."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_google_status(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=dict(self.metadata)
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name),
            message=self.message,
            details=[detail],
        )

    def to_grpc_status(self) -> grpc.Status:
        grpc_status: grpc.Status = rpc_status.to_status(self.to_google_status())
        return grpc_status


@dataclass(frozen=True)
class ErrorDetails:
    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """The status code, message and ErrorInfo of a failed call (reason empty if it has none)."""
    # Every RpcError that grpc's client raises is also a grpc.Call; the stubs cannot say so.
    call = cast(grpc.Call, error)
    reason, metadata = _error_info(rpc_status.from_call(call))
    return ErrorDetails(code=call.code(), message=call.details() or "", reason=reason, metadata=metadata)


def status_details(status: status_pb2.Status) -> ErrorDetails:
    """The same, of a google.rpc.Status carried inside a response (UpdateMany's outcomes)."""
    reason, metadata = _error_info(status)
    code = _CODES_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
    return ErrorDetails(code=code, message=status.message, reason=reason, metadata=metadata)


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _error_info(status: status_pb2.Status | None) -> tuple[str, dict[str, str]]:
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, dict(info.metadata)
    return "", {}


def abort(context: grpc.ServicerContext, failure: ApiError) -> NoReturn:
    context.abort_with_status(failure.to_grpc_status())
    raise AssertionError("abort_with_status returned")  # it always raises


def serve(
    context: grpc.ServicerContext,
    handler: Callable[[], Response],
    translate: Callable[[Exception], ApiError | None] = lambda error: None,
) -> Response:
    """Run a servicer's `handler`; an ApiError, or any error `translate` turns into one, ends
    the call with its status. Anything else is a bug: logged, and INTERNAL with an ErrorInfo,
    so every status a client sees carries one."""
    try:
        return handler()
    except ApiError as error:
        failure = error
    except Exception as error:
        translated = translate(error)
        if translated is None:
            logger.exception("unexpected error while serving a request")
            translated = ApiError(
                grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error: {type(error).__name__}"
            )
        failure = translated
    abort(context, failure)
