"""AccountsCore: the deterministic state machine of one shard.

It reads nothing but its command and its LMDB state: `now` and every new id arrive inside the
command, so every replica applying the same log gets the same bytes. Domain outcomes are data
(`Outcome`). A command whose apply raises a deterministic error (a stored record it cannot use,
a bug of a handler) is rolled back and answered as such (apply_failures.py); any other
exception out of `apply` means the replica is broken and must stop. Answers
carry stored records (records.py); the public views are the gateway's business.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ledger_cluster.core import (
    apply_failures,
    commands,
    migration,
    rules,
    tables,
    transfers,
    verification,
)
from ledger_cluster.core.balances import (
    contribution_of,
    credit_overflows,
    debit_overflows,
    is_refused,
    require_invariant,
)
from ledger_cluster.core.changes import (
    OK,
    AccountChange,
    Changes,
    Outcome,
    expires_on_its_own,
    expiry_key_of,
    failure,
    move_totals,
    ok_account,
    ok_transaction,
    replace_transaction,
    same_extras,
    store_new_transaction,
    transaction_metadata,
)
from ledger_cluster.core.recent_requests import move_recent_requests, read_recent_requests
from ledger_cluster.core.records import (
    ACCOUNT_HAS_METADATA,
    ACCOUNT_HAS_REQUEST_ID,
    CANCELLED,
    EXPIRED,
    INSUFFICIENT_FUNDS,
    LEG_FLAGS,
    NO_REQUEST_DIGEST,
    PENDING,
    SETTLED,
    TRANSACTION_HAS_METADATA,
    TRANSACTION_HAS_REQUEST_ID,
    TRANSACTION_SETTLED_REQUESTED,
    AccountRecord,
    Status,
    TransactionRecord,
    decode_account,
    decode_transaction,
    encode_metadata,
    encode_transaction,
    request_digest,
)
from ledger_cluster.errors import (
    RecordFormatError,
    ReplicaBrokenError,
    SnapshotCorruptError,
    StorageLayoutError,
)
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import PAGE_SIZE_MAX
from ledger_cluster.sharding import shard_key
from ledger_cluster.storage import (
    ReadTransaction,
    SnapshotHeader,
    Storage,
    WriteTransaction,
    check_snapshot,
)

logger = logging.getLogger(__name__)


# -- command handlers --------------------------------------------------------------------------


def _digest_of(request_id: str) -> bytes:
    return request_digest(request_id) if request_id else NO_REQUEST_DIGEST


def _invalid(problem: rules.Problem) -> core_pb2.CommandResult:
    return failure(core_pb2.OUTCOME_INVALID_COMMAND, f"{problem.reason}: {problem.message}")


def _account_answer(changes: Changes, record: AccountRecord, repeat: bool) -> core_pb2.CommandResult:
    result = ok_account(changes, record, repeat)
    if changes.answering and record.flags & ACCOUNT_HAS_METADATA:
        result.metadata = changes.metadata_of(record.account_id, tables.METADATA_OF_ACCOUNT, 0)
    return result


def _create_account(changes: Changes, command: commands.CreateAccount) -> core_pb2.CommandResult:
    problem = rules.create_account_problem(
        command.request_id, command.currency, command.overdraft_limit, command.metadata
    )
    if problem is None and not commands.is_canonical(command.metadata):
        problem = rules.Problem(rules.INVALID_METADATA, "metadata entries out of key order")
    if problem is not None:
        return _invalid(problem)
    now = command.now
    digest = _digest_of(command.request_id)
    metadata = encode_metadata(command.metadata)
    existing = changes.account(command.account_id)
    if existing is not None:
        record = existing.record
        same_request_id = record.request_digest == digest
        same_payload = (
            record.currency == command.currency
            and record.overdraft_limit == command.overdraft_limit
            and changes.metadata_of(record.account_id, tables.METADATA_OF_ACCOUNT, 0) == metadata
        )
        # Without a request_id, only a re-delivery of this very command (same `now`) is a repeat.
        if same_request_id and same_payload and (command.request_id or record.created_at == now):
            return _account_answer(changes, record, repeat=True)
        if same_request_id and command.request_id:
            return failure(
                core_pb2.OUTCOME_REQUEST_ID_REUSED,
                "request_id was used to create an account with other fields",
            )
        return failure(core_pb2.OUTCOME_ACCOUNT_ID_COLLISION, "account id already taken")
    flags = ACCOUNT_HAS_REQUEST_ID if command.request_id else 0
    if metadata:
        flags |= ACCOUNT_HAS_METADATA
        changes.put_row(
            tables.METADATA, tables.metadata_key(command.account_id, tables.METADATA_OF_ACCOUNT, 0), metadata
        )
    record = AccountRecord(
        command.account_id,
        now,
        now,
        currency=command.currency,
        overdraft_limit=command.overdraft_limit,
        flags=flags,
        request_digest=digest,
    )
    changes.add_account(record)
    return _account_answer(changes, record, repeat=False)


def _same_transaction_payload(
    changes: Changes, record: TransactionRecord, command: commands.CreateTransaction, digest: bytes
) -> bool:
    return (
        record.amount == command.amount
        and record.description == command.description
        and record.settled_requested == command.settled
        and record.request_digest == digest
        and not record.flags & LEG_FLAGS
        and same_extras(changes, record, command.metadata, command.timeout_seconds)
    )


def _create_transaction(changes: Changes, command: commands.CreateTransaction) -> core_pb2.CommandResult:
    problem = rules.create_transaction_problem(
        command.amount, command.description, command.request_id
    ) or rules.create_transaction_extras_problem(command.metadata, command.timeout_seconds, command.settled)
    if problem is None and command.metadata and not commands.is_canonical(command.metadata):
        problem = rules.Problem(rules.INVALID_METADATA, "metadata entries out of key order")
    if problem is not None:
        return _invalid(problem)
    account_id = command.account_id
    change = changes.account(account_id)
    if change is None:
        return failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
    digest = NO_REQUEST_DIGEST
    request_key = b""
    if command.request_id:
        digest = request_digest(command.request_id)
        request_key = tables.request_key(account_id, digest)
        number = changes.find_request(request_key)
        if number is not None:
            return _repeat_of_request(changes, command, digest, number)
    key = tables.transaction_key(account_id, command.transaction_number)
    if command.metadata or command.timeout_seconds:
        return _record_new_transaction_with_extras(
            changes, change, command, _NewRow(key, digest, request_key)
        )
    return _record_new_transaction(changes, change, command, _NewRow(key, digest, request_key))


def _number_taken(
    changes: Changes, command: commands.CreateTransaction, digest: bytes, key: bytes
) -> core_pb2.CommandResult:
    """The gateway drew a number that exists: a re-delivery of the very command that stored it
    (same payload and `now`) answers it again; anything else is a collision to draw again."""
    existing = changes.transaction_at(key)
    require_invariant(existing is not None, "a taken transaction key without its row")
    assert existing is not None  # narrowed for mypy; checked just above
    earlier = decode_transaction(existing)
    if _same_transaction_payload(changes, earlier, command, digest) and earlier.created_at == command.now:
        return ok_transaction(changes, existing, repeat=True, metadata=transaction_metadata(changes, earlier))
    return failure(core_pb2.OUTCOME_TRANSACTION_ID_COLLISION, "transaction id already taken")


def _repeat_of_request(
    changes: Changes, command: commands.CreateTransaction, digest: bytes, number: int
) -> core_pb2.CommandResult:
    data = changes.transaction_bytes(command.account_id, number)
    require_invariant(data is not None, "request id recorded without its transaction")
    assert data is not None  # narrowed for mypy; checked just above
    record = decode_transaction(data)
    if _same_transaction_payload(changes, record, command, digest):
        return ok_transaction(changes, data, repeat=True, metadata=transaction_metadata(changes, record))
    return failure(
        core_pb2.OUTCOME_REQUEST_ID_REUSED,
        "request_id was used for a different transaction on this account",
    )


def _overflows(account: AccountRecord, amount: int, refused: bool) -> bool:
    """A top-up counts against the settled balance and the lifetime credits, pending ones
    included, so settling it later can never overflow; a purchase that would be taken counts
    against the lifetime debits (one that cannot be paid, `refused`, is recorded instead)."""
    if amount > 0:
        return credit_overflows(account, amount)
    return not refused and debit_overflows(account, -amount)


class _NewRow(NamedTuple):
    """The keys of a transaction about to be stored, computed once by the checks before."""

    key: bytes
    digest: bytes
    request_key: bytes


def _record_new_transaction(
    changes: Changes, change: AccountChange, command: commands.CreateTransaction, row: _NewRow
) -> core_pb2.CommandResult:
    """Written out in one piece, with no record object: every item of a batch of new
    transactions runs through here on every replica, and each call or object costs. The row is
    inserted before the account changes, so a taken number changes nothing."""
    account = change.record
    amount = command.amount
    now = command.now
    # is_refused, written out: this runs for every new item on every replica.
    refused = amount < 0 and account.available_balance + amount < -account.overdraft_limit
    if _overflows(account, amount, refused):
        if changes.transaction_at(row.key) is not None:  # a taken number answers first
            return _number_taken(changes, command, row.digest, row.key)
        return failure(core_pb2.OUTCOME_BALANCE_OVERFLOW, "balance would exceed int64")
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
    move_totals(change, contribution_of(status, amount, settled_amount), now)
    changes.put_sequence(account_id, sequence, number)
    if flags & TRANSACTION_HAS_REQUEST_ID:
        changes.add_request(row.request_key, number)
    return ok_transaction(changes, data)


def _record_new_transaction_with_extras(
    changes: Changes, change: AccountChange, command: commands.CreateTransaction, row: _NewRow
) -> core_pb2.CommandResult:
    """A new transaction with metadata or a timeout: off the fast path, through the record."""
    account = change.record
    amount = command.amount
    now = command.now
    refused = is_refused(account, amount)
    if changes.transaction_at(row.key) is not None:
        return _number_taken(changes, command, row.digest, row.key)
    if _overflows(account, amount, refused):
        return failure(core_pb2.OUTCOME_BALANCE_OVERFLOW, "balance would exceed int64")
    status = INSUFFICIENT_FUNDS if refused else (SETTLED if command.settled else PENDING)
    flags = TRANSACTION_SETTLED_REQUESTED if command.settled else 0
    if command.request_id:
        flags |= TRANSACTION_HAS_REQUEST_ID
    metadata = encode_metadata(command.metadata)
    if metadata:
        flags |= TRANSACTION_HAS_METADATA
    record = TransactionRecord(
        account.account_id,
        command.transaction_number,
        0,
        amount,
        status,
        status,
        now,
        now,
        command.description,
        settled_amount=amount if status == SETTLED else 0,
        expires_at=rules.expires_at_of(now, command.timeout_seconds) if status == PENDING else 0,
        flags=flags,
        request_digest=row.digest,
    )
    data = store_new_transaction(changes, change, record, row.request_key, metadata, now)
    require_invariant(data is not None, "a free transaction key was taken within one apply")
    assert data is not None  # narrowed for mypy; checked just above
    return ok_transaction(changes, data, metadata=metadata if changes.answering else b"")


def settle_target(before: TransactionRecord, requested: int) -> int:
    """The settled amount of a settle of `requested` (0: all), signed like the transaction."""
    return before.amount if requested == 0 else requested


def _finish_pending(
    changes: Changes, command: commands.SettleTransaction | commands.CancelTransaction
) -> core_pb2.CommandResult:
    """Settle (fully or partly) or cancel: PENDING moves to the target; a transaction already
    there (settled for the same amount) is returned unchanged."""
    account_id, now = command.account_id, command.now
    settle = isinstance(command, commands.SettleTransaction)
    requested = command.amount if isinstance(command, commands.SettleTransaction) else 0
    data = changes.transaction_bytes(account_id, command.transaction_number)
    if data is None:
        return failure(core_pb2.OUTCOME_TRANSACTION_NOT_FOUND, "transaction not found")
    before = decode_transaction(data)
    if before.flags & LEG_FLAGS:
        return failure(
            core_pb2.OUTCOME_TRANSFER_LEG, "transaction is a transfer's leg: settle or cancel the transfer"
        )
    if settle:
        problem = rules.settle_amount_problem(requested, before.amount)
        if problem is not None:
            return failure(core_pb2.OUTCOME_INVALID_SETTLE_AMOUNT, problem.message)
    target = SETTLED if settle else CANCELLED
    if before.status == target:
        if settle and before.settled_amount != settle_target(before, requested):
            return failure(
                core_pb2.OUTCOME_SETTLED_WITH_OTHER_AMOUNT,
                f"transaction was settled for {before.settled_amount},"
                f" not {settle_target(before, requested)}",
            )
        return ok_transaction(changes, data, metadata=transaction_metadata(changes, before))
    if before.status == EXPIRED:
        return failure(core_pb2.OUTCOME_TRANSACTION_EXPIRED, "transaction expired")
    if before.status != PENDING:
        return failure(
            core_pb2.OUTCOME_TRANSACTION_NOT_PENDING,
            f"transaction is {Status(before.status).name}, not pending",
        )
    change = changes.account(account_id)
    require_invariant(change is not None, f"transaction of missing account {account_id:016x}")
    assert change is not None  # narrowed for mypy; checked just above
    after = decode_transaction(data)
    after.updated_at = now
    if before.expires_at and now >= before.expires_at:
        # Its deadline passed before this entry: it expires here, whatever was asked.
        after.status = EXPIRED
        replace_transaction(changes, change, before, after, now)
        return failure(core_pb2.OUTCOME_TRANSACTION_EXPIRED, "transaction expired")
    after.status = target
    if settle:
        after.settled_amount = settle_target(before, requested)
    stored = replace_transaction(changes, change, before, after, now)
    return ok_transaction(changes, stored, metadata=transaction_metadata(changes, after))


def _execute_batch(
    changes: Changes, items: tuple[bytes, ...], refused: Mapping[int, core_pb2.CommandResult]
) -> core_pb2.CommandResult:
    """Every item in order against the same changes, so each sees the ones before it; one
    item's domain failure is its own answer and stops nothing else. The items in `refused`
    raised in an earlier run of this entry: they answer their refusal and are not executed."""
    problem = rules.batch_size_problem(len(items))
    if problem is not None:
        return failure(core_pb2.OUTCOME_INVALID_COMMAND, problem.message)
    result = core_pb2.CommandResult(outcome=OK)
    answers = result.item_results if changes.answering else None
    for position, item in enumerate(items):
        answer = refused.get(position)
        if answer is None:
            changes.item_position = position
            try:
                answer = _execute(changes, commands.parse_item(item))
            except apply_failures.DETERMINISTIC_ERRORS as error:
                raise apply_failures.ItemFailedError(position, apply_failures.refusal_of(error)) from error
        if answers is not None:
            answers.append(answer)
    return result


def _execute_entry(
    changes: Changes, command: commands.Command, refused: Mapping[int, core_pb2.CommandResult]
) -> core_pb2.CommandResult:
    if isinstance(command, commands.Batch):
        return _execute_batch(changes, command.items, refused)
    return _execute(changes, command)


_ACCOUNT_HANDLERS: dict[type, Callable[[Changes, Any], core_pb2.CommandResult]] = {
    commands.CreateAccount: _create_account,
    commands.SettleTransaction: _finish_pending,
    commands.CancelTransaction: _finish_pending,
    commands.CreateTransfer: transfers.create_transfer,
    commands.CreditLeg: transfers.credit_leg,
    commands.ResolveTransfer: transfers.resolve_transfer,
    commands.ResolveLeg: transfers.resolve_leg,
    commands.FinishTransfer: transfers.finish_transfer,
}


def _execute(changes: Changes, command: commands.Command) -> core_pb2.CommandResult:
    # The common case first: most items of most entries are new transactions.
    if isinstance(command, commands.CreateTransaction) and changes.owns(command.account_id):
        return _create_transaction(changes, command)
    if isinstance(command, commands.Undecodable):
        return failure(core_pb2.OUTCOME_INVALID_COMMAND, command.reason)
    if isinstance(command, commands.Noop):
        return core_pb2.CommandResult(outcome=OK)
    if isinstance(command, commands.Batch):
        # parse_item makes a batch inside a batch Undecodable; this keeps it so for any caller.
        return failure(core_pb2.OUTCOME_INVALID_COMMAND, "a batch inside a batch")
    if isinstance(command, commands.ExpireDue):
        return transfers.expire_due(changes, command)
    if not changes.owns(command.account_id):
        # A gateway with another config routed this here; storing it would strand the account
        # in a shard that will never be asked for it.
        return failure(core_pb2.OUTCOME_SHARD_MISMATCH, "account belongs to another shard")
    return _ACCOUNT_HANDLERS[type(command)](changes, command)


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
        result.metadatas.append(_stored_metadata(view, decode_transaction(data)))
    following = query.start_sequence + len(result.transactions)
    result.next_sequence = following if following < count else 0
    return result


def _stored_metadata(view: ReadTransaction, record: TransactionRecord) -> bytes:
    if not record.flags & TRANSACTION_HAS_METADATA:
        return b""
    key = tables.metadata_key(record.account_id, tables.METADATA_OF_TRANSACTION, record.transaction_number)
    return view.get(tables.METADATA, key) or b""


def _transfer_work(view: ReadTransaction, query: core_pb2.TransferWorkQuery) -> core_pb2.ReadResult:
    if not 1 <= query.limit <= PAGE_SIZE_MAX:
        return _read_failure(core_pb2.OUTCOME_INVALID_COMMAND, f"limit must be 1..{PAGE_SIZE_MAX}")
    result = core_pb2.ReadResult(outcome=OK)
    # The smallest key after `after_key`: the key with a zero byte appended.
    start = query.after_key + b"\0" if query.after_key else b""
    for key, _ in view.scan(tables.TRANSFER_WORK, start, b"", query.limit):
        data = view.get(tables.TRANSACTIONS, key)
        try:
            require_invariant(data is not None, "transfer_work lists a missing transaction")
            assert data is not None  # narrowed for mypy; checked just above
            metadata = _stored_metadata(view, decode_transaction(data))
        except apply_failures.CORRUPT_RECORD_ERRORS as error:
            # Left out, so that it holds up none of the shard's other transfers.
            logger.error("transfer_work row %s left out: %s", key.hex(), error)
            continue
        result.transactions.append(data)
        result.metadatas.append(metadata)
    return result


def _read(
    view: ReadTransaction, query: core_pb2.ReadQuery, owns_account: Callable[[int], bool]
) -> core_pb2.ReadResult:
    kind = query.WhichOneof("query")
    if kind == "transfer_work":
        return _transfer_work(view, query.transfer_work)
    if kind is not None and not owns_account(getattr(query, kind).account_id):
        return _read_failure(core_pb2.OUTCOME_SHARD_MISMATCH, "account belongs to another shard")
    if kind == "get_account":
        data = view.get(tables.ACCOUNTS, tables.account_key(query.get_account.account_id))
        if data is None:
            return _read_failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "account not found")
        metadata = b""
        if decode_account(data).flags & ACCOUNT_HAS_METADATA:
            key = tables.metadata_key(query.get_account.account_id, tables.METADATA_OF_ACCOUNT, 0)
            metadata = view.get(tables.METADATA, key) or b""
        return core_pb2.ReadResult(outcome=OK, account=data, metadata=metadata)
    if kind == "get_transaction":
        wanted = query.get_transaction
        data = view.get(
            tables.TRANSACTIONS, tables.transaction_key(wanted.account_id, wanted.transaction_number)
        )
        if data is None:
            return _read_failure(core_pb2.OUTCOME_TRANSACTION_NOT_FOUND, "transaction not found")
        return core_pb2.ReadResult(
            outcome=OK, transaction=data, metadata=_stored_metadata(view, decode_transaction(data))
        )
    if kind == "list_transactions":
        return _list_transactions(view, query.list_transactions)
    return _read_failure(core_pb2.OUTCOME_INVALID_COMMAND, "empty read query")


def rebuild_expiries(transaction: WriteTransaction) -> None:
    """`expiries` from the transactions: snapshots do not carry it (its keys start with a
    deadline, not an account, so a snapshot could not be split by shard)."""
    transaction.clear(tables.EXPIRIES)
    rows = []
    for _, value in transaction.iterate(tables.TRANSACTIONS):
        try:
            record = decode_transaction(value)
        except RecordFormatError:
            continue  # verification, which runs next, names the row
        if expires_on_its_own(record):
            rows.append((expiry_key_of(record), b""))
    transaction.put_many(tables.EXPIRIES, sorted(rows))


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
        # Commands refused since open because their apply raised (apply_failures.py); read by
        # the replica's applier for its metric.
        self.refused_commands = 0
        storage.write(self._initialize_meta)
        # Mirrors the `recent_requests` table (derived state: rebuilt from it on every open and
        # restore, changed only after a commit), so a lookup of a new request id costs no read.
        self._recent_requests: dict[bytes, int] = {}
        self._reload_recent_requests()

    @classmethod
    def open(
        cls, directory: Path, lower_bound: int, upper_bound: int, *, metasync: bool = True
    ) -> AccountsCore:
        """The core of the shard whose LMDB environment lives in `directory`; `metasync` as
        `Storage`'s."""
        storage = Storage(directory, tables.TABLE_NAMES, metasync=metasync)
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

    def earliest_deadline(self) -> int | None:
        """The earliest `expires_at` of a pending transaction here (Unix ns), if any."""
        with self._storage.read() as view:
            rows = view.scan(tables.EXPIRIES, b"", b"", 1)
        return tables.decode_expiry_key(rows[0][0])[0] if rows else None

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

                def dry_run(refused: Mapping[int, core_pb2.CommandResult]) -> core_pb2.CommandResult:
                    answered, _ = self._execute_checked(
                        view, None, command_bytes, log_index, answering, refused=refused
                    )
                    return answered

                return apply_failures.run_isolating(dry_run, log_index)[0]

        def run(
            refused: Mapping[int, core_pb2.CommandResult], transaction: WriteTransaction
        ) -> tuple[core_pb2.CommandResult, Changes, bool]:
            self._check_unapplied(transaction, log_index)
            result, changes = self._execute_checked(
                transaction, transaction, command_bytes, log_index, answering, refused=refused
            )
            moved = len(self._recent_requests) + len(changes.new_requests) >= self._recent_requests_max
            if moved:
                move_recent_requests(transaction)
            transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(log_index))
            return result, changes, moved

        def write(
            refused: Mapping[int, core_pb2.CommandResult],
        ) -> tuple[core_pb2.CommandResult, Changes, bool]:
            return self._storage.write(functools.partial(run, refused))

        applied, refused_items = apply_failures.run_isolating(write, log_index)
        self.refused_commands += refused_items
        if isinstance(applied, core_pb2.CommandResult):
            # Refused whole: nothing of it stays but its index, so it is consumed exactly once.
            self.refused_commands += 1
            self._storage.write(functools.partial(self._consume_refused_entry, log_index))
            return applied
        result, changes, moved = applied
        # Committed: only now may the memory mirror follow the table.
        if moved:
            self._recent_requests = {}
        else:
            self._recent_requests.update(changes.new_requests)
        return result

    @classmethod
    def _check_unapplied(cls, transaction: WriteTransaction, log_index: int) -> None:
        applied_index = cls._applied_index_in(transaction)
        if log_index <= applied_index:
            # Only this replica's apply thread writes; a higher index here means another
            # process wrote to the same files.
            raise ReplicaBrokenError(
                f"entry {log_index} was applied by another writer (stored index {applied_index})"
            )

    @classmethod
    def _consume_refused_entry(cls, log_index: int, transaction: WriteTransaction) -> None:
        cls._check_unapplied(transaction, log_index)
        transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(log_index))

    def _execute_checked(
        self,
        view: ReadTransaction,
        transaction: WriteTransaction | None,
        command_bytes: bytes,
        log_index: int,
        answering: bool,
        *,
        refused: Mapping[int, core_pb2.CommandResult],
    ) -> tuple[core_pb2.CommandResult, Changes]:
        changes = Changes(view, transaction, answering, self._recent_requests, self.owns_account)
        command = commands.parse(command_bytes)
        result = _execute_entry(changes, command, refused)
        changes.flush(log_index)
        try:
            changes.check()
        except apply_failures.AccountInvariantError as error:
            position = changes.first_item_touching(error.account_id)
            if not isinstance(command, commands.Batch) or position is None:
                raise
            # The first item that touched the account is refused; a later one that touches it
            # then becomes the first, until the account is left alone.
            raise apply_failures.ItemFailedError(position, apply_failures.refusal_of(error)) from error
        result.log_index = log_index
        for item in result.item_results:
            item.log_index = log_index
        return result, changes

    def read(self, query: core_pb2.ReadQuery) -> core_pb2.ReadResult:
        with self._storage.read() as view:
            try:
                result = _read(view, query, self.owns_account)
            except apply_failures.CORRUPT_RECORD_ERRORS as error:
                refusal = apply_failures.refusal_of(error)
                logger.error("read refused: %s", refusal.message)
                result = _read_failure(refusal.outcome, refusal.message)
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

    def verify_report(self) -> tuple[int, str, list[str], verification.TransferSummary]:
        """(applied index, state digest, problems, transfer summary) from one view: what
        `verify` finds, about exactly the state that the digest describes."""
        with self._storage.read() as view:
            applied_index = self._applied_index_in(view)
            return (
                applied_index,
                verification.state_digest(view),
                self._problems_in(view, applied_index),
                verification.transfer_summary(view),
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
            rebuild_expiries(transaction)
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
