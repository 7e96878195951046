"""Errors on the wire: `google.rpc.Status` with one `google.rpc.ErrorInfo` (domain
`ledger-cluster`, an UPPER_SNAKE reason, string metadata), for servers to raise and clients to
read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "ledger-cluster"


@dataclass(frozen=True)
class ApiError(Exception):
    """A request that fails with a precise status; raised inside servicers, turned into the
    RPC's status at the edge. Nothing has changed state when one is raised."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_grpc_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=dict(self.metadata)
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(
            code=getattr(code_pb2, self.code.name),
            message=self.message,
            details=[detail],
        )
        grpc_status: grpc.Status = rpc_status.to_status(status)
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
    reason, metadata = "", {}
    status = rpc_status.from_call(call)
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
            break
    return ErrorDetails(code=call.code(), message=call.details() or "", reason=reason, metadata=metadata)
