"""The public messages built from the core's records: the one place where a stored row becomes
what a client sees. The core answers with record bytes (records.py) and knows nothing of the
public API, so the API can grow without a log or storage format change."""

from __future__ import annotations

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core.records import (
    AccountRecord,
    Status,
    TransactionRecord,
    decode_account,
    decode_transaction,
)
from ledger_cluster.ids import format_account_id, format_transaction_id

# By name, not by number: stored statuses and the public enum may part.
_PUBLIC_STATUS: dict[int, ledger_pb2.TransactionStatus.ValueType] = {
    int(status): ledger_pb2.TransactionStatus.Value(f"TRANSACTION_STATUS_{status.name}")
    for status in Status
    if f"TRANSACTION_STATUS_{status.name}" in ledger_pb2.TransactionStatus.DESCRIPTOR.values_by_name
}


def public_status(status: int) -> ledger_pb2.TransactionStatus.ValueType:
    return _PUBLIC_STATUS[status]


def account_message(record: AccountRecord) -> ledger_pb2.Account:
    return ledger_pb2.Account(
        id=format_account_id(record.account_id),
        available_balance=record.available_balance,
        settled_balance=record.settled_balance,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def account_view(data: bytes, repeat: bool = False) -> ledger_pb2.Account:
    """A repeated CreateAccount answers the account exactly as it was first created."""
    record = decode_account(data)
    if repeat:
        return ledger_pb2.Account(
            id=format_account_id(record.account_id),
            created_at=record.created_at,
            updated_at=record.created_at,
        )
    return account_message(record)


def transaction_message(record: TransactionRecord) -> ledger_pb2.Transaction:
    return ledger_pb2.Transaction(
        id=format_transaction_id(record.account_id, record.transaction_number),
        amount=record.amount,
        description=record.description,
        status=public_status(record.status),
        created_at=record.created_at,
        updated_at=record.updated_at,
        account_id=format_account_id(record.account_id),
    )


def transaction_view(data: bytes, repeat: bool = False) -> ledger_pb2.Transaction:
    """A repeated CreateTransaction answers the transaction exactly as it was first created."""
    record = decode_transaction(data)
    view = transaction_message(record)
    if repeat:
        view.status = public_status(record.initial_status)
        view.updated_at = record.created_at
    return view
