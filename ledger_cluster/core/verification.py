"""Whole-state checks of one shard: every row of every table well-formed, every index and
every total in agreement with the rows it describes. A snapshot can pass its checksum and still
describe an impossible state, so restore runs these before it commits, and `ledger-dev verify`
runs them on every replica.

Each table is read once in key order; an account's own rows are contiguous in every table, so
the per-account sums need no more than one pass each."""

from __future__ import annotations

import hashlib
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
from ledger_cluster.core.recent_requests import recent_request_entries
from ledger_cluster.core.records import (
    NO_REQUEST_DIGEST,
    AccountFlag,
    AccountRecord,
    Status,
    TransactionFlag,
    TransactionRecord,
    decode_account,
    decode_transaction,
)
from ledger_cluster.errors import RecordFormatError
from ledger_cluster.storage import ReadTransaction

# What a transaction's status can become from the status it was created with: a settled or
# refused one never changes; a pending one is settled or cancelled once.
REACHABLE_STATUSES: dict[int, frozenset[int]] = {
    Status.SETTLED: frozenset({Status.SETTLED}),
    Status.INSUFFICIENT_FUNDS: frozenset({Status.INSUFFICIENT_FUNDS}),
    Status.PENDING: frozenset({Status.PENDING, Status.SETTLED, Status.CANCELLED}),
}
# A listing of problems stops growing here: one bad table would otherwise flood the report.
PROBLEMS_MAX = 100
_LEG_FLAGS = TransactionFlag.DEBIT_LEG | TransactionFlag.CREDIT_LEG


@dataclass(slots=True)
class _Seen:
    """What the transactions of one account add up to."""

    totals: Totals = NO_TOTALS
    count: int = 0
    with_request_ids: int = 0
    indexed: int = 0


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
    seen = _check_transactions(view, accounts, problems)
    _check_order_index(view, accounts, seen, problems)
    _check_requests(view, seen, applied_index, recent_requests_max, problems)
    _check_metadata(view, problems)
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
    # What no command of this release sets changes how later commands behave: refused.
    if account.currency or account.overdraft_limit or account.flags & AccountFlag.HAS_METADATA:
        return "has a currency, an overdraft limit or metadata, which this release does not set"
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
    if record.status not in REACHABLE_STATUSES.get(record.initial_status, ()):
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
        if settled != record.amount:
            return f"is settled for {settled} of {record.amount}"
    elif settled:
        return f"is {Status(record.status).name} with a settled amount {settled}"
    if record.initial_status == Status.SETTLED and not record.settled_requested:
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
    # What no command of this release sets changes how later commands behave: refused.
    if record.flags & (_LEG_FLAGS | TransactionFlag.HAS_METADATA) or record.transfer_number:
        return "is a transfer leg or has metadata, which this release does not make"
    if record.counterparty_account_id or record.expires_at:
        return "has a counterparty or an expiry, which this release does not set"
    return None


def _check_transactions(
    view: ReadTransaction, accounts: dict[int, AccountRecord], problems: _Problems
) -> dict[int, _Seen]:
    seen: dict[int, _Seen] = {}
    for key, value in view.iterate(tables.TRANSACTIONS):
        where = f"transaction row {key.hex()}"
        try:
            record = decode_transaction(value)
        except RecordFormatError as error:
            problems.add(f"{where}: {error}")
            continue
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


def _check_metadata(view: ReadTransaction, problems: _Problems) -> None:
    """The metadata table is laid out for the next release (issue 14): this one writes none."""
    for key, _ in view.iterate(tables.METADATA):
        problems.add(f"metadata row {key.hex()} exists, and this release writes none")


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
