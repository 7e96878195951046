"""The SDK's results: frozen dataclasses built from the API's messages, so callers never see a
generated class. Timestamps stay Unix nanoseconds and amounts stay minor units, as on the wire."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ledger_cluster.api.v1 import ledger_pb2

# The wire enums carry a prefix (TRANSACTION_STATUS_PENDING); the SDK drops it.
_TRANSACTION_STATUS_PREFIX = "TRANSACTION_STATUS_"
_TRANSFER_STATUS_PREFIX = "TRANSFER_STATUS_"


class TransactionStatus(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    PENDING = "PENDING"
    SETTLED = "SETTLED"
    CANCELLED = "CANCELLED"
    # A purchase that would have overdrawn the account: recorded, and the call succeeded.
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    EXPIRED = "EXPIRED"


# The API's two status enums have the same members and meanings; the SDK has one enum under
# both names, so code that handles a hold of either kind compares against one set of values.
TransferStatus = TransactionStatus


@dataclass(frozen=True)
class Account:
    id: str
    currency: str
    available_balance: int
    settled_balance: int
    overdraft_limit: int
    credits_settled: int
    debits_settled: int
    credits_pending: int
    debits_pending: int
    created_at: int
    updated_at: int
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: ledger_pb2.Account) -> Account:
        return cls(
            id=message.id,
            currency=message.currency,
            available_balance=message.available_balance,
            settled_balance=message.settled_balance,
            overdraft_limit=message.overdraft_limit,
            credits_settled=message.credits_settled,
            debits_settled=message.debits_settled,
            credits_pending=message.credits_pending,
            debits_pending=message.debits_pending,
            created_at=message.created_at,
            updated_at=message.updated_at,
            metadata=dict(message.metadata),
        )


@dataclass(frozen=True)
class Transaction:
    id: str
    account_id: str
    amount: int
    status: TransactionStatus
    settled_amount: int
    description: str
    created_at: int
    updated_at: int
    expires_at: int
    # Set on the legs of a transfer only.
    transfer_id: str
    counterparty_account_id: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: ledger_pb2.Transaction) -> Transaction:
        status_name = ledger_pb2.TransactionStatus.Name(message.status)
        return cls(
            id=message.id,
            account_id=message.account_id,
            amount=message.amount,
            status=TransactionStatus(status_name.removeprefix(_TRANSACTION_STATUS_PREFIX)),
            settled_amount=message.settled_amount,
            description=message.description,
            created_at=message.created_at,
            updated_at=message.updated_at,
            expires_at=message.expires_at,
            transfer_id=message.transfer_id,
            counterparty_account_id=message.counterparty_account_id,
            metadata=dict(message.metadata),
        )


@dataclass(frozen=True)
class Transfer:
    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    status: TransferStatus
    settled_amount: int
    description: str
    created_at: int
    updated_at: int
    expires_at: int
    debit_transaction_id: str
    credit_transaction_id: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: ledger_pb2.Transfer) -> Transfer:
        status_name = ledger_pb2.TransferStatus.Name(message.status)
        return cls(
            id=message.id,
            debit_account_id=message.debit_account_id,
            credit_account_id=message.credit_account_id,
            amount=message.amount,
            status=TransferStatus(status_name.removeprefix(_TRANSFER_STATUS_PREFIX)),
            settled_amount=message.settled_amount,
            description=message.description,
            created_at=message.created_at,
            updated_at=message.updated_at,
            expires_at=message.expires_at,
            debit_transaction_id=message.debit_transaction_id,
            credit_transaction_id=message.credit_transaction_id,
            metadata=dict(message.metadata),
        )


@dataclass(frozen=True)
class TransactionPage:
    transactions: tuple[Transaction, ...]
    # Empty on the last page.
    next_page_token: str

    @classmethod
    def from_message(cls, message: ledger_pb2.ListTransactionsResponse) -> TransactionPage:
        return cls(
            transactions=tuple(Transaction.from_message(item) for item in message.transactions),
            next_page_token=message.next_page_token,
        )


@dataclass(frozen=True)
class NewTransaction:
    """One item of `create_transactions`; a request id is generated when none is given."""

    account_id: str
    amount: int
    description: str = ""
    settled: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: int = 0
    request_id: str | None = None


@dataclass(frozen=True)
class NewTransfer:
    """One item of `create_transfers`; a request id is generated when none is given."""

    debit_account_id: str
    credit_account_id: str
    amount: int
    description: str = ""
    settled: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: int = 0
    request_id: str | None = None
