"""Typed exceptions for the API's error statuses, one class per gRPC code and a few per
ErrorInfo reason, all under `LedgerApiError` (itself a `LedgerError`)::

    LedgerApiError                    code, reason, message, metadata; `retryable` if a retry may help
    ├── InvalidArgumentError          INVALID_ARGUMENT: fix the request
    ├── NotFoundError                 NOT_FOUND
    │   ├── AccountNotFoundError      ACCOUNT_NOT_FOUND (metadata: account_id, side for transfers)
    │   ├── TransactionNotFoundError  TRANSACTION_NOT_FOUND
    │   └── TransferNotFoundError     TRANSFER_NOT_FOUND
    ├── AlreadyExistsError            ALREADY_EXISTS
    │   └── RequestIdReusedError      the request id was used with another payload
    ├── FailedPreconditionError       FAILED_PRECONDITION
    │   ├── NotPendingError           TRANSACTION_NOT_PENDING, TRANSFER_NOT_PENDING
    │   ├── ExpiredError              TRANSACTION_EXPIRED, TRANSFER_EXPIRED
    │   ├── SettleAmountMismatchError already settled for another amount
    │   └── HoldRefusedError (hold.py)  a reserve whose hold is not PENDING; its block never ran
    ├── OutOfRangeError               OUT_OF_RANGE (BALANCE_OVERFLOW)
    ├── UnauthenticatedError          UNAUTHENTICATED: no or a wrong bearer token
    ├── UnavailableError              UNAVAILABLE (retryable)
    │   └── OutcomeUnknownError       OUTCOME_UNKNOWN: retry with the same request id
    ├── DeadlineExceededError         DEADLINE_EXCEEDED (retryable; without a reason the outcome is unknown)
    ├── ResourceExhaustedError        RESOURCE_EXHAUSTED (retryable after backing off)
    ├── AbortedError                  ABORTED (ID_COLLISION; retryable)
    ├── DataLossError                 DATA_LOSS (CORRUPT_RECORD)
    └── InternalError                 INTERNAL, UNKNOWN and anything else

An item that would overdraw is not an error: it is recorded with status INSUFFICIENT_FUNDS.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.errors import LedgerError
from ledger_cluster.status import error_details


class LedgerApiError(LedgerError):
    """A call the server (or this client, for its own limits) refused or could not finish."""

    retryable = False

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        # As describe_rpc_error words a status: the reason only when there is one.
        super().__init__(f"{code.name} {reason}: {message}" if reason else f"{code.name}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: Mapping[str, str] = dict(metadata or {})


class InvalidArgumentError(LedgerApiError):
    pass


class NotFoundError(LedgerApiError):
    pass


class AccountNotFoundError(NotFoundError):
    pass


class TransactionNotFoundError(NotFoundError):
    pass


class TransferNotFoundError(NotFoundError):
    pass


class AlreadyExistsError(LedgerApiError):
    pass


class RequestIdReusedError(AlreadyExistsError):
    pass


class FailedPreconditionError(LedgerApiError):
    pass


class NotPendingError(FailedPreconditionError):
    pass


class ExpiredError(FailedPreconditionError):
    pass


class SettleAmountMismatchError(FailedPreconditionError):
    pass


class OutOfRangeError(LedgerApiError):
    pass


class UnauthenticatedError(LedgerApiError):
    pass


class UnavailableError(LedgerApiError):
    retryable = True


class OutcomeUnknownError(UnavailableError):
    pass


class DeadlineExceededError(LedgerApiError):
    retryable = True


class ResourceExhaustedError(LedgerApiError):
    retryable = True


class AbortedError(LedgerApiError):
    retryable = True


class DataLossError(LedgerApiError):
    pass


class InternalError(LedgerApiError):
    pass


_CLASSES_BY_REASON: dict[str, type[LedgerApiError]] = {
    "ACCOUNT_NOT_FOUND": AccountNotFoundError,
    "TRANSACTION_NOT_FOUND": TransactionNotFoundError,
    "TRANSFER_NOT_FOUND": TransferNotFoundError,
    "REQUEST_ID_REUSED": RequestIdReusedError,
    "TRANSACTION_NOT_PENDING": NotPendingError,
    "TRANSFER_NOT_PENDING": NotPendingError,
    "TRANSACTION_EXPIRED": ExpiredError,
    "TRANSFER_EXPIRED": ExpiredError,
    "SETTLE_AMOUNT_MISMATCH": SettleAmountMismatchError,
    "OUTCOME_UNKNOWN": OutcomeUnknownError,
}

_CLASSES_BY_CODE: dict[grpc.StatusCode, type[LedgerApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}

_CODES_BY_NAME = {code.name: code for code in grpc.StatusCode}


def api_error(
    code: grpc.StatusCode, reason: str, message: str, metadata: Mapping[str, str] | None = None
) -> LedgerApiError:
    """The most precise class for this status: by reason first, then by code."""
    error_class = _CLASSES_BY_REASON.get(reason) or _CLASSES_BY_CODE.get(code, InternalError)
    return error_class(code, reason, message, metadata)


def from_rpc_error(error: grpc.RpcError) -> LedgerApiError:
    details = error_details(error)
    return api_error(details.code, details.reason, details.message, details.metadata)


def from_item_error(error: ledger_pb2.ItemError) -> LedgerApiError:
    """A batch item's error, which carries the same code name and reason as the unary call's."""
    code = _CODES_BY_NAME.get(error.code, grpc.StatusCode.UNKNOWN)
    return api_error(code, error.reason, error.message)
