"""The Python client SDK of ledger-cluster: `LedgerClient` (blocking) and `AsyncLedgerClient`
(asyncio). Typed results, typed errors, generated request ids, safe retries, auto-batched
single creates, and a reserve-then-capture helper. See docs/sdk.md."""

from ledger_cluster.sdk.client import AsyncLedgerClient, new_request_id
from ledger_cluster.sdk.errors import (
    AbortedError,
    AccountNotFoundError,
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    ExpiredError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LedgerApiError,
    NotFoundError,
    NotPendingError,
    OutcomeUnknownError,
    OutOfRangeError,
    RequestIdReusedError,
    ResourceExhaustedError,
    SettleAmountMismatchError,
    TransactionNotFoundError,
    TransferNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from ledger_cluster.sdk.hold import Hold, HoldRefusedError
from ledger_cluster.sdk.retry import RetryPolicy
from ledger_cluster.sdk.sync import LedgerClient
from ledger_cluster.sdk.types import (
    Account,
    NewTransaction,
    NewTransfer,
    Transaction,
    TransactionPage,
    TransactionStatus,
    Transfer,
    TransferStatus,
)

__all__ = [
    "AbortedError",
    "Account",
    "AccountNotFoundError",
    "AlreadyExistsError",
    "AsyncLedgerClient",
    "DataLossError",
    "DeadlineExceededError",
    "ExpiredError",
    "FailedPreconditionError",
    "Hold",
    "HoldRefusedError",
    "InternalError",
    "InvalidArgumentError",
    "LedgerApiError",
    "LedgerClient",
    "NewTransaction",
    "NewTransfer",
    "NotFoundError",
    "NotPendingError",
    "OutOfRangeError",
    "OutcomeUnknownError",
    "RequestIdReusedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SettleAmountMismatchError",
    "Transaction",
    "TransactionNotFoundError",
    "TransactionPage",
    "TransactionStatus",
    "Transfer",
    "TransferNotFoundError",
    "TransferStatus",
    "UnauthenticatedError",
    "UnavailableError",
    "new_request_id",
]
