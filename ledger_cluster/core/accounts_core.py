"""AccountsCore: the deterministic state machine of one shard.

It reads nothing but its command and its LMDB state: `now` and every new id arrive inside the
command, so every replica applying the same log gets the same bytes. Domain outcomes are data
(`Outcome`); an exception out of `apply` means the replica is broken and must stop. Answers
carry stored records (records.py); the public views are the gateway's business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ledger_cluster.core import commands, migration, rules, tables, verification
from ledger_cluster.core.balances import (
    NO_TOTALS,
    Totals,
    add_totals,
    check_account,
    contribution,
    contribution_of,
    require_invariant,
    subtract_totals,
    totals_of,
)
from ledger_cluster.core.recent_requests import move_recent_requests, read_recent_requests
from ledger_cluster.core.records import (
    ACCOUNT_HAS_REQUEST_ID,
    CANCELLED,
    INSUFFICIENT_FUNDS,
    NO_REQUEST_DIGEST,
    PENDING,
    SETTLED,
    TRANSACTION_HAS_REQUEST_ID,
    TRANSACTION_SETTLED_REQUESTED,
    AccountRecord,
    Status,
    TransactionRecord,
    decode_account,
    decode_transaction,
    encode_transaction,
    request_digest,
)
from ledger_cluster.errors import ReplicaBrokenError, SnapshotCorruptError, StorageLayoutError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import (
    INT64_MAX,
    PAGE_SIZE_MAX,
)
from ledger_cluster.sharding import shard_key
from ledger_cluster.storage import (
    ReadTransaction,
    SnapshotHeader,
    Storage,
    WriteTransaction,
    check_snapshot,
)

logger = logging.getLogger(__name__)

Outcome = core_pb2.Outcome
OK = core_pb2.OUTCOME_OK


# -- one apply's changes, checked before commit ---------------------------------------------


@dataclass(slots=True)
class _AccountChange:
    """An account touched by this entry: its record (changed in place), its totals before, and
    what its transactions say the totals moved by."""

    record: AccountRecord
    totals_before: Totals
    # (credits settled, debits settled, credits pending, debits pending), summed in place.
    moved: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


class _Changes:
    """Reads and writes of one apply. Accounts are decoded once per entry and written once by
    `flush`; transaction rows go through to the write transaction as they are made, unless
    this is a dry run (a replayed entry evaluated on a read transaction: nothing is written and
    nothing needs undoing). The moves of each account's transactions are summed on the side, so
    `check` can hold the account's totals against them.

    `answering` says whether anybody waits for this apply's results. Only the replica that
    proposed the entry does; the others skip building answers, which changes no state."""

    def __init__(
        self,
        view: ReadTransaction,
        transaction: WriteTransaction | None,
        answering: bool,
        recent_requests: dict[bytes, int],
        owns_account: Callable[[int], bool],
    ) -> None:
        self._view = view
        self._transaction = transaction
        self._get_transaction = view.getter(tables.TRANSACTIONS)
        self._get_request = view.getter(tables.REQUESTS)
        self._put_transaction = None if transaction is None else transaction.putter(tables.TRANSACTIONS)
        self._insert_transaction = None if transaction is None else transaction.inserter(tables.TRANSACTIONS)
        self._put_sequence = None if transaction is None else transaction.putter(tables.ACCOUNT_TRANSACTIONS)
        self.answering = answering
        self._recent_requests = recent_requests
        self._owns_account = owns_account
        self._owned: dict[int, bool] = {}
        self._accounts: dict[int, _AccountChange | None] = {}
        # What this entry wrote, for a dry run only: a write transaction reads its own writes.
        self._transactions: dict[bytes, bytes] = {}
        self.new_requests: dict[bytes, int] = {}
        self._recent_rows: list[bytes] = []

    def owns(self, account_id: int) -> bool:
        # The shard key is a sha256: computed once per account per entry.
        owned = self._owned.get(account_id)
        if owned is None:
            owned = self._owned[account_id] = self._owns_account(account_id)
        return owned

    def account(self, account_id: int) -> _AccountChange | None:
        if account_id in self._accounts:
            return self._accounts[account_id]
        data = self._view.get(tables.ACCOUNTS, tables.account_key(account_id))
        change = None
        if data is not None:
            record = decode_account(data)
            change = _AccountChange(record, totals_of(record))
        self._accounts[account_id] = change
        return change

    def add_account(self, record: AccountRecord) -> _AccountChange:
        change = _AccountChange(record, NO_TOTALS)
        self._accounts[record.account_id] = change
        return change

    def transaction_bytes(self, account_id: int, number: int) -> bytes | None:
        return self.transaction_at(tables.transaction_key(account_id, number))

    def transaction_at(self, key: bytes) -> bytes | None:
        data = self._transactions.get(key)
        return data if data is not None else self._get_transaction(key)

    def put_transaction(
        self, change: _AccountChange, before: TransactionRecord | None, record: TransactionRecord, now: int
    ) -> bytes:
        """Store `record` (which was `before`) and move its account's totals by the difference."""
        _move_totals(change, subtract_totals(contribution(record), contribution(before)), now)
        key = tables.transaction_key(record.account_id, record.transaction_number)
        data = record.encode()
        if self._put_transaction is None:
            self._transactions[key] = data
        else:
            self._put_transaction(key, data)
        return data

    def insert_transaction(self, key: bytes, data: bytes) -> bool:
        """Store a new transaction row; False (and nothing stored) when its key is taken."""
        if self._insert_transaction is not None:
            return self._insert_transaction(key, data)
        if self.transaction_at(key) is not None:
            return False
        self._transactions[key] = data
        return True

    def put_sequence(self, account_id: int, sequence: int, number: int) -> None:
        if self._put_sequence is not None:
            self._put_sequence(tables.sequence_key(account_id, sequence), tables.encode_u64(number))

    def find_request(self, key: bytes) -> int | None:
        """The transaction number of a request key (tables.request_key), if it has one."""
        number = self.new_requests.get(key)
        if number is None:
            number = self._recent_requests.get(key)
        if number is None:
            data = self._get_request(key)
            number = None if data is None else tables.decode_u64(data)
        return number

    def add_request(self, key: bytes, number: int) -> None:
        """`key` is the request key (account id + digest): the recent row holds it and the number."""
        self.new_requests[key] = number
        self._recent_rows.append(key + tables.encode_u64(number))

    def flush(self, log_index: int) -> None:
        """Write every touched account once, and the entry's new request ids as one row."""
        if self._transaction is None:
            return
        for account_id, change in sorted(self._accounts.items()):
            if change is not None:
                self._transaction.put(tables.ACCOUNTS, tables.account_key(account_id), change.record.encode())
        if self._recent_rows:
            self._transaction.put(
                tables.RECENT_REQUESTS, tables.recent_requests_key(log_index), b"".join(self._recent_rows)
            )

    def check(self) -> None:
        for account_id, change in sorted(self._accounts.items()):
            if change is None:
                continue
            after = totals_of(change.record)
            expected = add_totals(
                change.totals_before, (change.moved[0], change.moved[1], change.moved[2], change.moved[3])
            )
            require_invariant(
                after == expected,
                f"account {account_id:016x}: totals moved to {after}, its transactions say {expected}",
            )
            check_account(change.record)


# -- answers ---------------------------------------------------------------------------------


def _failure(outcome: Outcome.ValueType, message: str) -> core_pb2.CommandResult:
    return core_pb2.CommandResult(outcome=outcome, message=message)


def _ok_account(changes: _Changes, record: AccountRecord, repeat: bool) -> core_pb2.CommandResult:
    if not changes.answering:
        return core_pb2.CommandResult(outcome=OK)
    return core_pb2.CommandResult(outcome=OK, account=record.encode(), repeat=repeat)


def _ok_transaction(changes: _Changes, data: bytes, repeat: bool = False) -> core_pb2.CommandResult:
    if not changes.answering:
        return core_pb2.CommandResult(outcome=OK)
    return core_pb2.CommandResult(outcome=OK, transaction=data, repeat=repeat)


# -- command handlers --------------------------------------------------------------------------


def _digest_of(request_id: str) -> bytes:
    return request_digest(request_id) if request_id else NO_REQUEST_DIGEST


def _create_account(changes: _Changes, command: commands.CreateAccount) -> core_pb2.CommandResult:
    problem = rules.request_id_problem(command.request_id)
    if problem is not None:
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, problem.message)
    now = command.now
    digest = _digest_of(command.request_id)
    existing = changes.account(command.account_id)
    if existing is not None:
        record = existing.record
        same_request_id = record.request_digest == digest
        # Without a request_id, only a re-delivery of this very command (same `now`) is a repeat.
        if same_request_id and (command.request_id or record.created_at == now):
            return _ok_account(changes, record, repeat=True)
        return _failure(core_pb2.OUTCOME_ACCOUNT_ID_COLLISION, "account id already taken")
    record = AccountRecord(
        command.account_id,
        now,
        now,
        flags=ACCOUNT_HAS_REQUEST_ID if command.request_id else 0,
        request_digest=digest,
    )
    changes.add_account(record)
    return _ok_account(changes, record, repeat=False)


def _same_transaction_payload(
    record: TransactionRecord, command: commands.CreateTransaction, digest: bytes
) -> bool:
    return (
        record.amount == command.amount
        and record.description == command.description
        and record.settled_requested == command.settled
        and record.request_digest == digest
    )


def _create_transaction(changes: _Changes, command: commands.CreateTransaction) -> core_pb2.CommandResult:
    problem = rules.create_transaction_problem(command.amount, command.description, command.request_id)
    if problem is not None:
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, problem.message)
    account_id = command.account_id
    change = changes.account(account_id)
    if change is None:
        return _failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
    digest = NO_REQUEST_DIGEST
    request_key = b""
    if command.request_id:
        digest = request_digest(command.request_id)
        request_key = tables.request_key(account_id, digest)
        number = changes.find_request(request_key)
        if number is not None:
            return _repeat_of_request(changes, command, digest, number)
    key = tables.transaction_key(account_id, command.transaction_number)
    return _record_new_transaction(changes, change, command, _NewRow(key, digest, request_key))


def _number_taken(
    changes: _Changes, command: commands.CreateTransaction, digest: bytes, key: bytes
) -> core_pb2.CommandResult:
    """The gateway drew a number that exists: a re-delivery of the very command that stored it
    (same payload and `now`) answers it again; anything else is a collision to draw again."""
    existing = changes.transaction_at(key)
    require_invariant(existing is not None, "a taken transaction key without its row")
    assert existing is not None  # narrowed for mypy; checked just above
    earlier = decode_transaction(existing)
    if _same_transaction_payload(earlier, command, digest) and earlier.created_at == command.now:
        return _ok_transaction(changes, existing, repeat=True)
    return _failure(core_pb2.OUTCOME_TRANSACTION_ID_COLLISION, "transaction id already taken")


def _repeat_of_request(
    changes: _Changes, command: commands.CreateTransaction, digest: bytes, number: int
) -> core_pb2.CommandResult:
    data = changes.transaction_bytes(command.account_id, number)
    require_invariant(data is not None, "request id recorded without its transaction")
    assert data is not None  # narrowed for mypy; checked just above
    if _same_transaction_payload(decode_transaction(data), command, digest):
        return _ok_transaction(changes, data, repeat=True)
    return _failure(
        core_pb2.OUTCOME_REQUEST_ID_REUSED,
        "request_id was used for a different transaction on this account",
    )


def _overflows(account: AccountRecord, amount: int, refused: bool) -> bool:
    """A top-up counts against the settled balance and the lifetime credits, pending ones
    included, so settling it later can never overflow; a purchase that would be taken counts
    against the lifetime debits (one that cannot be paid, `refused`, is recorded instead)."""
    if amount > 0:
        headroom = INT64_MAX - amount - account.credits_pending
        return account.settled_balance > headroom or account.credits_settled > headroom
    return not refused and account.debits_settled + account.debits_pending - amount > INT64_MAX


class _NewRow(NamedTuple):
    """The keys of a transaction about to be stored, computed once by the checks before."""

    key: bytes
    digest: bytes
    request_key: bytes


def _record_new_transaction(
    changes: _Changes, change: _AccountChange, command: commands.CreateTransaction, row: _NewRow
) -> core_pb2.CommandResult:
    """Written out in one piece, with no record object: every item of a batch of new
    transactions runs through here on every replica, and each call or object costs. The row is
    inserted before the account changes, so a taken number changes nothing."""
    account = change.record
    amount = command.amount
    now = command.now
    refused = amount < 0 and account.available_balance + amount < -account.overdraft_limit
    if _overflows(account, amount, refused):
        if changes.transaction_at(row.key) is not None:  # a taken number answers first
            return _number_taken(changes, command, row.digest, row.key)
        return _failure(core_pb2.OUTCOME_BALANCE_OVERFLOW, "balance would exceed int64")
    settled = command.settled
    status = INSUFFICIENT_FUNDS if refused else (SETTLED if settled else PENDING)
    flags = TRANSACTION_SETTLED_REQUESTED if settled else 0
    if command.request_id:
        flags |= TRANSACTION_HAS_REQUEST_ID
    account_id = account.account_id
    number = command.transaction_number
    sequence = account.transaction_count
    settled_amount = amount if status == SETTLED else 0
    data = encode_transaction(
        account_id, number, sequence, amount, status, status, now, now,
        command.description, settled_amount, 0, flags, row.digest, 0, 0,
    )  # fmt: skip
    if not changes.insert_transaction(row.key, data):
        return _number_taken(changes, command, row.digest, row.key)
    account.transaction_count = sequence + 1
    _move_totals(change, contribution_of(status, amount, settled_amount), now)
    changes.put_sequence(account_id, sequence, number)
    if flags & TRANSACTION_HAS_REQUEST_ID:
        changes.add_request(row.request_key, number)
    return _ok_transaction(changes, data)


def _move_totals(change: _AccountChange, moved: Totals, now: int) -> None:
    """The one place an account's totals move: the record, and on the side what its
    transactions moved (which `check` holds the record against)."""
    if moved == NO_TOTALS:
        return
    account = change.record
    account.credits_settled += moved[0]
    account.debits_settled += moved[1]
    account.credits_pending += moved[2]
    account.debits_pending += moved[3]
    side = change.moved
    side[0] += moved[0]
    side[1] += moved[1]
    side[2] += moved[2]
    side[3] += moved[3]
    # The visible balances (settled, available) changed: a pending top-up alone changes neither.
    if moved[0] or moved[1] or moved[3]:
        account.updated_at = now


def _finish_pending(
    changes: _Changes, account_id: int, transaction_number: int, target: int, now: int
) -> core_pb2.CommandResult:
    """Settle or cancel: PENDING moves to `target`; `target` itself is returned unchanged."""
    data = changes.transaction_bytes(account_id, transaction_number)
    if data is None:
        return _failure(core_pb2.OUTCOME_TRANSACTION_NOT_FOUND, "transaction not found")
    before = decode_transaction(data)
    if before.status == target:
        return _ok_transaction(changes, data)
    if before.status != PENDING:
        return _failure(
            core_pb2.OUTCOME_TRANSACTION_NOT_PENDING,
            f"transaction is {Status(before.status).name}, not pending",
        )
    change = changes.account(account_id)
    require_invariant(change is not None, f"transaction of missing account {account_id:016x}")
    assert change is not None  # narrowed for mypy; checked just above
    after = decode_transaction(data)
    after.status = target
    after.updated_at = now
    if target == SETTLED:
        after.settled_amount = after.amount
    return _ok_transaction(changes, changes.put_transaction(change, before, after, now))


def _execute_batch(changes: _Changes, items: tuple[bytes, ...]) -> core_pb2.CommandResult:
    """Every item in order against the same changes, so each sees the ones before it; one
    item's domain failure is its own answer and stops nothing else."""
    problem = rules.batch_size_problem(len(items))
    if problem is not None:
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, problem.message)
    result = core_pb2.CommandResult(outcome=OK)
    if not changes.answering:
        for item in items:
            _execute(changes, commands.parse_item(item))
        return result
    result.item_results.extend([_execute(changes, commands.parse_item(item)) for item in items])
    return result


def _execute(changes: _Changes, command: commands.Command) -> core_pb2.CommandResult:
    # The common case first: most items of most entries are new transactions.
    if isinstance(command, commands.CreateTransaction) and changes.owns(command.account_id):
        return _create_transaction(changes, command)
    if isinstance(command, commands.Undecodable):
        return _failure(core_pb2.OUTCOME_INVALID_COMMAND, command.reason)
    if isinstance(command, commands.Noop):
        return core_pb2.CommandResult(outcome=OK)
    if isinstance(command, commands.Batch):
        return _execute_batch(changes, command.items)
    if not changes.owns(command.account_id):
        # A gateway with another config routed this here; storing it would strand the account
        # in a shard that will never be asked for it.
        return _failure(core_pb2.OUTCOME_SHARD_MISMATCH, "account belongs to another shard")
    if isinstance(command, commands.CreateAccount):
        return _create_account(changes, command)
    target = SETTLED if isinstance(command, commands.SettleTransaction) else CANCELLED
    return _finish_pending(changes, command.account_id, command.transaction_number, target, command.now)


# -- reads -------------------------------------------------------------------------------------


def _read_failure(outcome: Outcome.ValueType, message: str) -> core_pb2.ReadResult:
    return core_pb2.ReadResult(outcome=outcome, message=message)


def _list_transactions(view: ReadTransaction, query: core_pb2.ListTransactionsQuery) -> core_pb2.ReadResult:
    if not 1 <= query.limit <= PAGE_SIZE_MAX:
        return _read_failure(core_pb2.OUTCOME_INVALID_COMMAND, f"limit must be 1..{PAGE_SIZE_MAX}")
    account_data = view.get(tables.ACCOUNTS, tables.account_key(query.account_id))
    if account_data is None:
        return _read_failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
    count = decode_account(account_data).transaction_count
    if query.start_sequence > count:
        return _read_failure(core_pb2.OUTCOME_INVALID_PAGE_TOKEN, "page token is past the end")
    prefix = tables.account_key(query.account_id)
    start = tables.sequence_key(query.account_id, query.start_sequence)
    result = core_pb2.ReadResult(outcome=OK)
    for _, number in view.scan(tables.ACCOUNT_TRANSACTIONS, start, prefix, query.limit):
        data = view.get(tables.TRANSACTIONS, prefix + number)
        require_invariant(data is not None, "sequence index points at a missing transaction")
        assert data is not None  # narrowed for mypy; checked just above
        result.transactions.append(data)
    following = query.start_sequence + len(result.transactions)
    result.next_sequence = following if following < count else 0
    return result


def _read(
    view: ReadTransaction, query: core_pb2.ReadQuery, owns_account: Callable[[int], bool]
) -> core_pb2.ReadResult:
    kind = query.WhichOneof("query")
    if kind is not None and not owns_account(getattr(query, kind).account_id):
        return _read_failure(core_pb2.OUTCOME_SHARD_MISMATCH, "account belongs to another shard")
    if kind == "get_account":
        data = view.get(tables.ACCOUNTS, tables.account_key(query.get_account.account_id))
        if data is None:
            return _read_failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
        return core_pb2.ReadResult(outcome=OK, account=data)
    if kind == "get_transaction":
        wanted = query.get_transaction
        data = view.get(
            tables.TRANSACTIONS, tables.transaction_key(wanted.account_id, wanted.transaction_number)
        )
        if data is None:
            return _read_failure(core_pb2.OUTCOME_TRANSACTION_NOT_FOUND, "transaction not found")
        return core_pb2.ReadResult(outcome=OK, transaction=data)
    if kind == "list_transactions":
        return _list_transactions(view, query.list_transactions)
    return _read_failure(core_pb2.OUTCOME_INVALID_COMMAND, "empty read query")


# -- the core ----------------------------------------------------------------------------------


class AccountsCore:
    """The state machine of the shard whose keys lie in [lower_bound, upper_bound]."""

    def __init__(
        self,
        storage: Storage,
        lower_bound: int,
        upper_bound: int,
        recent_requests_max: int = tables.RECENT_REQUESTS_MAX,
    ) -> None:
        """`recent_requests_max` is part of the state machine: every replica of a shard must use
        the same (tests lower it to move request ids often)."""
        self._storage = storage
        self.lower_bound = lower_bound
        self.upper_bound = upper_bound
        self._recent_requests_max = recent_requests_max
        storage.write(self._initialize_meta)
        # Mirrors the `recent_requests` table (derived state: rebuilt from it on every open and
        # restore, changed only after a commit), so a lookup of a new request id costs no read.
        self._recent_requests: dict[bytes, int] = {}
        self._reload_recent_requests()

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
            return
        version_data = transaction.get(tables.META, tables.META_FORMAT_VERSION)
        version = 0 if version_data is None else tables.decode_u64(version_data)
        if version != tables.STATE_FORMAT_VERSION:
            raise StorageLayoutError(migration.refusal_of_data_directory(self._storage.directory, version))
        if stored != wanted:
            lower, upper = tables.decode_bounds(stored)
            raise StorageLayoutError(
                f"{self._storage.directory} holds shard keys {lower}..{upper}, not"
                f" {self.lower_bound}..{self.upper_bound}: it belongs to another shard layout"
            )

    def _reload_recent_requests(self) -> None:
        with self._storage.read() as view:
            self._recent_requests = read_recent_requests(view)

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
        the same, but a success carries no record and a batch no item results.

        An entry at or below the stored applied index was applied before (PySyncObj replays its
        journal after every restart): it changes nothing. Unanswered, it is skipped; answered, it
        is evaluated as a dry run on a read transaction and answers what a repeat of it answers
        now. That answer is the original one for every entry that stored something (ids make
        repeats return the stored object); an entry that originally failed without storing
        anything may answer differently. No caller waits on a replayed entry, and keeping every entry's result
        instead would grow without bound."""
        if log_index <= 0:
            raise ReplicaBrokenError(f"log index must be positive, got {log_index}")
        with self._storage.read() as view:
            if log_index <= self._applied_index_in(view):
                if not answering:
                    # A journal replayed after a restart: nobody waits, so nothing needs working
                    # out (a restart would otherwise redo every entry since the last compaction).
                    return core_pb2.CommandResult(outcome=OK, log_index=log_index)
                return self._execute_checked(view, None, command_bytes, log_index, answering)[0]

        def run(transaction: WriteTransaction) -> tuple[core_pb2.CommandResult, _Changes, bool]:
            applied_index = self._applied_index_in(transaction)
            if log_index <= applied_index:
                # Only this replica's apply thread writes; a higher index here means another
                # process wrote to the same files.
                raise ReplicaBrokenError(
                    f"entry {log_index} was applied by another writer (stored index {applied_index})"
                )
            result, changes = self._execute_checked(
                transaction, transaction, command_bytes, log_index, answering
            )
            moved = len(self._recent_requests) + len(changes.new_requests) >= self._recent_requests_max
            if moved:
                move_recent_requests(transaction)
            transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(log_index))
            return result, changes, moved

        result, changes, moved = self._storage.write(run)
        # Committed: only now may the memory mirror follow the table.
        if moved:
            self._recent_requests = {}
        else:
            self._recent_requests.update(changes.new_requests)
        return result

    def _execute_checked(
        self,
        view: ReadTransaction,
        transaction: WriteTransaction | None,
        command_bytes: bytes,
        log_index: int,
        answering: bool,
    ) -> tuple[core_pb2.CommandResult, _Changes]:
        changes = _Changes(view, transaction, answering, self._recent_requests, self.owns_account)
        result = _execute(changes, commands.parse(command_bytes))
        changes.flush(log_index)
        changes.check()
        result.log_index = log_index
        for item in result.item_results:
            item.log_index = log_index
        return result, changes

    def read(self, query: core_pb2.ReadQuery) -> core_pb2.ReadResult:
        with self._storage.read() as view:
            result = _read(view, query, self.owns_account)
            result.applied_index = self._applied_index_in(view)
            return result

    def _problems_in(self, view: ReadTransaction, applied_index: int) -> list[str]:
        return verification.verify_state(view, applied_index, self.owns_account, self._recent_requests_max)

    def verify(self) -> list[str]:
        with self._storage.read() as view:
            return self._problems_in(view, self._applied_index_in(view))

    def state_digest(self) -> tuple[int, str]:
        """(applied index, sha256 over every data record) from one view: equal on replicas
        that applied the same log prefix."""
        with self._storage.read() as view:
            return self._applied_index_in(view), verification.state_digest(view)

    def verify_report(self) -> tuple[int, str, list[str]]:
        """(applied index, state digest, problems) from one view: what `verify` finds, about
        exactly the state that the digest describes."""
        with self._storage.read() as view:
            applied_index = self._applied_index_in(view)
            return (
                applied_index,
                verification.state_digest(view),
                self._problems_in(view, applied_index),
            )

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
                format_version=migration.SNAPSHOT_FORMAT_VERSION,
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
        return check_snapshot(path, migration.SNAPSHOT_TABLE_IDS)

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
        A snapshot of state format 1 is converted on the way in (migration.py). Every row and
        balance is checked before commit; any failure leaves the old state."""
        rows = migration.RowSink(self.owns_account)

        def finish(transaction: WriteTransaction, header: SnapshotHeader) -> None:
            rows.finish(transaction)
            index = header.applied_index if applied_index is None else applied_index(header)
            if index != header.applied_index or rows.converted:
                # Log indexes in `recent_requests` keys belong to the source's log.
                move_recent_requests(transaction)
            transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(index))
            problems = self._problems_in(transaction, index)
            if problems:
                raise SnapshotCorruptError(
                    f"snapshot {path} passes its checksum but is inconsistent: {problems[:3]}"
                )

        try:
            header = self._storage.restore_snapshot(
                path, tables.SNAPSHOT_TABLES.values(), rows, finish, replace=replace
            )
        finally:
            self._reload_recent_requests()
        return header
