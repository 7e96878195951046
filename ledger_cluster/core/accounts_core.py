"""AccountsCore: the deterministic state machine of one shard.

It reads nothing but its command and its LMDB state: `now` and every new id arrive inside the
command, so every replica applying the same log gets the same bytes. Domain outcomes are data
(`Outcome`); an exception out of `apply` means the replica is broken and must stop.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from ledger_cluster.api.v1 import core_pb2, ledger_pb2
from ledger_cluster.core import tables
from ledger_cluster.errors import (
    InvariantViolationError,
    ReplicaBrokenError,
    SnapshotCorruptError,
    StorageLayoutError,
)
from ledger_cluster.ids import format_account_id, format_transaction_id
from ledger_cluster.limits import (
    BATCH_ITEMS_MAX,
    DESCRIPTION_BYTES_MAX,
    INT64_MAX,
    PAGE_SIZE_MAX,
    REQUEST_ID_BYTES_MAX,
)
from ledger_cluster.sharding import shard_key, shard_key_of_account_bytes
from ledger_cluster.storage import (
    SNAPSHOT_FORMAT_VERSION,
    ReadTransaction,
    SnapshotHeader,
    Storage,
    WriteTransaction,
    check_snapshot,
)

logger = logging.getLogger(__name__)

# The sequence of an account's transactions is a uint64; a scan bounded by this never stops short.
TRANSACTIONS_PER_ACCOUNT_MAX = 2**64

Outcome = core_pb2.Outcome
Status = ledger_pb2.TransactionStatus
PENDING = ledger_pb2.TRANSACTION_STATUS_PENDING
SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
CANCELLED = ledger_pb2.TRANSACTION_STATUS_CANCELLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS


def require_invariant(condition: bool, message: str) -> None:
    """Like assert, but survives `python -O`: a broken invariant stops the replica."""
    if not condition:
        raise InvariantViolationError(message)


# -- public views of stored records -------------------------------------------------------


def account_view(record: core_pb2.AccountRecord) -> ledger_pb2.Account:
    return ledger_pb2.Account(
        id=format_account_id(record.account_id),
        available_balance=record.available_balance,
        settled_balance=record.settled_balance,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def original_account_view(record: core_pb2.AccountRecord) -> ledger_pb2.Account:
    """The account exactly as its CreateAccount first answered: what a repeat returns."""
    return ledger_pb2.Account(
        id=format_account_id(record.account_id),
        created_at=record.created_at,
        updated_at=record.created_at,
    )


def transaction_view(record: core_pb2.TransactionRecord) -> ledger_pb2.Transaction:
    return ledger_pb2.Transaction(
        id=format_transaction_id(record.account_id, record.transaction_number),
        amount=record.amount,
        description=record.description,
        status=record.status,
        created_at=record.created_at,
        updated_at=record.updated_at,
        account_id=format_account_id(record.account_id),
    )


def original_transaction_view(record: core_pb2.TransactionRecord) -> ledger_pb2.Transaction:
    """The transaction exactly as its CreateTransaction first answered."""
    view = transaction_view(record)
    view.status = record.initial_status
    view.updated_at = record.created_at
    return view


# -- balance contributions: what one transaction adds to its account's counters -------------


def _settled_part(record: core_pb2.TransactionRecord | None) -> int:
    return record.amount if record is not None and record.status == SETTLED else 0


def _pending_debit_part(record: core_pb2.TransactionRecord | None) -> int:
    if record is not None and record.status == PENDING and record.amount < 0:
        return -record.amount
    return 0


def _pending_credit_part(record: core_pb2.TransactionRecord | None) -> int:
    if record is not None and record.status == PENDING and record.amount > 0:
        return record.amount
    return 0


def check_account_counters(record: core_pb2.AccountRecord) -> None:
    where = f"account {record.account_id:016x}"
    require_invariant(
        record.available_balance == record.settled_balance - record.pending_debits,
        f"{where}: available {record.available_balance} != settled {record.settled_balance}"
        f" - pending debits {record.pending_debits}",
    )
    require_invariant(record.available_balance >= 0, f"{where}: available balance is negative")
    require_invariant(record.pending_debits >= 0, f"{where}: pending debits are negative")
    require_invariant(record.pending_credits >= 0, f"{where}: pending credits are negative")
    require_invariant(
        record.settled_balance + record.pending_credits <= INT64_MAX,
        f"{where}: settled balance plus pending credits leave int64",
    )


# -- one apply's changes, checked before commit ---------------------------------------------


@dataclass
class _AccountChange:
    before: core_pb2.AccountRecord | None
    after: core_pb2.AccountRecord | None = None
    transaction_deltas: list[tuple[core_pb2.TransactionRecord | None, core_pb2.TransactionRecord]] = field(
        default_factory=list
    )


class _Changes:
    """Reads and writes of one apply. Writes go to an overlay that later reads see, and through
    to the write transaction unless this is a dry run (a replayed entry evaluated on a read
    transaction, so nothing can be written and nothing needs undoing). The overlay also records
    what changed, so the balance invariants can be checked against exactly that: each account's
    counters must move by the sum of its transactions' moves.

    Records handed to `put_account` and `put_transaction` are kept, not copied (a batch entry
    touches the same account many times): callers must not change them afterwards, except an
    account record that `get_account` returned, which is changed in place and put back.

    `answering` says whether anybody waits for this apply's results. Only the replica that
    proposed the entry does; the others skip building the views, which changes no state."""

    def __init__(self, view: ReadTransaction, transaction: WriteTransaction | None, answering: bool) -> None:
        self._view = view
        self._transaction = transaction
        self.answering = answering
        self._written: dict[tuple[str, bytes], bytes] = {}
        self._accounts: dict[int, _AccountChange] = {}

    def _get(self, table: str, key: bytes) -> bytes | None:
        written = self._written.get((table, key))
        return written if written is not None else self._view.get(table, key)

    def _put(self, table: str, key: bytes, value: bytes) -> None:
        self._written[(table, key)] = value
        if self._transaction is not None:
            self._transaction.put(table, key, value)

    def get_account(self, account_id: int) -> core_pb2.AccountRecord | None:
        change = self._accounts.get(account_id)
        if change is not None and change.after is not None:
            return change.after
        data = self._get(tables.ACCOUNTS, tables.account_key(account_id))
        return None if data is None else tables.decode_account(data)

    def get_transaction(self, account_id: int, number: int) -> core_pb2.TransactionRecord | None:
        data = self._get(tables.TRANSACTIONS, tables.transaction_key(account_id, number))
        return None if data is None else tables.decode_transaction(data)

    def _change_of(self, account_id: int) -> _AccountChange:
        if account_id not in self._accounts:
            self._accounts[account_id] = _AccountChange(before=self.get_account(account_id))
        return self._accounts[account_id]

    def get_request(self, account_id: int, request_id: str) -> int | None:
        data = self._get(tables.IDEMPOTENCY, tables.idempotency_key(account_id, request_id))
        return None if data is None else tables.decode_u64(data)

    def put_account(self, record: core_pb2.AccountRecord) -> None:
        """Kept here and written once per entry by `flush`."""
        self._change_of(record.account_id).after = record

    def flush(self) -> None:
        for account_id, change in sorted(self._accounts.items()):
            if change.after is not None:
                self._put(tables.ACCOUNTS, tables.account_key(account_id), tables.encode_record(change.after))

    def put_transaction(
        self, before: core_pb2.TransactionRecord | None, record: core_pb2.TransactionRecord
    ) -> None:
        self._change_of(record.account_id).transaction_deltas.append((before, record))
        key = tables.transaction_key(record.account_id, record.transaction_number)
        self._put(tables.TRANSACTIONS, key, tables.encode_record(record))

    def put_raw(self, table: str, key: bytes, value: bytes) -> None:
        self._put(table, key, value)

    def check(self) -> None:
        for account_id, change in sorted(self._accounts.items()):
            _check_account_change(account_id, change)


def _check_account_change(account_id: int, change: _AccountChange) -> None:
    where = f"account {account_id:016x}"
    require_invariant(change.after is not None, f"{where}: transaction written, account not")
    assert change.after is not None  # narrowed for mypy; checked just above
    before = change.before or core_pb2.AccountRecord(account_id=account_id)
    expected_settled = before.settled_balance
    expected_debits = before.pending_debits
    expected_credits = before.pending_credits
    for old, new in change.transaction_deltas:
        require_invariant(new.account_id == account_id, f"{where}: foreign transaction")
        expected_settled += _settled_part(new) - _settled_part(old)
        expected_debits += _pending_debit_part(new) - _pending_debit_part(old)
        expected_credits += _pending_credit_part(new) - _pending_credit_part(old)
    after = change.after
    require_invariant(
        (after.settled_balance, after.pending_debits, after.pending_credits)
        == (expected_settled, expected_debits, expected_credits),
        f"{where}: counters moved to ({after.settled_balance}, {after.pending_debits},"
        f" {after.pending_credits}), transactions say ({expected_settled}, {expected_debits},"
        f" {expected_credits})",
    )
    check_account_counters(after)


# -- results ---------------------------------------------------------------------------------


def _failure(outcome: core_pb2.Outcome.ValueType, message: str) -> core_pb2.CommandResult:
    return core_pb2.CommandResult(outcome=outcome, message=message)


def _ok_account(
    changes: _Changes,
    view_of: Callable[[core_pb2.AccountRecord], ledger_pb2.Account],
    record: core_pb2.AccountRecord,
) -> core_pb2.CommandResult:
    if not changes.answering:
        return core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK)
    return core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK, account=view_of(record))


def _ok_transaction(
    changes: _Changes,
    view_of: Callable[[core_pb2.TransactionRecord], ledger_pb2.Transaction],
    record: core_pb2.TransactionRecord,
) -> core_pb2.CommandResult:
    if not changes.answering:
        return core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK)
    return core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK, transaction=view_of(record))


def _same_transaction_payload(
    record: core_pb2.TransactionRecord, command: core_pb2.CreateTransactionCommand
) -> bool:
    return (
        record.amount == command.amount
        and record.description == command.description
        and record.settled_requested == command.settled
        and record.request_id == command.request_id
    )


def _invalid_create_transaction(command: core_pb2.CreateTransactionCommand) -> str | None:
    if command.amount == 0:
        return "amount must not be zero"
    if len(command.description.encode()) > DESCRIPTION_BYTES_MAX:
        return f"description exceeds {DESCRIPTION_BYTES_MAX} UTF-8 bytes"
    if len(command.request_id.encode()) > REQUEST_ID_BYTES_MAX:
        return f"request_id exceeds {REQUEST_ID_BYTES_MAX} UTF-8 bytes"
    return None


# -- command handlers --------------------------------------------------------------------------


def _create_account(
    changes: _Changes, command: core_pb2.CreateAccountCommand, now: int
) -> core_pb2.CommandResult:
    if len(command.request_id.encode()) > REQUEST_ID_BYTES_MAX:
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, "request_id too long")
    existing = changes.get_account(command.account_id)
    if existing is not None:
        same_request = bool(command.request_id) and existing.request_id == command.request_id
        # Without a request_id, only a re-delivery of this very command (same `now`) is a repeat.
        same_command = existing.request_id == command.request_id and existing.created_at == now
        if same_request or same_command:
            return _ok_account(changes, original_account_view, existing)
        return _failure(core_pb2.OUTCOME_ACCOUNT_ID_COLLISION, "account id already taken")
    record = core_pb2.AccountRecord(
        account_id=command.account_id,
        created_at=now,
        updated_at=now,
        request_id=command.request_id,
    )
    changes.put_account(record)
    return _ok_account(changes, account_view, record)


def _create_transaction(
    changes: _Changes, command: core_pb2.CreateTransactionCommand, now: int
) -> core_pb2.CommandResult:
    problem = _invalid_create_transaction(command)
    if problem is not None:
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, problem)
    account = changes.get_account(command.account_id)
    if account is None:
        return _failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
    if command.request_id:
        number = changes.get_request(command.account_id, command.request_id)
        if number is not None:
            earlier = changes.get_transaction(command.account_id, number)
            require_invariant(earlier is not None, "idempotency record without transaction")
            assert earlier is not None
            if _same_transaction_payload(earlier, command):
                return _ok_transaction(changes, original_transaction_view, earlier)
            return _failure(
                core_pb2.OUTCOME_REQUEST_ID_REUSED,
                "request_id was used for a different transaction on this account",
            )
    existing = changes.get_transaction(command.account_id, command.transaction_number)
    if existing is not None:
        if _same_transaction_payload(existing, command) and existing.created_at == now:
            return _ok_transaction(changes, original_transaction_view, existing)
        return _failure(core_pb2.OUTCOME_TRANSACTION_ID_COLLISION, "transaction id already taken")
    return _record_new_transaction(changes, account, command, now)


def _record_new_transaction(
    changes: _Changes,
    account: core_pb2.AccountRecord,
    command: core_pb2.CreateTransactionCommand,
    now: int,
) -> core_pb2.CommandResult:
    amount = command.amount
    if amount > 0 and account.settled_balance + account.pending_credits + amount > INT64_MAX:
        # Pending top-ups count too, so settling one later can never overflow.
        return _failure(core_pb2.OUTCOME_BALANCE_OVERFLOW, "balance would exceed int64")
    status = SETTLED if command.settled else PENDING
    if amount < 0 and account.available_balance + amount < 0:
        status = INSUFFICIENT_FUNDS
    record = core_pb2.TransactionRecord(
        account_id=command.account_id,
        transaction_number=command.transaction_number,
        amount=amount,
        description=command.description,
        status=status,
        initial_status=status,
        settled_requested=command.settled,
        request_id=command.request_id,
        created_at=now,
        updated_at=now,
        sequence=account.transaction_count,
    )
    _move_balances(account, None, record, now)
    account.transaction_count += 1
    changes.put_transaction(None, record)
    changes.put_account(account)
    changes.put_raw(
        tables.ACCOUNT_TRANSACTIONS,
        tables.sequence_key(command.account_id, record.sequence),
        tables.encode_u64(command.transaction_number),
    )
    if command.request_id:
        changes.put_raw(
            tables.IDEMPOTENCY,
            tables.idempotency_key(command.account_id, command.request_id),
            tables.encode_u64(command.transaction_number),
        )
    return _ok_transaction(changes, transaction_view, record)


def _move_balances(
    account: core_pb2.AccountRecord,
    before: core_pb2.TransactionRecord | None,
    after: core_pb2.TransactionRecord,
    now: int,
) -> None:
    """Apply one transaction's change of status to its account's counters."""
    settled_delta = _settled_part(after) - _settled_part(before)
    debit_delta = _pending_debit_part(after) - _pending_debit_part(before)
    account.settled_balance += settled_delta
    account.pending_debits += debit_delta
    account.pending_credits += _pending_credit_part(after) - _pending_credit_part(before)
    account.available_balance = account.settled_balance - account.pending_debits
    if settled_delta or debit_delta:
        account.updated_at = now


def _finish_pending(
    changes: _Changes,
    account_id: int,
    transaction_number: int,
    target: ledger_pb2.TransactionStatus.ValueType,
    now: int,
) -> core_pb2.CommandResult:
    """Settle or cancel: PENDING moves to `target`; `target` itself is returned unchanged."""
    before = changes.get_transaction(account_id, transaction_number)
    if before is None:
        return _failure(core_pb2.OUTCOME_TRANSACTION_NOT_FOUND, "transaction not found")
    if before.status == target:
        return _ok_transaction(changes, transaction_view, before)
    if before.status != PENDING:
        status_name = ledger_pb2.TransactionStatus.Name(before.status)
        return _failure(
            core_pb2.OUTCOME_TRANSACTION_NOT_PENDING, f"transaction is {status_name}, not pending"
        )
    account = changes.get_account(account_id)
    require_invariant(account is not None, f"transaction of missing account {account_id:016x}")
    assert account is not None
    after = core_pb2.TransactionRecord()
    after.CopyFrom(before)
    after.status = target
    after.updated_at = now
    _move_balances(account, before, after, now)
    changes.put_transaction(before, after)
    changes.put_account(account)
    return _ok_transaction(changes, transaction_view, after)


_PAYLOAD_TYPES: dict[
    int,
    type[core_pb2.CreateAccountCommand]
    | type[core_pb2.CreateTransactionCommand]
    | type[core_pb2.SettleTransactionCommand]
    | type[core_pb2.CancelTransactionCommand],
] = {
    core_pb2.COMMAND_TYPE_CREATE_ACCOUNT: core_pb2.CreateAccountCommand,
    core_pb2.COMMAND_TYPE_CREATE_TRANSACTION: core_pb2.CreateTransactionCommand,
    core_pb2.COMMAND_TYPE_SETTLE_TRANSACTION: core_pb2.SettleTransactionCommand,
    core_pb2.COMMAND_TYPE_CANCEL_TRANSACTION: core_pb2.CancelTransactionCommand,
}


def _execute_batch(
    changes: _Changes, payload: bytes, owns_account: Callable[[int], bool]
) -> core_pb2.CommandResult:
    """Every item in order against the same overlay, so each sees the ones before it; one item's
    domain failure is its own answer and stops nothing else."""
    batch = core_pb2.BatchCommand.FromString(payload)
    if len(batch.commands) > BATCH_ITEMS_MAX:
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, f"a batch holds at most {BATCH_ITEMS_MAX} items")
    result = core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK)
    for item in batch.commands:
        item_result = _execute(changes, item, owns_account, nested=True)
        if changes.answering:
            result.item_results.append(item_result)
    return result


def _execute(
    changes: _Changes, command_bytes: bytes, owns_account: Callable[[int], bool], nested: bool = False
) -> core_pb2.CommandResult:
    try:
        envelope = core_pb2.CommandEnvelope.FromString(command_bytes)
        kind = envelope.type
        if kind == core_pb2.COMMAND_TYPE_NOOP:
            return core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK)
        if kind == core_pb2.COMMAND_TYPE_BATCH:
            if nested:
                return _failure(core_pb2.OUTCOME_INVALID_COMMAND, "a batch item cannot be a batch")
            return _execute_batch(changes, envelope.payload, owns_account)
        payload_type = _PAYLOAD_TYPES.get(kind)
        if payload_type is None:
            return _failure(core_pb2.OUTCOME_INVALID_COMMAND, f"unknown command type {kind}")
        command = payload_type.FromString(envelope.payload)
    except DecodeError as error:
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, f"undecodable command: {error}")
    if not owns_account(command.account_id):
        # A gateway with another config routed this here; storing it would strand the account
        # in a shard that will never be asked for it.
        return _failure(core_pb2.OUTCOME_SHARD_MISMATCH, "account belongs to another shard")
    now = envelope.now
    if isinstance(command, core_pb2.CreateAccountCommand):
        return _create_account(changes, command, now)
    if isinstance(command, core_pb2.CreateTransactionCommand):
        return _create_transaction(changes, command, now)
    target = SETTLED if isinstance(command, core_pb2.SettleTransactionCommand) else CANCELLED
    return _finish_pending(changes, command.account_id, command.transaction_number, target, now)


# -- reads -------------------------------------------------------------------------------------


def _read_failure(outcome: core_pb2.Outcome.ValueType, message: str) -> core_pb2.ReadResult:
    return core_pb2.ReadResult(outcome=outcome, message=message)


def _read_transaction(
    view: ReadTransaction, account_id: int, number: int
) -> core_pb2.TransactionRecord | None:
    data = view.get(tables.TRANSACTIONS, tables.transaction_key(account_id, number))
    return None if data is None else tables.decode_transaction(data)


def _read_account(view: ReadTransaction, account_id: int) -> core_pb2.AccountRecord | None:
    data = view.get(tables.ACCOUNTS, tables.account_key(account_id))
    return None if data is None else tables.decode_account(data)


def _list_transactions(view: ReadTransaction, query: core_pb2.ListTransactionsQuery) -> core_pb2.ReadResult:
    if not 1 <= query.limit <= PAGE_SIZE_MAX:
        return _read_failure(core_pb2.OUTCOME_INVALID_COMMAND, f"limit must be 1..{PAGE_SIZE_MAX}")
    account = _read_account(view, query.account_id)
    if account is None:
        return _read_failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
    if query.start_sequence > account.transaction_count:
        return _read_failure(core_pb2.OUTCOME_INVALID_PAGE_TOKEN, "page token is past the end")
    prefix = tables.account_key(query.account_id)
    start = tables.sequence_key(query.account_id, query.start_sequence)
    result = core_pb2.ReadResult(outcome=core_pb2.OUTCOME_OK)
    for _, number in view.scan(tables.ACCOUNT_TRANSACTIONS, start, prefix, query.limit):
        record = _read_transaction(view, query.account_id, tables.decode_u64(number))
        require_invariant(record is not None, "sequence index points at a missing transaction")
        assert record is not None
        result.transactions.append(transaction_view(record))
    following = query.start_sequence + len(result.transactions)
    result.next_sequence = following if following < account.transaction_count else 0
    return result


def _read(
    view: ReadTransaction, query: core_pb2.ReadQuery, owns_account: Callable[[int], bool]
) -> core_pb2.ReadResult:
    kind = query.WhichOneof("query")
    if kind is not None and not owns_account(getattr(query, kind).account_id):
        return _read_failure(core_pb2.OUTCOME_SHARD_MISMATCH, "account belongs to another shard")
    if kind == "get_account":
        account = _read_account(view, query.get_account.account_id)
        if account is None:
            return _read_failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
        return core_pb2.ReadResult(outcome=core_pb2.OUTCOME_OK, account=account_view(account))
    if kind == "get_transaction":
        wanted = query.get_transaction
        record = _read_transaction(view, wanted.account_id, wanted.transaction_number)
        if record is None:
            return _read_failure(core_pb2.OUTCOME_TRANSACTION_NOT_FOUND, "transaction not found")
        return core_pb2.ReadResult(outcome=core_pb2.OUTCOME_OK, transaction=transaction_view(record))
    if kind == "list_transactions":
        return _list_transactions(view, query.list_transactions)
    return _read_failure(core_pb2.OUTCOME_INVALID_COMMAND, "empty read query")


# -- whole-state checks ---------------------------------------------------------------------


# What a transaction's status can become from the status it was created with: a settled or
# refused one never changes; a pending one is settled or cancelled once.
_REACHABLE_STATUSES: dict[int, frozenset[int]] = {
    SETTLED: frozenset({SETTLED}),
    INSUFFICIENT_FUNDS: frozenset({INSUFFICIENT_FUNDS}),
    PENDING: frozenset({PENDING, SETTLED, CANCELLED}),
}


def _record_problems(view: ReadTransaction) -> list[str]:
    """Every row of every table well-formed and referenced as the key layout says: a snapshot
    can pass its checksum and still describe an impossible state."""
    problems: list[str] = []
    for key, value in view.iterate(tables.ACCOUNTS):
        account = tables.decode_account(value)
        if len(key) != 8 or account.account_id != tables.decode_u64(key):
            problems.append(f"account row {key.hex()} does not match its record")
    for key, value in view.iterate(tables.TRANSACTIONS):
        record = tables.decode_transaction(value)
        where = f"transaction row {key.hex()}"
        if len(key) != 16 or key != tables.transaction_key(record.account_id, record.transaction_number):
            problems.append(f"{where} does not match its record")
        elif view.get(tables.ACCOUNTS, key[:8]) is None:
            problems.append(f"{where} belongs to a missing account")
        elif record.status not in _REACHABLE_STATUSES.get(record.initial_status, ()):
            # An unknown status restores cleanly, then stops every replica that touches it.
            problems.append(
                f"{where} has status {record.status} after initial status {record.initial_status},"
                " which no command produces"
            )
        elif view.get(
            tables.ACCOUNT_TRANSACTIONS, tables.sequence_key(record.account_id, record.sequence)
        ) != tables.encode_u64(record.transaction_number):
            problems.append(f"{where} is not in its account's order index")
        elif record.request_id and view.get(
            tables.IDEMPOTENCY, tables.idempotency_key(record.account_id, record.request_id)
        ) != tables.encode_u64(record.transaction_number):
            problems.append(f"{where} has a request_id without its idempotency row")
    for table in (tables.ACCOUNT_TRANSACTIONS, tables.IDEMPOTENCY):
        for key, value in view.iterate(table):
            if len(key) < 8 or len(value) != 8 or view.get(tables.TRANSACTIONS, key[:8] + value) is None:
                problems.append(f"{table} row {key.hex()} points at no transaction")
    return problems


def verify_state(view: ReadTransaction) -> list[str]:
    """Structure and balances of the whole state; one line per problem found."""
    try:
        problems = _record_problems(view)
    except (DecodeError, ValueError) as error:
        return [f"undecodable record: {error}"]
    return problems + verify_balances(view)


def verify_balances(view: ReadTransaction) -> list[str]:
    """Recompute every account's counters from its transactions; describe each mismatch."""
    problems: list[str] = []
    for key, value in view.iterate(tables.ACCOUNTS):
        account = tables.decode_account(value)
        settled = debits = credits = count = 0
        for _, number in view.scan(tables.ACCOUNT_TRANSACTIONS, key, key, TRANSACTIONS_PER_ACCOUNT_MAX):
            record = _read_transaction(view, account.account_id, tables.decode_u64(number))
            if record is None:
                problems.append(f"account {key.hex()}: index points at a missing transaction")
                continue
            settled += _settled_part(record)
            debits += _pending_debit_part(record)
            credits += _pending_credit_part(record)
            count += 1
        stored = (account.settled_balance, account.pending_debits, account.pending_credits)
        if stored != (settled, debits, credits) or count != account.transaction_count:
            problems.append(
                f"account {key.hex()}: stored (settled, pending debits, pending credits, count)"
                f" {(*stored, account.transaction_count)} but transactions give"
                f" {(settled, debits, credits, count)}"
            )
        try:
            check_account_counters(account)
        except InvariantViolationError as error:
            problems.append(str(error))
    return problems


def _state_digest_in(view: ReadTransaction) -> str:
    """sha256 over every data record of the view, in table and key order."""
    digest = hashlib.sha256()
    for table_id, name in sorted(tables.SNAPSHOT_TABLES.items()):
        for key, value in view.iterate(name):
            digest.update(table_id.to_bytes(1, "big"))
            digest.update(len(key).to_bytes(4, "big") + key)
            digest.update(len(value).to_bytes(4, "big") + value)
    return digest.hexdigest()


# -- the core ----------------------------------------------------------------------------------


class AccountsCore:
    """The state machine of the shard whose keys lie in [lower_bound, upper_bound]."""

    def __init__(self, storage: Storage, lower_bound: int, upper_bound: int) -> None:
        self._storage = storage
        self.lower_bound = lower_bound
        self.upper_bound = upper_bound
        storage.write(self._initialize_meta)

    @classmethod
    def open(cls, directory: Path, lower_bound: int, upper_bound: int) -> AccountsCore:
        """The core of the shard whose LMDB environment lives in `directory`."""
        storage = Storage(directory, tables.TABLE_NAMES)
        try:
            return cls(storage, lower_bound, upper_bound)
        except BaseException:
            storage.close()
            raise

    def close(self) -> None:
        self._storage.close()

    def _initialize_meta(self, transaction: WriteTransaction) -> None:
        stored = transaction.get(tables.META, tables.META_SHARD_BOUNDS)
        wanted = tables.encode_bounds(self.lower_bound, self.upper_bound)
        if stored is None:
            transaction.put(tables.META, tables.META_SHARD_BOUNDS, wanted)
            transaction.put(
                tables.META, tables.META_FORMAT_VERSION, tables.encode_u64(tables.STATE_FORMAT_VERSION)
            )
            transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(0))
        elif stored != wanted:
            lower, upper = tables.decode_bounds(stored)
            raise StorageLayoutError(
                f"{self._storage.directory} holds shard keys {lower}..{upper}, not"
                f" {self.lower_bound}..{self.upper_bound}: it belongs to another shard layout"
            )

    @staticmethod
    def _applied_index_in(view: ReadTransaction) -> int:
        data = view.get(tables.META, tables.META_APPLIED_INDEX)
        return 0 if data is None else tables.decode_u64(data)

    def applied_index(self) -> int:
        with self._storage.read() as view:
            return self._applied_index_in(view)

    def storage_bytes(self) -> tuple[int, int]:
        """(used, reserved map) bytes of the shard's LMDB environment."""
        return self._storage.used_bytes(), self._storage.map_size_bytes

    def owns_key(self, key: int) -> bool:
        return self.lower_bound <= key <= self.upper_bound

    def owns_account(self, account_id: int) -> bool:
        return self.owns_key(shard_key(account_id))

    def apply(self, command_bytes: bytes, log_index: int, answering: bool = True) -> core_pb2.CommandResult:
        """Apply log entry `log_index` exactly once.

        With `answering` false (nobody waits for this entry's result) the state changes are
        the same, but a success carries no account or transaction and a batch no item results.

        An entry at or below the stored applied index was applied before (PySyncObj replays its
        journal after every restart): it is evaluated as a dry run on a read transaction, so it
        changes nothing and answers what a repeat of it answers now. That answer is
        the original one for every entry that stored something (ids make repeats return the
        stored object); an entry that originally failed without storing anything may answer
        differently. No caller waits on a replayed entry, and keeping every entry's result
        instead would grow without bound."""
        if log_index <= 0:
            raise ReplicaBrokenError(f"log index must be positive, got {log_index}")
        with self._storage.read() as view:
            if log_index <= self._applied_index_in(view):
                return self._execute_checked(view, None, command_bytes, log_index, answering)

        def run(transaction: WriteTransaction) -> core_pb2.CommandResult:
            applied_index = self._applied_index_in(transaction)
            if log_index <= applied_index:
                # Only this replica's apply thread writes; a higher index here means another
                # process wrote to the same files.
                raise ReplicaBrokenError(
                    f"entry {log_index} was applied by another writer (stored index {applied_index})"
                )
            result = self._execute_checked(transaction, transaction, command_bytes, log_index, answering)
            transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(log_index))
            return result

        return self._storage.write(run)

    def _execute_checked(
        self,
        view: ReadTransaction,
        transaction: WriteTransaction | None,
        command_bytes: bytes,
        log_index: int,
        answering: bool,
    ) -> core_pb2.CommandResult:
        changes = _Changes(view, transaction, answering)
        result = _execute(changes, command_bytes, self.owns_account)
        changes.flush()
        changes.check()
        result.log_index = log_index
        for item in result.item_results:
            item.log_index = log_index
        return result

    def read(self, query: core_pb2.ReadQuery) -> core_pb2.ReadResult:
        with self._storage.read() as view:
            result = _read(view, query, self.owns_account)
            result.applied_index = self._applied_index_in(view)
            return result

    def verify(self) -> list[str]:
        with self._storage.read() as view:
            return verify_state(view)

    def state_digest(self) -> tuple[int, str]:
        """(applied index, sha256 over every data record) from one view: equal on replicas
        that applied the same log prefix."""
        with self._storage.read() as view:
            return self._applied_index_in(view), _state_digest_in(view)

    def verify_report(self) -> tuple[int, str, list[str]]:
        """(applied index, state digest, problems) from one view: what `verify` finds, about
        exactly the state that the digest describes."""
        with self._storage.read() as view:
            return self._applied_index_in(view), _state_digest_in(view), verify_state(view)

    def write_snapshot(
        self,
        path: str | Path,
        metadata: bytes = b"",
        on_view_open: Callable[[int], None] | None = None,
    ) -> SnapshotHeader:
        """Snapshot of this shard at its applied index; `metadata` travels along, checksummed.

        `on_view_open(applied_index)` runs once the consistent read view is open, before any
        record is written: from then on applies may go on while the records are streamed."""

        def header_of(view: ReadTransaction, record_count: int) -> SnapshotHeader:
            header = SnapshotHeader(
                format_version=SNAPSHOT_FORMAT_VERSION,
                shard_lower_bound=self.lower_bound,
                shard_upper_bound=self.upper_bound,
                applied_index=self._applied_index_in(view),
                record_count=record_count,
                metadata=metadata,
            )
            if on_view_open is not None:
                on_view_open(header.applied_index)
            return header

        return self._storage.write_snapshot(path, tables.SNAPSHOT_TABLES, header_of)

    def check_snapshot(self, path: str | Path) -> SnapshotHeader:
        """Verify a snapshot file end to end (structure, checksum) without applying it."""
        return check_snapshot(path, tables.SNAPSHOT_TABLES)

    def restore_snapshot(
        self,
        path: str | Path,
        applied_index: Callable[[SnapshotHeader], int] | None = None,
        replace: bool = True,
    ) -> SnapshotHeader:
        """Replace this shard's state with the snapshot's rows inside this shard's bounds.

        The stored applied index becomes `applied_index(header)` (default: the header's), so a
        snapshot from another layout can be given the index of the log it will continue.
        With `replace=False` the rows are merged into the existing state instead, so the
        snapshots of several shards of another layout can be restored into this one.
        Every row and balance is checked before commit; any failure leaves the old state."""

        def keep(table: str, key: bytes) -> bool:
            return self.owns_key(shard_key_of_account_bytes(key[:8]))

        def finish(transaction: WriteTransaction, header: SnapshotHeader) -> None:
            index = header.applied_index if applied_index is None else applied_index(header)
            transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(index))
            problems = verify_state(transaction)
            if problems:
                raise SnapshotCorruptError(
                    f"snapshot {path} passes its checksum but is inconsistent: {problems[:3]}"
                )

        return self._storage.restore_snapshot(path, tables.SNAPSHOT_TABLES, keep, finish, replace=replace)
