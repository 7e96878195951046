"""Which exceptions raised while a command is applied become that command's answer, and which
stop the replica.

The rule. An exception is *deterministic* when it is a function of the entry's bytes, the
state before the entry and the code of this release, and nothing else: every replica that
applies the entry to the same state raises it at the same point. Such an exception becomes a
domain outcome of the command that raised it:

- `OUTCOME_CORRUPT_RECORD` for a stored row that does not decode (RecordFormatError) or a state
  that breaks an invariant once the command ran (InvariantViolationError), and
- `OUTCOME_APPLY_FAILED` for any other deterministic error (a bug of a handler: ArithmeticError,
  LookupError, ValueError, TypeError, AttributeError, struct.error),

with every write of that command rolled back (its LMDB write transaction is aborted and the
entry run again without it), the entry still consumed (its applied index stored), a log line
and a count (`AccountsCore.refused_commands`). Every replica answers and stores the same, so
they stay identical; and the entry no longer raises on every replica after every restart
(PySyncObj retries an apply that raises forever: one bad row would stall its whole shard).

Everything else still stops the replica (DESIGN §2 rule 2): a StorageError other than
RecordFormatError (a failed commit, a map that cannot grow), lmdb's own errors (storage.py
lets them through: MapFullError is handled there by growing the map and running the write
again; disk full and I/O errors are not), OSError, MemoryError, RecursionError, a
ReplicaBrokenError about the log itself (an entry applied by another writer), and
KeyboardInterrupt/SystemExit. Those depend on the machine, not on the log: answering one as a
refusal on one replica while its peers apply the entry would make the replicas differ. A stop
is loud, and the restarted replica applies the same entry again.

Two assumptions, stated so they stay true:

- Every replica holds the same state. A row damaged on one replica's disk alone decodes on its
  peers, so that replica refuses what they apply and differs from them; `ledger-dev verify`
  compares the replicas' state digests and names it.
- Answers are built only on the replica that proposed the entry (`answering`), so that code
  never decodes a stored row the other replicas do not decode: whether an entry raises must
  not depend on who waits for it.

Isolation within an entry: a log entry is usually a batch of many callers' commands. A batch
item that raises is refused alone: the entry is run again from the start with that item
answered by its refusal instead of being executed, which at most once per item gives the same
result on every replica. An account that fails its invariants after the batch ran is charged
to the first item that touched it. What cannot be charged to one item refuses the whole entry.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from typing import TypeVar

from ledger_cluster.errors import InvariantViolationError, RecordFormatError, ReplicaBrokenError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import BATCH_ITEMS_MAX

logger = logging.getLogger(__name__)
_Applied = TypeVar("_Applied")

CORRUPT_RECORD_ERRORS: tuple[type[Exception], ...] = (RecordFormatError, InvariantViolationError)
DETERMINISTIC_ERRORS: tuple[type[Exception], ...] = (
    *CORRUPT_RECORD_ERRORS,
    ArithmeticError,
    LookupError,
    ValueError,
    TypeError,
    AttributeError,
    struct.error,
)
# Runs of one entry: each refuses one more item of at most BATCH_ITEMS_MAX, and the last one
# completes or refuses the entry whole.
ENTRY_RUNS_MAX = BATCH_ITEMS_MAX + 1


class ItemFailedError(Exception):
    """Item `position` of the entry's batch raised a deterministic error: the entry is run
    again with `refusal` as that item's answer. Never leaves the core."""

    def __init__(self, position: int, refusal: core_pb2.CommandResult) -> None:
        super().__init__(f"batch item {position}: {refusal.message}")
        self.position = position
        self.refusal = refusal


class AccountInvariantError(InvariantViolationError):
    """An account touched by the entry breaks an invariant once the entry ran."""

    def __init__(self, account_id: int, message: str) -> None:
        super().__init__(message)
        self.account_id = account_id


def refusal_of(error: Exception) -> core_pb2.CommandResult:
    """The answer of a command whose apply raised `error` (one of DETERMINISTIC_ERRORS)."""
    if isinstance(error, CORRUPT_RECORD_ERRORS):
        return core_pb2.CommandResult(
            outcome=core_pb2.OUTCOME_CORRUPT_RECORD,
            message=f"a stored record this command needs is corrupt; nothing applied: {error}",
        )
    return core_pb2.CommandResult(
        outcome=core_pb2.OUTCOME_APPLY_FAILED,
        message=f"the command failed inside the core; nothing applied: {type(error).__name__}: {error}",
    )


def log_refusal(log_index: int, position: int | None, refusal: core_pb2.CommandResult) -> None:
    where = f"log entry {log_index}" if position is None else f"log entry {log_index} item {position}"
    logger.error("%s refused (%s): %s", where, core_pb2.Outcome.Name(refusal.outcome), refusal.message)


def run_isolating(
    attempt: Callable[[Mapping[int, core_pb2.CommandResult]], _Applied], log_index: int
) -> tuple[_Applied | core_pb2.CommandResult, int]:
    """Run `attempt` (one run of entry `log_index`, given the batch items to refuse) until it
    completes, each time with one more item refused: the one that raised. Returns its result,
    or the refusal of the whole entry, and how many items were refused."""
    refused: dict[int, core_pb2.CommandResult] = {}
    for _ in range(ENTRY_RUNS_MAX):
        try:
            return attempt(refused), len(refused)
        except ItemFailedError as failed:
            if failed.position in refused:
                # Not the item after all (it did not run): nothing to charge it to.
                refusal = _entry_refusal(failed, log_index)
                return refusal, len(refused)
            refusal = failed.refusal
            refusal.log_index = log_index
            log_refusal(log_index, failed.position, refusal)
            refused[failed.position] = refusal
        except DETERMINISTIC_ERRORS as error:
            return _entry_refusal(error, log_index), len(refused)
    raise ReplicaBrokenError(f"log entry {log_index} still fails after {ENTRY_RUNS_MAX} runs")


def _entry_refusal(error: Exception, log_index: int) -> core_pb2.CommandResult:
    refusal = refusal_of(error)
    refusal.log_index = log_index
    log_refusal(log_index, None, refusal)
    return refusal
