"""One apply's reads and writes, and the answers built from them: shared by the handlers of
accounts_core.py and transfers.py. Accounts are decoded once per entry and written once, and
every move of an account's totals goes through `move_totals`, so `Changes.check` can hold each
account against what its transactions moved."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ledger_cluster.core import rules, tables
from ledger_cluster.core.apply_failures import AccountInvariantError
from ledger_cluster.core.balances import (
    NO_TOTALS,
    Totals,
    add_totals,
    check_account,
    contribution,
    require_invariant,
    subtract_totals,
    totals_of,
)
from ledger_cluster.core.records import (
    CREDIT_LEG,
    INSUFFICIENT_FUNDS,
    OWED_WORK,
    PENDING,
    TRANSACTION_HAS_METADATA,
    AccountRecord,
    Metadata,
    TransactionRecord,
    decode_account,
    encode_metadata,
)
from ledger_cluster.errors import InvariantViolationError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.storage import ReadTransaction, WriteTransaction

Outcome = core_pb2.Outcome
OK = core_pb2.OUTCOME_OK


@dataclass(slots=True)
class AccountChange:
    """An account touched by this entry: its record (changed in place), its totals before, and
    what its transactions say the totals moved by."""

    record: AccountRecord
    totals_before: Totals
    # (credits settled, debits settled, credits pending, debits pending), summed in place.
    moved: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


class Changes:
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
        self._accounts: dict[int, AccountChange | None] = {}
        # What this entry wrote, for a dry run only: a write transaction reads its own writes.
        self._transactions: dict[bytes, bytes] = {}
        self.new_requests: dict[bytes, int] = {}
        self._recent_rows: list[bytes] = []
        # Rows of the smaller tables (metadata, transfer work, expiries) this entry wrote, for
        # a dry run only; None stands for a deleted row.
        self._rows: dict[tuple[str, bytes], bytes | None] = {}
        # The batch item being executed, and the first item that touched each account: an
        # account that fails `check` is charged to it (apply_failures.py).
        self.item_position = 0
        self._first_touch: dict[int, int] = {}

    def owns(self, account_id: int) -> bool:
        # The shard key is a sha256: computed once per account per entry.
        owned = self._owned.get(account_id)
        if owned is None:
            owned = self._owned[account_id] = self._owns_account(account_id)
        return owned

    def account(self, account_id: int) -> AccountChange | None:
        if account_id in self._accounts:
            return self._accounts[account_id]
        self._first_touch[account_id] = self.item_position
        data = self._view.get(tables.ACCOUNTS, tables.account_key(account_id))
        change = None
        if data is not None:
            record = decode_account(data)
            change = AccountChange(record, totals_of(record))
        self._accounts[account_id] = change
        return change

    def add_account(self, record: AccountRecord) -> AccountChange:
        self._first_touch.setdefault(record.account_id, self.item_position)
        change = AccountChange(record, NO_TOTALS)
        self._accounts[record.account_id] = change
        return change

    def transaction_bytes(self, account_id: int, number: int) -> bytes | None:
        return self.transaction_at(tables.transaction_key(account_id, number))

    def transaction_at(self, key: bytes) -> bytes | None:
        data = self._transactions.get(key)
        return data if data is not None else self._get_transaction(key)

    def put_transaction(
        self, change: AccountChange, before: TransactionRecord | None, record: TransactionRecord, now: int
    ) -> bytes:
        """Store `record` (which was `before`) and move its account's totals by the difference."""
        move_totals(change, subtract_totals(contribution(record), contribution(before)), now)
        return self.overwrite_transaction(record)

    def overwrite_transaction(self, record: TransactionRecord) -> bytes:
        """Store `record` over its row when its account's totals do not move (a debit leg's owed
        work done): the account is neither read nor written."""
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

    def get_row(self, table: str, key: bytes) -> bytes | None:
        if (table, key) in self._rows:
            return self._rows[(table, key)]
        return self._view.get(table, key)

    def put_row(self, table: str, key: bytes, value: bytes) -> None:
        if self._transaction is None:
            self._rows[(table, key)] = value
        else:
            self._transaction.put(table, key, value)

    def delete_row(self, table: str, key: bytes) -> None:
        if self._transaction is None:
            self._rows[(table, key)] = None
        else:
            self._transaction.delete(table, key)

    def scan(self, table: str, limit: int) -> list[tuple[bytes, bytes]]:
        """The first `limit` rows of a table, with this entry's writes (a dry run, which only
        answers, reads the state before the entry)."""
        return self._view.scan(table, b"", b"", limit)

    def metadata_of(self, account_id: int, kind: int, number: int) -> bytes:
        return self.get_row(tables.METADATA, tables.metadata_key(account_id, kind, number)) or b""

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

    def first_item_touching(self, account_id: int) -> int | None:
        return self._first_touch.get(account_id)

    def check(self) -> None:
        """Every touched account's totals against what its transactions moved, and within
        their limits; AccountInvariantError names the account that is not."""
        for account_id, change in sorted(self._accounts.items()):
            if change is None:
                continue
            after = totals_of(change.record)
            expected = add_totals(
                change.totals_before, (change.moved[0], change.moved[1], change.moved[2], change.moved[3])
            )
            try:
                require_invariant(
                    after == expected,
                    f"account {account_id:016x}: totals moved to {after}, its transactions say {expected}",
                )
                check_account(change.record)
            except InvariantViolationError as error:
                raise AccountInvariantError(account_id, str(error)) from error


# -- answers ---------------------------------------------------------------------------------


def failure(outcome: Outcome.ValueType, message: str) -> core_pb2.CommandResult:
    return core_pb2.CommandResult(outcome=outcome, message=message)


def ok_account(changes: Changes, record: AccountRecord, repeat: bool) -> core_pb2.CommandResult:
    if not changes.answering:
        return core_pb2.CommandResult(outcome=OK)
    return core_pb2.CommandResult(outcome=OK, account=record.encode(), repeat=repeat)


def ok_transaction(
    changes: Changes, data: bytes, repeat: bool = False, metadata: bytes = b"", credit_leg: bytes = b""
) -> core_pb2.CommandResult:
    if not changes.answering:
        return core_pb2.CommandResult(outcome=OK)
    return core_pb2.CommandResult(
        outcome=OK, transaction=data, repeat=repeat, metadata=metadata, credit_leg=credit_leg
    )


def stored_metadata(changes: Changes, record: TransactionRecord) -> bytes:
    """A transaction's metadata as stored (b"" when it has none)."""
    if not record.flags & TRANSACTION_HAS_METADATA:
        return b""
    return changes.metadata_of(record.account_id, tables.METADATA_OF_TRANSACTION, record.transaction_number)


def transaction_metadata(changes: Changes, record: TransactionRecord) -> bytes:
    """A transaction's metadata for an answer: none when nobody waits for one."""
    return stored_metadata(changes, record) if changes.answering else b""


def same_extras(
    changes: Changes, record: TransactionRecord, metadata: Metadata, timeout_seconds: int
) -> bool:
    """Metadata and timeout are part of a create's idempotency payload (a transaction's or a
    transfer's) too."""
    if not metadata and not timeout_seconds and not record.flags & TRANSACTION_HAS_METADATA:
        return not record.expires_at or record.initial_status == INSUFFICIENT_FUNDS
    if stored_metadata(changes, record) != encode_metadata(metadata):
        return False
    if record.initial_status == INSUFFICIENT_FUNDS:
        return True  # a refused write keeps no deadline
    return record.expires_at == rules.expires_at_of(record.created_at, timeout_seconds)


def store_new_transaction(  # noqa: PLR0917 - the row and what goes with it
    changes: Changes,
    change: AccountChange,
    record: TransactionRecord,
    request_key: bytes,
    metadata: bytes,
    now: int,
) -> bytes | None:
    """Store a transaction the entry makes (a transfer leg, or one not on the fast path of
    CreateTransaction): its row at the end of its account's order, totals, request id,
    metadata and deadline. None, with nothing stored, when its key is taken."""
    key = tables.transaction_key(record.account_id, record.transaction_number)
    record.sequence = change.record.transaction_count
    data = record.encode()
    if not changes.insert_transaction(key, data):
        return None
    change.record.transaction_count += 1
    move_totals(change, contribution(record), now)
    changes.put_sequence(record.account_id, record.sequence, record.transaction_number)
    if request_key:
        changes.add_request(request_key, record.transaction_number)
    if metadata:
        changes.put_row(
            tables.METADATA,
            tables.metadata_key(record.account_id, tables.METADATA_OF_TRANSACTION, record.transaction_number),
            metadata,
        )
    if expires_on_its_own(record):
        changes.put_row(tables.EXPIRIES, expiry_key_of(record), b"")
    if record.flags & OWED_WORK:
        changes.put_row(tables.TRANSFER_WORK, key, b"")
    return data


def expires_on_its_own(record: TransactionRecord) -> bool:
    """A pending transaction with a deadline, that its own shard expires. A credit leg never
    does: it follows its debit leg's shard."""
    return bool(record.expires_at) and record.status == PENDING and not record.flags & CREDIT_LEG


def expiry_key_of(record: TransactionRecord) -> bytes:
    return tables.expiry_key(record.expires_at, record.account_id, record.transaction_number)


def _move_indexes(changes: Changes, before: TransactionRecord, after: TransactionRecord) -> None:
    """The deadline and transfer work indexes follow a transaction's change."""
    if expires_on_its_own(before) and not expires_on_its_own(after):
        changes.delete_row(tables.EXPIRIES, expiry_key_of(before))
    if bool(before.flags & OWED_WORK) != bool(after.flags & OWED_WORK):
        work_key = tables.transaction_key(after.account_id, after.transaction_number)
        if after.flags & OWED_WORK:
            changes.put_row(tables.TRANSFER_WORK, work_key, b"")
        else:
            changes.delete_row(tables.TRANSFER_WORK, work_key)


def replace_bookkeeping(changes: Changes, before: TransactionRecord, after: TransactionRecord) -> bytes:
    """Store `after` over `before` when only its bookkeeping changes (flags, the linked number),
    not what it contributes to its account's totals."""
    require_invariant(contribution(before) == contribution(after), "bookkeeping that moves totals")
    _move_indexes(changes, before, after)
    return changes.overwrite_transaction(after)


def replace_transaction(
    changes: Changes, change: AccountChange, before: TransactionRecord, after: TransactionRecord, now: int
) -> bytes:
    """Store `after` over `before` (same key), moving totals, the deadline index and the
    transfer work index with it."""
    _move_indexes(changes, before, after)
    return changes.put_transaction(change, before, after, now)


def move_totals(change: AccountChange, moved: Totals, now: int) -> None:
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
