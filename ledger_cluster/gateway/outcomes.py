"""From what a shard answered to the status a client sees: the core's domain outcomes, the
backend's "not applied" and "unknown" errors, and a batch item's `ItemError`."""

from __future__ import annotations

import grpc

from ledger_cluster.admission import TOO_MANY_REQUESTS_REASON
from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    LedgerError,
    QueueFullError,
    UnknownOutcomeError,
)
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.status import ApiError

# Reasons with which the gateway says "not applied, safe to retry" or "unknown: retry with the
# same request_id"; the nemesis and the bench read them too.
SHARD_UNAVAILABLE_REASON = "SHARD_UNAVAILABLE"
SHARD_BUSY_REASON = "SHARD_BUSY"
DEADLINE_EXCEEDED_REASON = "DEADLINE_EXCEEDED"
OUTCOME_UNKNOWN_REASON = "OUTCOME_UNKNOWN"
NOT_APPLIED_REASONS = frozenset(
    {SHARD_UNAVAILABLE_REASON, SHARD_BUSY_REASON, DEADLINE_EXCEEDED_REASON, TOO_MANY_REQUESTS_REASON}
)

_OUTCOME_STATUS: dict[int, tuple[grpc.StatusCode, str]] = {
    core_pb2.OUTCOME_ACCOUNT_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    core_pb2.OUTCOME_TRANSACTION_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, "TRANSACTION_NOT_FOUND"),
    core_pb2.OUTCOME_TRANSACTION_NOT_PENDING: (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TRANSACTION_NOT_PENDING",
    ),
    core_pb2.OUTCOME_REQUEST_ID_REUSED: (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"),
    core_pb2.OUTCOME_BALANCE_OVERFLOW: (grpc.StatusCode.OUT_OF_RANGE, "BALANCE_OVERFLOW"),
    core_pb2.OUTCOME_INVALID_PAGE_TOKEN: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
    core_pb2.OUTCOME_INVALID_COMMAND: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_COMMAND"),
    core_pb2.OUTCOME_ACCOUNT_ID_COLLISION: (grpc.StatusCode.ABORTED, "ID_COLLISION"),
    core_pb2.OUTCOME_TRANSACTION_ID_COLLISION: (grpc.StatusCode.ABORTED, "ID_COLLISION"),
    core_pb2.OUTCOME_SHARD_MISMATCH: (grpc.StatusCode.UNAVAILABLE, "SHARD_MISMATCH"),
    core_pb2.OUTCOME_CURRENCY_MISMATCH: (grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH"),
    core_pb2.OUTCOME_TRANSACTION_EXPIRED: (grpc.StatusCode.FAILED_PRECONDITION, "TRANSACTION_EXPIRED"),
    core_pb2.OUTCOME_INVALID_SETTLE_AMOUNT: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SETTLE_AMOUNT"),
    core_pb2.OUTCOME_SAME_ACCOUNT: (grpc.StatusCode.INVALID_ARGUMENT, "SAME_ACCOUNT"),
    core_pb2.OUTCOME_TRANSFER_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND"),
    core_pb2.OUTCOME_CREDIT_ACCOUNT_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    core_pb2.OUTCOME_SETTLED_WITH_OTHER_AMOUNT: (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SETTLE_AMOUNT_MISMATCH",
    ),
    core_pb2.OUTCOME_TRANSFER_LEG: (grpc.StatusCode.FAILED_PRECONDITION, "TRANSFER_LEG"),
    # The shard holds a record it cannot use: nothing was applied, and a retry fails alike until
    # the record is repaired (restored from a backup).
    core_pb2.OUTCOME_CORRUPT_RECORD: (grpc.StatusCode.DATA_LOSS, "CORRUPT_RECORD"),
    core_pb2.OUTCOME_APPLY_FAILED: (grpc.StatusCode.INTERNAL, "APPLY_FAILED"),
}
# The same outcomes, named for a transfer when the call was about one.
_TRANSFER_REASONS = {
    core_pb2.OUTCOME_TRANSACTION_EXPIRED: "TRANSFER_EXPIRED",
    core_pb2.OUTCOME_TRANSACTION_NOT_PENDING: "TRANSFER_NOT_PENDING",
    core_pb2.OUTCOME_TRANSACTION_NOT_FOUND: "TRANSFER_NOT_FOUND",
}


def outcome_error(outcome: core_pb2.Outcome.ValueType, message: str, **metadata: str) -> ApiError | None:
    """The status of a domain outcome; None for OK."""
    if outcome == core_pb2.OUTCOME_OK:
        return None
    code, reason = _OUTCOME_STATUS.get(outcome, (grpc.StatusCode.INTERNAL, "INTERNAL"))
    return ApiError(code, reason, message, metadata)


def transfer_outcome_error(
    outcome: core_pb2.Outcome.ValueType, message: str, **metadata: str
) -> ApiError | None:
    """`outcome_error` of a transfer call: a missing account names its side, and the
    transaction reasons are named for the transfer."""
    error = outcome_error(outcome, message, **metadata)
    if error is None:
        return None
    if outcome == core_pb2.OUTCOME_ACCOUNT_NOT_FOUND:
        return ApiError(error.code, error.reason, message, {**metadata, "side": "debit"})
    if outcome == core_pb2.OUTCOME_CREDIT_ACCOUNT_NOT_FOUND:
        return ApiError(error.code, error.reason, message, {**metadata, "side": "credit"})
    if outcome in _TRANSFER_REASONS:
        return ApiError(error.code, _TRANSFER_REASONS[outcome], message, dict(metadata))
    return error


def raise_for_outcome(outcome: core_pb2.Outcome.ValueType, message: str, **metadata: str) -> None:
    failure = outcome_error(outcome, message, **metadata)
    if failure is not None:
        raise failure


def backend_error(error: LedgerError) -> ApiError:
    """What a backend's "not applied" and "unknown" errors mean to a client."""
    if isinstance(error, QueueFullError):
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, SHARD_BUSY_REASON, str(error))
    if isinstance(error, BackendUnavailableError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, SHARD_UNAVAILABLE_REASON, str(error))
    if isinstance(error, BackendTimeoutError):
        return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_EXCEEDED_REASON, str(error))
    if isinstance(error, UnknownOutcomeError):
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            OUTCOME_UNKNOWN_REASON,
            f"the write may or may not have been applied; retry with the same request_id: {error}",
        )
    return ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error: {type(error).__name__}")


def _item_error(error: ApiError) -> ledger_pb2.ItemError:
    """What one item of a batch answers instead of the unary call's status."""
    return ledger_pb2.ItemError(code=error.code.name, reason=error.reason, message=error.message)


def transfer_item_error(error: ApiError) -> ledger_pb2.TransferResult:
    return ledger_pb2.TransferResult(error=_item_error(error))


def item_error(error: ApiError) -> ledger_pb2.TransactionResult:
    return ledger_pb2.TransactionResult(error=_item_error(error))
