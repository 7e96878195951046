"""Whole-state checks of one shard: every row of every table well-formed, every index and
every total in agreement with the rows it describes. A snapshot can pass its checksum and still
describe an impossible state, so restore runs these before it commits, and `ledger-dev verify`
runs them on every replica.

Each table is read once in key order; an account's own rows are contiguous in every table, so
the per-account sums need no more than one pass each."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ledger_cluster.core import rules, tables
from ledger_cluster.core.balances import (
    NO_TOTALS,
    Totals,
    account_problems,
    add_totals,
    contribution,
    totals_of,
)
from ledger_cluster.core.changes import expires_on_its_own
from ledger_cluster.core.recent_requests import recent_request_entries
from ledger_cluster.core.records import (
    NO_REQUEST_DIGEST,
    AccountFlag,
    AccountRecord,
    Status,
    TransactionFlag,
    TransactionRecord,
    decode_account,
    decode_metadata,
    decode_transaction,
    encode_metadata,
)
from ledger_cluster.errors import RecordFormatError
from ledger_cluster.limits import TIMEOUT_SECONDS_MAX
from ledger_cluster.storage import ReadTransaction

# What a transaction's status can become from the status it was created with: a settled or
# refused one never changes; a pending one is settled, cancelled or expired once. Two more
# happen to transfer legs only: a debit leg whose credit was refused is reversed (CANCELLED,
# flag CREDIT_REFUSED), and such a refused credit leg is stored CANCELLED.
REACHABLE_STATUSES: dict[int, frozenset[int]] = {
    Status.SETTLED: frozenset({Status.SETTLED}),
    Status.INSUFFICIENT_FUNDS: frozenset({Status.INSUFFICIENT_FUNDS}),
    Status.PENDING: frozenset({Status.PENDING, Status.SETTLED, Status.CANCELLED, Status.EXPIRED}),
}
_REVERSED_DEBIT_LEG = frozenset({Status.SETTLED, Status.CANCELLED})
# Where a debit leg whose credit was refused ends: reversed (CANCELLED), or EXPIRED when its
# deadline passed first.
_REVERSED_STATUSES = frozenset({Status.CANCELLED, Status.EXPIRED})
_PENDING_ONLY = frozenset({Status.PENDING})
_REFUSED_CREDIT_LEG = frozenset({Status.PENDING, Status.CANCELLED})
# A listing of problems stops growing here: one bad table would otherwise flood the report.
PROBLEMS_MAX = 100
_LEG_FLAGS = TransactionFlag.DEBIT_LEG | TransactionFlag.CREDIT_LEG
_OWED = TransactionFlag.CREDIT_OWED | TransactionFlag.RESOLVE_OWED


@dataclass(slots=True)
class _Seen:
    """What the transactions of one account add up to."""

    totals: Totals = NO_TOTALS
    count: int = 0
    with_request_ids: int = 0
    indexed: int = 0


@dataclass(slots=True)
class _Flagged:
    """Decodable transaction rows that the smaller tables must list, counted in the one pass
    over the transactions."""

    with_metadata: int = 0
    owing_work: int = 0
    expiring: int = 0


class _Problems(list[str]):
    def add(self, problem: str) -> None:
        if len(self) < PROBLEMS_MAX:
            self.append(problem)


def _decodable(data: bytes | None) -> TransactionRecord | None:
    """The record a row holds, or None when it does not decode (the pass over the
    transactions table reports that row once)."""
    if data is None:
        return None
    try:
        return decode_transaction(data)
    except RecordFormatError:
        return None


def verify_state(
    view: ReadTransaction,
    applied_index: int,
    owns_account: Callable[[int], bool],
    recent_requests_max: int = tables.RECENT_REQUESTS_MAX,
) -> list[str]:
    """Structure and totals of the whole state of the shard whose accounts `owns_account`
    accepts; one line per problem found.

    Not checked, on purpose: that an object was created before it was last updated (`now`
    comes from the clocks of several gateways, which may disagree)."""
    problems = _Problems()
    accounts = _check_accounts(view, owns_account, problems)
    flagged = _Flagged()
    seen = _check_transactions(view, accounts, flagged, problems)
    _check_order_index(view, accounts, seen, problems)
    _check_requests(view, seen, applied_index, recent_requests_max, problems)
    _check_metadata(view, accounts, flagged.with_metadata, problems)
    _check_transfer_work(view, flagged.owing_work, problems)
    _check_expiries(view, flagged.expiring, problems)
    for account_id, account in sorted(accounts.items()):
        _check_account_sums(account, seen.get(account_id, _Seen()), problems)
    return list(problems)


def _account_problem(account: AccountRecord, value: bytes, owns_account: Callable[[int], bool]) -> str | None:
    if account.encode() != value:
        return "is not in its canonical encoding"
    if not owns_account(account.account_id):
        return "belongs to another shard"
    if bool(account.flags & AccountFlag.HAS_REQUEST_ID) == (account.request_digest == NO_REQUEST_DIGEST):
        return "request id flag and digest disagree"
    problem = rules.currency_problem(account.currency)
    if problem is not None:
        return problem.message
    return None


def _check_accounts(
    view: ReadTransaction, owns_account: Callable[[int], bool], problems: _Problems
) -> dict[int, AccountRecord]:
    accounts: dict[int, AccountRecord] = {}
    for key, value in view.iterate(tables.ACCOUNTS):
        try:
            account = decode_account(value)
        except RecordFormatError as error:
            problems.add(f"account row {key.hex()}: {error}")
            continue
        if len(key) != tables.ACCOUNT_KEY_BYTES or account.account_id != tables.decode_u64(key):
            problems.add(f"account row {key.hex()} does not match its record")
            continue
        problem = _account_problem(account, value, owns_account)
        if problem is not None:
            problems.add(f"account row {key.hex()} {problem}")
        for problem in account_problems(account):
            problems.add(problem)
        accounts[account.account_id] = account
    return accounts


def _status_problem(record: TransactionRecord) -> str | None:
    """A status, amount and settled amount that some sequence of commands produces."""
    reachable = REACHABLE_STATUSES.get(record.initial_status, frozenset())
    if record.flags & TransactionFlag.CREDIT_REFUSED and record.flags & TransactionFlag.DEBIT_LEG:
        reachable = reachable | _REVERSED_DEBIT_LEG
    if record.flags & TransactionFlag.CREDIT_LEG and record.initial_status == Status.CANCELLED:
        reachable = frozenset({Status.CANCELLED})
    if record.status not in reachable:
        # An unknown status restores cleanly, then stops every replica that touches it.
        return (
            f"has status {record.status} after initial status {record.initial_status},"
            " which no command produces"
        )
    if record.amount == 0:
        return "has amount 0"
    if record.initial_status == Status.INSUFFICIENT_FUNDS and record.amount > 0:
        return "is a top-up refused for want of funds"
    settled = record.settled_amount
    if record.status == Status.SETTLED:
        partial = record.initial_status == Status.PENDING and (settled > 0) == (record.amount > 0)
        if settled != record.amount and not (partial and abs(settled) <= abs(record.amount)):
            return f"is settled for {settled} of {record.amount}"
    elif settled:
        return f"is {Status(record.status).name} with a settled amount {settled}"
    if record.initial_status in (Status.SETTLED, Status.CANCELLED) and not record.settled_requested:
        return "was created settled without being asked to"
    if record.initial_status == Status.PENDING and record.settled_requested:
        return "was created pending when asked to settle"
    return None


def _transaction_problem(record: TransactionRecord) -> str | None:
    status = _status_problem(record)
    if status is not None:
        return status
    description = rules.description_problem(record.description)
    if description is not None:
        return description.message
    if bool(record.flags & TransactionFlag.HAS_REQUEST_ID) == (record.request_digest == NO_REQUEST_DIGEST):
        return "request id flag and digest disagree"
    return _leg_problem(record)


def _leg_problem(record: TransactionRecord) -> str | None:
    flags = record.flags
    legs = flags & _LEG_FLAGS
    if legs == _LEG_FLAGS:
        return "is both legs of a transfer"
    if not legs:
        if (
            flags & (_OWED | TransactionFlag.CREDIT_REFUSED)
            or record.linked_number
            or record.counterparty_account_id
        ):
            return "is no transfer leg but has a transfer's fields"
        return _expiry_problem(record)
    if record.counterparty_account_id == record.account_id:
        return "is a transfer leg with itself as counterparty"
    if flags & TransactionFlag.DEBIT_LEG and record.amount > 0:
        return "is a debit leg with a positive amount"
    if flags & TransactionFlag.CREDIT_LEG:
        if record.amount < 0 or flags & (
            _OWED | TransactionFlag.CREDIT_REFUSED | TransactionFlag.HAS_REQUEST_ID
        ):
            return "is a credit leg with a debit leg's amount or flags"
        return _expiry_problem(record)
    if record.initial_status == Status.INSUFFICIENT_FUNDS and flags & (
        _OWED | TransactionFlag.CREDIT_REFUSED
    ):
        return "is a refused transfer that owes its credit shard work"
    if flags & TransactionFlag.RESOLVE_OWED and record.status == Status.PENDING:
        # The news owed is a final status: a pending leg has none to pass on.
        return "is a pending debit leg that owes its credit shard a resolution"
    if flags & TransactionFlag.CREDIT_REFUSED and (flags & _OWED or record.status not in _REVERSED_STATUSES):
        return (
            f"is a debit leg whose credit was refused, still {Status(record.status).name}"
            " or owing its credit shard work"
        )
    return _expiry_problem(record)


def _expiry_problem(record: TransactionRecord) -> str | None:
    """A deadline is what `rules.expires_at_of` made of the create's `now` (the row's
    `created_at`) and a timeout the rules allow; a credit leg carries its debit leg's, with the
    debit leg's `created_at`. Only a transaction created pending has one (a credit leg that its
    shard refused is created CANCELLED with its debit leg's), and only one with one expires."""
    if not record.expires_at:
        return "has expired without a deadline" if record.status == Status.EXPIRED else None
    creatable = _REFUSED_CREDIT_LEG if record.flags & TransactionFlag.CREDIT_LEG else _PENDING_ONLY
    if record.initial_status not in creatable:
        return f"has a deadline but was created {Status(record.initial_status).name}"
    if not rules.is_deadline_of(record.created_at, record.expires_at):
        return (
            f"has deadline {record.expires_at} for a creation at {record.created_at}, which no"
            f" timeout of 1..{TIMEOUT_SECONDS_MAX} whole seconds gives"
        )
    return None


def _check_transactions(
    view: ReadTransaction,
    accounts: dict[int, AccountRecord],
    flagged: _Flagged,
    problems: _Problems,
) -> dict[int, _Seen]:
    seen: dict[int, _Seen] = {}
    for key, value in view.iterate(tables.TRANSACTIONS):
        where = f"transaction row {key.hex()}"
        try:
            record = decode_transaction(value)
        except RecordFormatError as error:
            problems.add(f"{where}: {error}")
            continue
        flagged.with_metadata += bool(record.flags & TransactionFlag.HAS_METADATA)
        flagged.owing_work += bool(record.flags & _OWED)
        flagged.expiring += expires_on_its_own(record)
        if len(key) != 16 or key != tables.transaction_key(record.account_id, record.transaction_number):
            problems.add(f"{where} does not match its record")
            continue
        account = accounts.get(record.account_id)
        if account is None:
            problems.add(f"{where} belongs to a missing account")
            continue
        problem = _transaction_problem(record)
        if problem is None and record.encode() != value:
            problem = "is not in its canonical encoding"
        if problem is not None:
            problems.add(f"{where} {problem}")
        if record.sequence >= account.transaction_count:
            problems.add(f"{where} has sequence {record.sequence} past its account's count")
        elif view.get(
            tables.ACCOUNT_TRANSACTIONS, tables.sequence_key(record.account_id, record.sequence)
        ) != tables.encode_u64(record.transaction_number):
            problems.add(f"{where} is not in its account's order index")
        sums = seen.setdefault(record.account_id, _Seen())
        sums.totals = add_totals(sums.totals, contribution(record))
        sums.count += 1
        sums.with_request_ids += bool(record.flags & TransactionFlag.HAS_REQUEST_ID)
    return seen


def _check_order_index(
    view: ReadTransaction, accounts: dict[int, AccountRecord], seen: dict[int, _Seen], problems: _Problems
) -> None:
    for key, value in view.iterate(tables.ACCOUNT_TRANSACTIONS):
        where = f"account_transactions row {key.hex()}"
        if len(key) != 16 or len(value) != 8:
            problems.add(f"{where} is malformed")
            continue
        account_id, sequence = tables.decode_u64(key[:8]), tables.decode_u64(key[8:])
        record = _decodable(view.get(tables.TRANSACTIONS, key[:8] + value))
        if account_id not in accounts or record is None:
            problems.add(f"{where} points at no transaction")
            continue
        if record.sequence != sequence:
            problems.add(f"{where} points at a transaction of another sequence")
        seen.setdefault(account_id, _Seen()).indexed += 1


def _request_target_problem(
    view: ReadTransaction, account_key: bytes, digest: bytes, number: int
) -> str | None:
    record = _decodable(view.get(tables.TRANSACTIONS, account_key + tables.encode_u64(number)))
    if record is None:
        return "points at no decodable transaction"
    if not record.flags & TransactionFlag.HAS_REQUEST_ID or record.request_digest != digest:
        return "points at a transaction of another request id"
    return None


def _check_requests(
    view: ReadTransaction,
    seen: dict[int, _Seen],
    applied_index: int,
    recent_requests_max: int,
    problems: _Problems,
) -> None:
    """Every request id in exactly one of the two tables, pointing at its transaction; with
    the counts per account equal, that is one entry per transaction that has a request id."""
    indexed: dict[int, int] = {}
    for key, value in view.iterate(tables.REQUESTS):
        where = f"requests row {key.hex()}"
        if len(key) != tables.ACCOUNT_KEY_BYTES + 16 or len(value) != 8:
            problems.add(f"{where} is malformed")
            continue
        problem = _request_target_problem(view, key[:8], key[8:], tables.decode_u64(value))
        if problem is not None:
            problems.add(f"{where} {problem}")
        account_id = tables.decode_u64(key[:8])
        indexed[account_id] = indexed.get(account_id, 0) + 1
    recent: set[bytes] = set()
    for key, value in view.iterate(tables.RECENT_REQUESTS):
        where = f"recent_requests row {key.hex()}"
        if len(key) != 8 or not value or len(value) % tables.RECENT_REQUEST.size:
            problems.add(f"{where} is malformed")
            continue
        if tables.decode_u64(key) > applied_index:
            problems.add(f"{where} names a log entry past the applied index {applied_index}")
        for digest_key, number in recent_request_entries(value):
            problem = _request_target_problem(view, digest_key[:8], digest_key[8:], number)
            if problem is None and (
                digest_key in recent or view.get(tables.REQUESTS, digest_key) is not None
            ):
                problem = f"names request {digest_key.hex()} twice"
            if problem is not None:
                problems.add(f"{where} {problem}")
            account_id = tables.decode_u64(digest_key[:8])
            indexed[account_id] = indexed.get(account_id, 0) + 1
            recent.add(digest_key)
    if len(recent) >= recent_requests_max:
        problems.add(f"recent_requests holds {len(recent)} ids; they move at {recent_requests_max}")
    for account_id in sorted(set(indexed) | set(seen)):
        wanted = seen[account_id].with_request_ids if account_id in seen else 0
        if indexed.get(account_id, 0) != wanted:
            problems.add(
                f"account {account_id:016x}: {wanted} transactions with a request id,"
                f" {indexed.get(account_id, 0)} request id entries"
            )


def _check_metadata(
    view: ReadTransaction, accounts: dict[int, AccountRecord], flagged_transactions: int, problems: _Problems
) -> None:
    """Every metadata row belongs to a record flagged as having metadata, and decodes to
    entries the rules allow, in canonical order; every flagged record has its row."""
    rows = 0
    for key, value in view.iterate(tables.METADATA):
        where = f"metadata row {key.hex()}"
        if len(key) != 17:
            problems.add(f"{where} is malformed")
            continue
        account_id, kind, number = tables.decode_u64(key[:8]), key[8], tables.decode_u64(key[9:])
        if kind == tables.METADATA_OF_ACCOUNT:
            account = accounts.get(account_id)
            owner_flagged = (
                account is not None and number == 0 and bool(account.flags & AccountFlag.HAS_METADATA)
            )
        else:
            record = _decodable(view.get(tables.TRANSACTIONS, key[:8] + key[9:]))
            owner_flagged = (
                kind == tables.METADATA_OF_TRANSACTION
                and record is not None
                and bool(record.flags & TransactionFlag.HAS_METADATA)
            )
        if not owner_flagged:
            problems.add(f"{where} belongs to no record flagged with metadata")
        problem = _metadata_value_problem(value)
        if problem is not None:
            problems.add(f"{where} {problem}")
        rows += 1
    flagged = flagged_transactions + sum(
        1 for account in accounts.values() if account.flags & AccountFlag.HAS_METADATA
    )
    if flagged != rows:
        problems.add(f"{flagged} records are flagged with metadata, {rows} metadata rows exist")


def _metadata_value_problem(value: bytes) -> str | None:
    try:
        entries = decode_metadata(value)
    except RecordFormatError as error:
        return str(error)
    if not entries:
        return "is empty"
    problem = rules.metadata_problem(entries)
    if problem is not None:
        return problem.message
    if encode_metadata(tuple(sorted(entries))) != value:
        return "is not in its canonical encoding"
    return None


def _check_transfer_work(view: ReadTransaction, owing: int, problems: _Problems) -> None:
    """`transfer_work` lists exactly the debit legs that owe their credit shard work."""
    listed = 0
    for key, value in view.iterate(tables.TRANSFER_WORK):
        record = _decodable(view.get(tables.TRANSACTIONS, key))
        if (
            value
            or record is None
            or not record.flags & TransactionFlag.DEBIT_LEG
            or not record.flags & _OWED
        ):
            problems.add(f"transfer_work row {key.hex()} lists no debit leg that owes work")
        listed += 1
    if owing != listed:
        problems.add(f"{owing} debit legs owe work, transfer_work lists {listed}")


def _check_expiries(view: ReadTransaction, due: int, problems: _Problems) -> None:
    """`expiries` lists exactly the pending transactions and debit legs with a deadline."""
    listed = 0
    for key, value in view.iterate(tables.EXPIRIES):
        try:
            expires_at, account_id, number = tables.decode_expiry_key(key)
        except struct.error:
            problems.add(f"expiries row {key.hex()} is malformed")
            continue
        record = _decodable(view.get(tables.TRANSACTIONS, tables.transaction_key(account_id, number)))
        if value or record is None or not expires_on_its_own(record) or record.expires_at != expires_at:
            problems.add(f"expiries row {key.hex()} lists no pending transaction with that deadline")
        listed += 1
    if due != listed:
        problems.add(f"{due} pending transactions have a deadline, expiries lists {listed}")


def _check_account_sums(account: AccountRecord, seen: _Seen, problems: _Problems) -> None:
    where = f"account {account.account_id:016x}"
    stored = (*totals_of(account), account.transaction_count)
    found = (*seen.totals, seen.count)
    if stored != found:
        problems.add(
            f"{where}: stored (credits settled, debits settled, credits pending, debits pending,"
            f" count) {stored} but its transactions give {found}"
        )
    if seen.indexed != account.transaction_count:
        problems.add(f"{where}: {account.transaction_count} transactions, {seen.indexed} in its order index")


def state_digest(view: ReadTransaction) -> str:
    """sha256 over every data record of the view, in table and key order."""
    digest = hashlib.sha256()
    for table_id, name in sorted(tables.SNAPSHOT_TABLES.items()):
        for key, value in view.iterate(name):
            digest.update(table_id.to_bytes(1, "big"))
            digest.update(len(key).to_bytes(4, "big") + key)
            digest.update(len(value).to_bytes(4, "big") + value)
    return digest.hexdigest()


# -- transfers across shards ---------------------------------------------------------------------

_HASH_MODULUS = 2**128


@dataclass(slots=True)
class CurrencyFlow:
    settled: int = 0
    pending: int = 0


@dataclass(slots=True)
class TransferSummary:
    """What this shard holds of transfers, summed so that shards compare without listing their
    legs (see `transfer_summary`). Its hashes cover the legs of transfers within the shard too:
    the check is one sum over the cluster."""

    debit_legs_hash: int = 0
    credit_legs_hash: int = 0
    debit_legs: int = 0
    credit_legs: int = 0
    unfinished: int = 0
    currencies: dict[str, CurrencyFlow] | None = None


def leg_tuple_hash(
    debit_account_id: int,
    transfer_number: int,
    credit_account_id: int,
    credit_number: int,
    amounts: tuple[int, int, int],
) -> int:
    amount, status, settled = amounts
    fields = (debit_account_id, transfer_number, credit_account_id, credit_number, amount, status, settled)
    text = ":".join(str(field) for field in fields)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")


def _crosses(record: TransactionRecord) -> bool:
    """A leg whose transfer has another leg somewhere: not refused for funds, not reversed."""
    if record.flags & TransactionFlag.DEBIT_LEG:
        return (
            record.initial_status != Status.INSUFFICIENT_FUNDS
            and not record.flags & TransactionFlag.CREDIT_REFUSED
        )
    return record.initial_status != Status.CANCELLED


def transfer_summary(view: ReadTransaction) -> TransferSummary:
    """Across the whole cluster, once quiet: the sums of the debit-leg hashes and of the
    credit-leg hashes are equal (each transfer's legs agree, on one shard or two: a restore
    into another layout may move them together or apart), nothing is
    unfinished, and per currency the settled and the pending amounts of all legs sum to zero
    (transfers move money, never make it)."""
    summary = TransferSummary(currencies={})
    currencies: dict[int, str] = {}
    for key, value in view.iterate(tables.ACCOUNTS):
        try:
            currencies[tables.decode_u64(key)] = decode_account(value).currency
        except RecordFormatError:
            continue  # verify_state names the row
    flows = summary.currencies
    assert flows is not None  # set just above
    for _, value in view.iterate(tables.TRANSACTIONS):
        record = _decodable(value)
        if record is None or not record.flags & _LEG_FLAGS:
            continue
        flow = flows.setdefault(currencies.get(record.account_id, ""), CurrencyFlow())
        flow.settled += record.settled_amount
        flow.pending += record.amount if record.status == Status.PENDING else 0
        if not _crosses(record):
            continue
        if record.flags & TransactionFlag.DEBIT_LEG:
            amounts = (-record.amount, record.status, -record.settled_amount)
            summary.debit_legs_hash += leg_tuple_hash(
                record.account_id,
                record.transaction_number,
                record.counterparty_account_id,
                record.linked_number,
                amounts,
            )
            summary.debit_legs += 1
        else:
            amounts = (record.amount, record.status, record.settled_amount)
            summary.credit_legs_hash += leg_tuple_hash(
                record.counterparty_account_id,
                record.linked_number,
                record.account_id,
                record.transaction_number,
                amounts,
            )
            summary.credit_legs += 1
    summary.debit_legs_hash %= _HASH_MODULUS
    summary.credit_legs_hash %= _HASH_MODULUS
    summary.unfinished = view.count(tables.TRANSFER_WORK)
    return summary
