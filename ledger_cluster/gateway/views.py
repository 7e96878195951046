"""The public messages built from the core's records: the one place where a stored row becomes
what a client sees. The core answers with record bytes (records.py) and knows nothing of the
public API, so the API can grow without a log or storage format change."""

from __future__ import annotations

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core.records import (
    CREDIT_LEG,
    CREDIT_REFUSED,
    DEBIT_LEG,
    INSUFFICIENT_FUNDS,
    AccountRecord,
    Status,
    TransactionRecord,
    decode_account,
    decode_metadata,
    decode_transaction,
)
from ledger_cluster.ids import format_account_id, format_transaction_id

# By name, not by number: stored statuses and the public enum may part.
_PUBLIC_STATUS: dict[int, ledger_pb2.TransactionStatus.ValueType] = {
    int(status): ledger_pb2.TransactionStatus.Value(f"TRANSACTION_STATUS_{status.name}")
    for status in Status
    if f"TRANSACTION_STATUS_{status.name}" in ledger_pb2.TransactionStatus.DESCRIPTOR.values_by_name
}


_PUBLIC_TRANSFER_STATUS: dict[int, ledger_pb2.TransferStatus.ValueType] = {
    int(status): ledger_pb2.TransferStatus.Value(f"TRANSFER_STATUS_{status.name}") for status in Status
}


def public_status(status: int) -> ledger_pb2.TransactionStatus.ValueType:
    return _PUBLIC_STATUS[status]


def metadata_map(data: bytes) -> dict[str, str]:
    return dict(decode_metadata(data)) if data else {}


def account_message(record: AccountRecord, metadata: bytes = b"") -> ledger_pb2.Account:
    return ledger_pb2.Account(
        id=format_account_id(record.account_id),
        available_balance=record.available_balance,
        settled_balance=record.settled_balance,
        created_at=record.created_at,
        updated_at=record.updated_at,
        currency=record.currency,
        overdraft_limit=record.overdraft_limit,
        credits_settled=record.credits_settled,
        debits_settled=record.debits_settled,
        credits_pending=record.credits_pending,
        debits_pending=record.debits_pending,
        metadata=metadata_map(metadata),
    )


def account_view(data: bytes, repeat: bool = False, metadata: bytes = b"") -> ledger_pb2.Account:
    """A repeated CreateAccount answers the account exactly as it was first created."""
    record = decode_account(data)
    if repeat:
        return ledger_pb2.Account(
            id=format_account_id(record.account_id),
            created_at=record.created_at,
            updated_at=record.created_at,
            currency=record.currency,
            overdraft_limit=record.overdraft_limit,
            metadata=metadata_map(metadata),
        )
    return account_message(record, metadata)


def transfer_id_of(record: TransactionRecord) -> str:
    """The transfer a leg belongs to: the debit leg's own id."""
    if record.flags & DEBIT_LEG:
        return format_transaction_id(record.account_id, record.transaction_number)
    if record.flags & CREDIT_LEG:
        return format_transaction_id(record.counterparty_account_id, record.linked_number)
    return ""


def transaction_message(record: TransactionRecord, metadata: bytes = b"") -> ledger_pb2.Transaction:
    view = ledger_pb2.Transaction(
        id=format_transaction_id(record.account_id, record.transaction_number),
        amount=record.amount,
        description=record.description,
        status=public_status(record.status),
        created_at=record.created_at,
        updated_at=record.updated_at,
        account_id=format_account_id(record.account_id),
        settled_amount=record.settled_amount,
        expires_at=record.expires_at,
        metadata=metadata_map(metadata),
    )
    if record.flags & (DEBIT_LEG | CREDIT_LEG):
        view.transfer_id = transfer_id_of(record)
        view.counterparty_account_id = format_account_id(record.counterparty_account_id)
    return view


def transaction_view(data: bytes, repeat: bool = False, metadata: bytes = b"") -> ledger_pb2.Transaction:
    """A repeated CreateTransaction answers the transaction exactly as it was first created."""
    record = decode_transaction(data)
    view = transaction_message(record, metadata)
    if repeat:
        view.status = public_status(record.initial_status)
        view.updated_at = record.created_at
        view.settled_amount = record.amount if record.initial_status == Status.SETTLED else 0
    return view


def transfer_message(
    debit_leg: TransactionRecord, metadata: bytes = b"", credit_number: int | None = None
) -> ledger_pb2.Transfer:
    """A transfer is its debit leg; `credit_number` is the credit leg's number when the caller
    knows it better than the debit leg does (C answered, D not yet told)."""
    status = Status.CANCELLED if debit_leg.flags & CREDIT_REFUSED else debit_leg.status
    view = ledger_pb2.Transfer(
        id=format_transaction_id(debit_leg.account_id, debit_leg.transaction_number),
        debit_account_id=format_account_id(debit_leg.account_id),
        credit_account_id=format_account_id(debit_leg.counterparty_account_id),
        amount=-debit_leg.amount,
        status=_PUBLIC_TRANSFER_STATUS[status],
        description=debit_leg.description,
        created_at=debit_leg.created_at,
        updated_at=debit_leg.updated_at,
        settled_amount=-debit_leg.settled_amount,
        expires_at=debit_leg.expires_at,
        metadata=metadata_map(metadata),
        debit_transaction_id=format_transaction_id(debit_leg.account_id, debit_leg.transaction_number),
    )
    if debit_leg.initial_status != INSUFFICIENT_FUNDS and not debit_leg.flags & CREDIT_REFUSED:
        number = debit_leg.linked_number if credit_number is None else credit_number
        view.credit_transaction_id = format_transaction_id(debit_leg.counterparty_account_id, number)
    return view
