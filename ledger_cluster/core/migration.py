"""State formats and the way from the old one to the current one.

State format 1 stored protobuf rows (AccountRecordV1, TransactionRecordV1) and an idempotency
table keyed by the request id's text. Format 2 stores records.py rows and request digests. A
node refuses a data directory of format 1 (it would misread every row); a snapshot or backup of
format 1 is converted row by row as it is restored, and the account totals that format 1 did not
keep (lifetime credits and debits) are recomputed from the transactions. So the way up is: back
up with the release that wrote the data, then `ledger-dev restore` with this one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from ledger_cluster.core import tables
from ledger_cluster.core.balances import NO_TOTALS, Totals, add_totals, contribution
from ledger_cluster.core.recent_requests import recent_request_slices
from ledger_cluster.core.records import (
    NO_REQUEST_DIGEST,
    AccountFlag,
    AccountRecord,
    Status,
    TransactionFlag,
    TransactionRecord,
    decode_account,
    decode_transaction,
    request_digest,
)
from ledger_cluster.errors import SnapshotCorruptError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import INT64_MAX
from ledger_cluster.storage import SnapshotHeader, WriteTransaction

# Snapshot stream versions: 1 carries state format 1 rows, 2 carries state format 2 rows.
SNAPSHOT_FORMAT_VERSION = 2
SNAPSHOT_FORMAT_VERSION_V1 = 1
SNAPSHOT_TABLE_IDS: dict[int, frozenset[int]] = {
    SNAPSHOT_FORMAT_VERSION_V1: tables.SNAPSHOT_TABLE_IDS_V1,
    SNAPSHOT_FORMAT_VERSION: frozenset(tables.SNAPSHOT_TABLES),
}
_V1_STATUSES = frozenset(
    int(status) for status in (Status.PENDING, Status.SETTLED, Status.CANCELLED, Status.INSUFFICIENT_FUNDS)
)


def refusal_of_data_directory(directory: Path, version: int) -> str:
    return (
        f"{directory} holds ledger state format {version}; this release reads format"
        f" {tables.STATE_FORMAT_VERSION} only. To move a cluster up: take a backup with the"
        " release that wrote it (`ledger-dev backup --out DIR`), then restore it with this one"
        " (`ledger-dev restore --backup DIR`), which converts every row"
    )


def _account_of(key: bytes) -> int:
    return tables.decode_u64(key[: tables.ACCOUNT_KEY_BYTES])


class RowSink:
    """Puts the snapshot rows that belong to this shard, converting format 1 rows on the way."""

    def __init__(self, owns_account: Callable[[int], bool]) -> None:
        self._owns_account = owns_account
        self.converted = False
        # Format 1 kept net balances, not lifetime totals: checked against the transactions.
        self._v1_balances: dict[int, tuple[int, int, int]] = {}

    @property
    def table_ids(self) -> dict[int, frozenset[int]]:
        return SNAPSHOT_TABLE_IDS

    def put(
        self, transaction: WriteTransaction, header: SnapshotHeader, table_id: int, key: bytes, value: bytes
    ) -> None:
        if len(key) < tables.ACCOUNT_KEY_BYTES:
            raise SnapshotCorruptError(
                f"snapshot is inconsistent: a key of table {table_id} ({key.hex()}) is shorter than an"
                " account id, so it belongs to no shard"
            )
        if (
            header.format_version == SNAPSHOT_FORMAT_VERSION
            and table_id == tables.SNAPSHOT_TABLE_RECENT_REQUESTS
        ):
            self._put_recent_requests(transaction, key, value)
            return
        if not self._owns_account(_account_of(key)):
            return
        if header.format_version == SNAPSHOT_FORMAT_VERSION:
            transaction.put(tables.SNAPSHOT_TABLES[table_id], key, value)
            return
        self.converted = True
        try:
            self._put_v1(transaction, table_id, key, value)
        except (DecodeError, ValueError, UnicodeError) as error:
            raise SnapshotCorruptError(
                f"format 1 row {key.hex()} of table {table_id} does not convert: {error}"
            ) from None

    def _put_recent_requests(self, transaction: WriteTransaction, key: bytes, value: bytes) -> None:
        """A row of one log entry's new request ids names their accounts inside: this shard keeps
        its own, appended to what another snapshot merged in under the same log index put
        there. A malformed row is kept whole for verification to refuse."""
        if len(value) % tables.RECENT_REQUEST.size:
            transaction.put(tables.RECENT_REQUESTS, key, value)
            return
        kept = b"".join(
            entry for entry in recent_request_slices(value) if self._owns_account(_account_of(entry))
        )
        if kept:
            earlier = transaction.get(tables.RECENT_REQUESTS, key) or b""
            transaction.put(tables.RECENT_REQUESTS, key, earlier + kept)

    def _put_v1(self, transaction: WriteTransaction, table_id: int, key: bytes, value: bytes) -> None:
        if table_id == 1:
            transaction.put(tables.ACCOUNTS, key, self._account_v1(key, value).encode())
        elif table_id == 2:
            transaction.put(tables.TRANSACTIONS, key, _transaction_v1(key, value).encode())
        elif table_id == 3:
            transaction.put(tables.ACCOUNT_TRANSACTIONS, key, value)
        else:
            request_id = key[tables.ACCOUNT_KEY_BYTES :].decode()
            digest_key = tables.request_key(_account_of(key), request_digest(request_id))
            transaction.put(tables.REQUESTS, digest_key, value)

    def _account_v1(self, key: bytes, value: bytes) -> AccountRecord:
        old = core_pb2.AccountRecordV1.FromString(value)
        if old.account_id != _account_of(key):
            raise ValueError(f"account record {old.account_id:016x} under another key")
        self._v1_balances[old.account_id] = (old.settled_balance, old.pending_credits, old.pending_debits)
        return AccountRecord(
            old.account_id,
            old.created_at,
            old.updated_at,
            transaction_count=old.transaction_count,
            flags=AccountFlag.HAS_REQUEST_ID if old.request_id else 0,
            request_digest=request_digest(old.request_id) if old.request_id else NO_REQUEST_DIGEST,
        )

    def finish(self, transaction: WriteTransaction) -> None:
        """Format 1 accounts get the totals their transactions add up to, which must give the
        balances format 1 stored."""
        if not self.converted:
            return
        totals_by_account = _totals_by_account(transaction)
        for account_id, (settled, pending_credits, pending_debits) in sorted(self._v1_balances.items()):
            key = tables.account_key(account_id)
            data = transaction.get(tables.ACCOUNTS, key)
            if data is None:
                continue  # a key of another length: verification refuses that row
            account = decode_account(data)
            totals = totals_by_account.get(account_id, NO_TOTALS)
            if max(totals) > INT64_MAX:
                # Format 1 kept net balances; the lifetime totals of format 2 cannot hold these.
                raise SnapshotCorruptError(
                    f"format 1 account {account_id:016x} moved more than 2^63-1 in or out in its"
                    f" lifetime {totals}, which state format 2's int64 totals cannot hold"
                )
            (
                account.credits_settled,
                account.debits_settled,
                account.credits_pending,
                account.debits_pending,
            ) = totals
            if (account.settled_balance, account.credits_pending, account.debits_pending) != (
                settled,
                pending_credits,
                pending_debits,
            ):
                raise SnapshotCorruptError(
                    f"format 1 account {account_id:016x}: balances (settled, pending credits, pending"
                    f" debits) {(settled, pending_credits, pending_debits)}, its transactions give"
                    f" {(account.settled_balance, account.credits_pending, account.debits_pending)}"
                )
            transaction.put(tables.ACCOUNTS, key, account.encode())


def _transaction_v1(key: bytes, value: bytes) -> TransactionRecord:
    old = core_pb2.TransactionRecordV1.FromString(value)
    if key != tables.transaction_key(old.account_id, old.transaction_number):
        raise ValueError("transaction record under another key")
    if old.status not in _V1_STATUSES or old.initial_status not in _V1_STATUSES:
        raise ValueError(f"statuses {old.status}/{old.initial_status} are not of format 1")
    flags = TransactionFlag.SETTLED_REQUESTED if old.settled_requested else 0
    if old.request_id:
        flags |= TransactionFlag.HAS_REQUEST_ID
    return TransactionRecord(
        old.account_id,
        old.transaction_number,
        old.sequence,
        old.amount,
        old.status,
        old.initial_status,
        old.created_at,
        old.updated_at,
        old.description,
        # Format 1 settled whole amounts only.
        old.amount if old.status == Status.SETTLED else 0,
        flags=flags,
        request_digest=request_digest(old.request_id) if old.request_id else NO_REQUEST_DIGEST,
    )


def _totals_by_account(transaction: WriteTransaction) -> dict[int, Totals]:
    """One pass over every transaction (key order groups each account's together)."""
    totals: dict[int, Totals] = {}
    for _, value in transaction.iterate(tables.TRANSACTIONS):
        record = decode_transaction(value)
        totals[record.account_id] = add_totals(totals.get(record.account_id, NO_TOTALS), contribution(record))
    return totals
