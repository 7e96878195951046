"""The stored rows of state format 2: fixed-layout records packed with `struct`, big-endian.

A row is decoded once per entry per account and encoded once when the entry is done, so its
layout is a wire contract of the state (and of snapshots and of the node's answers to the
gateway, which carry these very bytes). Each layout starts with its own version byte: a later
layout adds fields behind a new version and both are read.

Account (106 bytes)::

    u8 layout | u8 flags | u64 account id | 16s currency (ASCII, NUL padded) | i64 overdraft limit
    | i64 credits settled | i64 debits settled | i64 credits pending | i64 debits pending
    | i64 created at | i64 updated at | u64 transaction count | 16s request digest

Transaction (102 bytes + description)::

    u8 layout | u8 status | u8 initial status | u8 flags | u64 account id
    | u64 transaction number | u64 sequence | i64 amount
    | i64 settled amount | i64 created at | i64 updated at | i64 expires at
    | 16s request digest | u64 transfer number | u64 counterparty account id
    | u16 description length | description (UTF-8)

A transfer's legs are transactions flagged DEBIT_LEG / CREDIT_LEG: `linked number` is the number
of the other leg (on the counterparty account), so each leg names the other (docs/transfers.md).

Metadata lives in its own table (tables.METADATA), encoded by `encode_metadata`.

Rows repeat the ids of their key, so an answer (one record's bytes) is complete on its own.
Balances are derived, never stored: settled = credits settled - debits settled, available =
settled - debits pending. Totals only grow or shrink with the transactions they sum, which is
what `verify` recomputes.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from ledger_cluster.errors import RecordFormatError

ACCOUNT_LAYOUT = 1
TRANSACTION_LAYOUT = 1
CURRENCY_BYTES_MAX = 16
REQUEST_DIGEST_BYTES = 16
NO_REQUEST_DIGEST = bytes(REQUEST_DIGEST_BYTES)
DESCRIPTION_LENGTH_MAX = 2**16 - 1

_ACCOUNT = struct.Struct(">BBQ16sqqqqqqqQ16s")
_TRANSACTION_HEAD = struct.Struct(">BBBBQQQqqqqq16sQQH")
ACCOUNT_RECORD_BYTES = _ACCOUNT.size
TRANSACTION_HEAD_BYTES = _TRANSACTION_HEAD.size


class Status(enum.IntEnum):
    """A transaction's status as stored. The numbers equal the public API's TransactionStatus
    today, but the gateway maps them by name: the two may part."""

    PENDING = 1
    SETTLED = 2
    CANCELLED = 3
    INSUFFICIENT_FUNDS = 4
    EXPIRED = 5


_STATUSES = frozenset(int(status) for status in Status)
# Plain ints of the same values for the apply path: enum arithmetic costs microseconds per item.
PENDING = int(Status.PENDING)
SETTLED = int(Status.SETTLED)
CANCELLED = int(Status.CANCELLED)
INSUFFICIENT_FUNDS = int(Status.INSUFFICIENT_FUNDS)
EXPIRED = int(Status.EXPIRED)
# A transaction in one of these statuses never changes again.
FINAL_STATUSES = frozenset({SETTLED, CANCELLED, INSUFFICIENT_FUNDS, EXPIRED})


class AccountFlag(enum.IntFlag):
    HAS_REQUEST_ID = 1
    HAS_METADATA = 2


class TransactionFlag(enum.IntFlag):
    SETTLED_REQUESTED = 1
    HAS_REQUEST_ID = 2
    HAS_METADATA = 4
    # One leg of a transfer: the debit leg when the account is the transfer's debit side.
    DEBIT_LEG = 8
    CREDIT_LEG = 16
    # A debit leg whose shard still owes the credit shard work: storing the credit leg, or
    # passing on a settle, cancel or expiry. Listed in `transfer_work` while either is set.
    CREDIT_OWED = 32
    RESOLVE_OWED = 64
    # The credit shard refused the credit leg (its account would leave int64): the debit leg
    # was reversed (CANCELLED).
    CREDIT_REFUSED = 128


ACCOUNT_HAS_REQUEST_ID = int(AccountFlag.HAS_REQUEST_ID)
TRANSACTION_SETTLED_REQUESTED = int(TransactionFlag.SETTLED_REQUESTED)
TRANSACTION_HAS_REQUEST_ID = int(TransactionFlag.HAS_REQUEST_ID)
TRANSACTION_HAS_METADATA = int(TransactionFlag.HAS_METADATA)
DEBIT_LEG = int(TransactionFlag.DEBIT_LEG)
CREDIT_LEG = int(TransactionFlag.CREDIT_LEG)
CREDIT_OWED = int(TransactionFlag.CREDIT_OWED)
RESOLVE_OWED = int(TransactionFlag.RESOLVE_OWED)
CREDIT_REFUSED = int(TransactionFlag.CREDIT_REFUSED)
OWED_WORK = CREDIT_OWED | RESOLVE_OWED
LEG_FLAGS = DEBIT_LEG | CREDIT_LEG
ACCOUNT_HAS_METADATA = int(AccountFlag.HAS_METADATA)
_ACCOUNT_FLAGS = int(AccountFlag.HAS_REQUEST_ID | AccountFlag.HAS_METADATA)
_TRANSACTION_FLAGS = int(
    TransactionFlag.SETTLED_REQUESTED
    | TransactionFlag.HAS_REQUEST_ID
    | TransactionFlag.HAS_METADATA
    | TransactionFlag.DEBIT_LEG
    | TransactionFlag.CREDIT_LEG
    | TransactionFlag.CREDIT_OWED
    | TransactionFlag.RESOLVE_OWED
    | TransactionFlag.CREDIT_REFUSED
)


def request_digest(request_id: str) -> bytes:
    """The 128-bit digest that stands for a request_id in every stored row and key.

    Collision rule: two request ids of one account with the same digest are one request id.
    For n ids on one account that happens with probability about n^2 / 2^129 (below 10^-20 for
    a billion ids), and a crafted pair costs about 2^64 hash evaluations; its only effect is
    that the second request is answered as a repeat of the first (or REQUEST_ID_REUSED)."""
    return hashlib.blake2b(request_id.encode(), digest_size=REQUEST_DIGEST_BYTES).digest()


@dataclass(slots=True)
class AccountRecord:
    account_id: int
    created_at: int
    updated_at: int
    currency: str = ""
    overdraft_limit: int = 0
    credits_settled: int = 0
    debits_settled: int = 0
    credits_pending: int = 0
    debits_pending: int = 0
    transaction_count: int = 0
    flags: int = 0
    request_digest: bytes = NO_REQUEST_DIGEST

    @property
    def settled_balance(self) -> int:
        return self.credits_settled - self.debits_settled

    @property
    def available_balance(self) -> int:
        return self.credits_settled - self.debits_settled - self.debits_pending

    def encode(self) -> bytes:
        # struct would cut a longer value to the field's width without a word.
        if len(self.currency) > CURRENCY_BYTES_MAX or len(self.request_digest) != REQUEST_DIGEST_BYTES:
            raise RecordFormatError(f"account {self.account_id:016x}: currency or digest does not fit")
        return _ACCOUNT.pack(
            ACCOUNT_LAYOUT,
            self.flags,
            self.account_id,
            self.currency.encode("ascii"),
            self.overdraft_limit,
            self.credits_settled,
            self.debits_settled,
            self.credits_pending,
            self.debits_pending,
            self.created_at,
            self.updated_at,
            self.transaction_count,
            self.request_digest,
        )

    def copy(self) -> AccountRecord:
        return AccountRecord(
            self.account_id,
            self.created_at,
            self.updated_at,
            self.currency,
            self.overdraft_limit,
            self.credits_settled,
            self.debits_settled,
            self.credits_pending,
            self.debits_pending,
            self.transaction_count,
            self.flags,
            self.request_digest,
        )


def decode_account(data: bytes) -> AccountRecord:
    if len(data) != ACCOUNT_RECORD_BYTES:
        raise RecordFormatError(f"account record of {len(data)} bytes, not {ACCOUNT_RECORD_BYTES}")
    (
        layout,
        flags,
        account_id,
        currency,
        overdraft_limit,
        credits_settled,
        debits_settled,
        credits_pending,
        debits_pending,
        created_at,
        updated_at,
        transaction_count,
        digest,
    ) = _ACCOUNT.unpack(data)
    if layout != ACCOUNT_LAYOUT:
        raise RecordFormatError(f"account record layout {layout} is unknown")
    if flags & ~_ACCOUNT_FLAGS:
        raise RecordFormatError(f"account record flags {flags:#x} are unknown")
    # Positional: decoding is on every item's path, and keywords cost a third of it.
    return AccountRecord(
        account_id,
        created_at,
        updated_at,
        _decode_currency(currency),
        overdraft_limit,
        credits_settled,
        debits_settled,
        credits_pending,
        debits_pending,
        transaction_count,
        flags,
        digest,
    )


def _decode_currency(data: bytes) -> str:
    text = data.rstrip(b"\0")
    if b"\0" in text or not text.isascii():
        raise RecordFormatError(f"currency {data!r} is not NUL-padded ASCII")
    return text.decode("ascii")


@dataclass(slots=True)
class TransactionRecord:
    account_id: int
    transaction_number: int
    sequence: int
    amount: int
    status: int
    initial_status: int
    created_at: int
    updated_at: int
    description: str = ""
    settled_amount: int = 0
    expires_at: int = 0
    flags: int = 0
    request_digest: bytes = NO_REQUEST_DIGEST
    linked_number: int = 0
    counterparty_account_id: int = 0

    @property
    def settled_requested(self) -> bool:
        return bool(self.flags & TRANSACTION_SETTLED_REQUESTED)

    def encode(self) -> bytes:
        return encode_transaction(
            self.account_id,
            self.transaction_number,
            self.sequence,
            self.amount,
            self.status,
            self.initial_status,
            self.created_at,
            self.updated_at,
            self.description,
            self.settled_amount,
            self.expires_at,
            self.flags,
            self.request_digest,
            self.linked_number,
            self.counterparty_account_id,
        )


def encode_transaction(  # noqa: PLR0917 - the row's fields in order, positional for speed
    account_id: int,
    transaction_number: int,
    sequence: int,
    amount: int,
    status: int,
    initial_status: int,
    created_at: int,
    updated_at: int,
    description: str,
    settled_amount: int,
    expires_at: int,
    flags: int,
    digest: bytes,
    linked_number: int,
    counterparty_account_id: int,
) -> bytes:
    """A transaction row from its fields, in TransactionRecord's order: a new transaction is
    written without building the record object first."""
    text = description.encode()
    if len(digest) != REQUEST_DIGEST_BYTES or len(text) > DESCRIPTION_LENGTH_MAX:
        raise RecordFormatError(f"transaction {transaction_number:016x}: digest or description does not fit")
    return (
        _TRANSACTION_HEAD.pack(
            TRANSACTION_LAYOUT,
            status,
            initial_status,
            flags,
            account_id,
            transaction_number,
            sequence,
            amount,
            settled_amount,
            created_at,
            updated_at,
            expires_at,
            digest,
            linked_number,
            counterparty_account_id,
            len(text),
        )
        + text
    )


def decode_transaction(data: bytes) -> TransactionRecord:
    if len(data) < TRANSACTION_HEAD_BYTES:
        raise RecordFormatError(f"transaction record of {len(data)} bytes is cut short")
    (
        layout,
        status,
        initial_status,
        flags,
        account_id,
        transaction_number,
        sequence,
        amount,
        settled_amount,
        created_at,
        updated_at,
        expires_at,
        digest,
        linked_number,
        counterparty,
        description_length,
    ) = _TRANSACTION_HEAD.unpack_from(data)
    if layout != TRANSACTION_LAYOUT:
        raise RecordFormatError(f"transaction record layout {layout} is unknown")
    if status not in _STATUSES or initial_status not in _STATUSES:
        raise RecordFormatError(f"transaction statuses {status}/{initial_status} are unknown")
    if flags & ~_TRANSACTION_FLAGS:
        raise RecordFormatError(f"transaction record flags {flags:#x} are unknown")
    if len(data) != TRANSACTION_HEAD_BYTES + description_length:
        raise RecordFormatError(
            f"transaction record of {len(data)} bytes, its description says"
            f" {TRANSACTION_HEAD_BYTES + description_length}"
        )
    try:
        description = data[TRANSACTION_HEAD_BYTES:].decode() if description_length else ""
    except UnicodeDecodeError as error:
        raise RecordFormatError(f"transaction description is not UTF-8: {error}") from None
    return TransactionRecord(
        account_id,
        transaction_number,
        sequence,
        amount,
        status,
        initial_status,
        created_at,
        updated_at,
        description,
        settled_amount,
        expires_at,
        flags,
        digest,
        linked_number,
        counterparty,
    )


# -- metadata ------------------------------------------------------------------------------------

# Entries sorted by key, each: u8 key length | key | u16 value length | value (UTF-8).
Metadata = tuple[tuple[str, str], ...]
_METADATA_KEY_LENGTH = struct.Struct(">B")
_METADATA_VALUE_LENGTH = struct.Struct(">H")


def encode_metadata(entries: Metadata) -> bytes:
    """Canonical bytes of metadata entries (already sorted by key and within the rules'
    limits): equal metadata, equal bytes, so it compares as part of an idempotency payload."""
    parts = []
    for key, value in entries:
        key_bytes, value_bytes = key.encode(), value.encode()
        parts.append(_METADATA_KEY_LENGTH.pack(len(key_bytes)) + key_bytes)
        parts.append(_METADATA_VALUE_LENGTH.pack(len(value_bytes)) + value_bytes)
    return b"".join(parts)


def decode_metadata(data: bytes) -> Metadata:
    entries = []
    position = 0
    try:
        while position < len(data):
            (key_length,) = _METADATA_KEY_LENGTH.unpack_from(data, position)
            position += _METADATA_KEY_LENGTH.size
            key = data[position : position + key_length].decode()
            position += key_length
            (value_length,) = _METADATA_VALUE_LENGTH.unpack_from(data, position)
            position += _METADATA_VALUE_LENGTH.size
            value = data[position : position + value_length]
            if len(value) != value_length:
                raise RecordFormatError("metadata value is cut short")
            entries.append((key, value.decode()))
            position += value_length
    except (struct.error, UnicodeDecodeError) as error:
        raise RecordFormatError(f"metadata does not decode: {error}") from None
    return tuple(entries)
