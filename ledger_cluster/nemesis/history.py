"""The history of a nemesis run: every client operation with the time it was invoked, the time
it completed, its outcome (ok, failed with a code, or unknown) and its result.

Times are seconds since the run started, from one monotonic clock in this process, so "A
completed before B was invoked" is a real-time order the checks may rely on. Operations are
kept in memory for the checks and appended to a JSON-lines file as they complete.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from ledger_cluster.gateway.outcomes import NOT_APPLIED_REASONS
from ledger_cluster.ids import ACCOUNT_ID_HEX_LENGTH
from ledger_cluster.status import error_details

OUTCOME_OK = "ok"
OUTCOME_FAILED = "failed"
OUTCOME_UNKNOWN = "unknown"

# Operation kinds. A "duplicate" re-sends an earlier create-transaction with its request_id, a
# "duplicate-transfer" an earlier create-transfer with its request_id.
CREATE_ACCOUNT = "create-account"
TOP_UP = "top-up"
PURCHASE = "purchase"
SETTLE = "settle"
CANCEL = "cancel"
DUPLICATE = "duplicate"
CREATE_TRANSFER = "create-transfer"
DUPLICATE_TRANSFER = "duplicate-transfer"
SETTLE_TRANSFER = "settle-transfer"
CANCEL_TRANSFER = "cancel-transfer"
GET_ACCOUNT = "get-account"
GET_TRANSACTION = "get-transaction"
LIST_TRANSACTIONS = "list-transactions"
GET_TRANSFER = "get-transfer"
TRANSACTION_WRITES = (TOP_UP, PURCHASE, DUPLICATE)
TRANSFER_WRITES = (CREATE_TRANSFER, DUPLICATE_TRANSFER)
TRANSFER_FINISHES = (SETTLE_TRANSFER, CANCEL_TRANSFER)
WRITES = (CREATE_ACCOUNT, TOP_UP, PURCHASE, SETTLE, CANCEL, DUPLICATE, *TRANSFER_WRITES, *TRANSFER_FINISHES)
READS = (GET_ACCOUNT, GET_TRANSACTION, LIST_TRANSACTIONS, GET_TRANSFER)

# A run that would record more operations than this stops its clients: the checks hold the
# whole history in memory.
HISTORY_OPERATIONS_MAX = 2_000_000

# Failures after which the gateway promises that nothing was applied. Every other failure of a
# write (a transport error, a deadline the client itself hit, OUTCOME_UNKNOWN) leaves it open.
_NOT_APPLIED_REASONS = NOT_APPLIED_REASONS
_DOMAIN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}
_DOMAIN_CODE_NAMES = {code.name for code in _DOMAIN_CODES}


@dataclass
class Operation:
    op_id: int
    client: int
    kind: str
    invoke_seconds: float
    request: dict[str, Any]
    complete_seconds: float = 0.0
    outcome: str = ""
    code: str = ""
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def is_write(self) -> bool:
        return self.kind in WRITES

    @property
    def account_id(self) -> str | None:
        """The account the operation is about: its request's, the one its transaction's or
        transfer's id starts with, or a transfer's debit account (whose shard decides it)."""
        if "account_id" in self.request:
            return str(self.request["account_id"])
        if "debit_account_id" in self.request:
            return str(self.request["debit_account_id"])
        for key in ("transaction_id", "transfer_id"):
            if key in self.request:
                return str(self.request[key])[:ACCOUNT_ID_HEX_LENGTH]
        return None

    @property
    def decided(self) -> bool:
        """Whether the service said what became of it: acknowledged, or refused on its merits;
        not failed for want of a shard able to decide it, nor left unknown."""
        return self.outcome == OUTCOME_OK or (
            self.outcome == OUTCOME_FAILED and self.code in _DOMAIN_CODE_NAMES
        )


def classify_error(error: grpc.RpcError) -> tuple[str, str, str]:
    """(outcome, code name, ErrorInfo reason) of a failed call. A failure is definite only when
    the service said what happened: a domain error, or a reason that promises "not applied"."""
    details = error_details(error)
    return classify_item_error(details.code.name, details.reason)


def classify_item_error(code: str, reason: str) -> tuple[str, str, str]:
    """The same, for one item of a batch call (its error carries the code's name)."""
    if code in _DOMAIN_CODE_NAMES or reason in _NOT_APPLIED_REASONS:
        return OUTCOME_FAILED, code, reason
    return OUTCOME_UNKNOWN, code, reason


class History:
    """Thread-safe: clients record operations from their own threads."""

    def __init__(self, path: Path | None, started_seconds: float | None = None) -> None:
        self._started_seconds = time.monotonic() if started_seconds is None else started_seconds
        self._lock = threading.Lock()
        self._operations: list[Operation] = []
        self._file: TextIO | None = None if path is None else path.open("w", encoding="utf-8")

    def now(self) -> float:
        return time.monotonic() - self._started_seconds

    @property
    def is_full(self) -> bool:
        return len(self._operations) >= HISTORY_OPERATIONS_MAX

    def invoke(self, client: int, kind: str, request: dict[str, Any]) -> Operation:
        with self._lock:
            operation = Operation(
                op_id=len(self._operations),
                client=client,
                kind=kind,
                invoke_seconds=self.now(),
                request=request,
            )
            self._operations.append(operation)
        return operation

    def complete(
        self, operation: Operation, outcome: str, result: dict[str, Any], code: str = "OK", reason: str = ""
    ) -> None:
        operation.complete_seconds = self.now()
        operation.outcome = outcome
        operation.result = result
        operation.code = code
        operation.reason = reason
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(asdict(operation), sort_keys=True) + "\n")

    def fail(self, operation: Operation, error: grpc.RpcError) -> None:
        outcome, code, reason = classify_error(error)
        self.complete(operation, outcome, {}, code, reason)

    def operations(self) -> list[Operation]:
        """Every operation, in invocation order; one that never completed (its client died)
        counts as unknown, since it may have been applied."""
        with self._lock:
            for operation in self._operations:
                if not operation.outcome:
                    operation.outcome = OUTCOME_UNKNOWN
                    operation.code = "NEVER_COMPLETED"
                    operation.complete_seconds = self.now()
            return list(self._operations)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
