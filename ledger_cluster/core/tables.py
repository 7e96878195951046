"""Key layout of the core's tables. Every key is big-endian and fixed-width where it can be, so
an LMDB cursor walks records in a meaningful order, and every data key starts with the 8-byte
account id, so the shard of any record is known from its key alone (snapshots rely on it).

    accounts              account id (8)                    -> AccountRecord
    transactions          account id (8) + number (8)       -> TransactionRecord
    account_transactions  account id (8) + sequence (8)     -> number (8)   apply order
    idempotency           account id (8) + request id UTF-8 -> number (8)
    meta                  name                              -> value
"""

from __future__ import annotations

import struct

from ledger_cluster.api.v1 import core_pb2

ACCOUNTS = "accounts"
TRANSACTIONS = "transactions"
ACCOUNT_TRANSACTIONS = "account_transactions"
IDEMPOTENCY = "idempotency"
META = "meta"
TABLE_NAMES = (ACCOUNTS, TRANSACTIONS, ACCOUNT_TRANSACTIONS, IDEMPOTENCY, META)

# Snapshot table ids: a wire contract, never renumbered. Meta is not shipped: the restoring
# side writes its own from the snapshot header and its own shard bounds.
SNAPSHOT_TABLES = {1: ACCOUNTS, 2: TRANSACTIONS, 3: ACCOUNT_TRANSACTIONS, 4: IDEMPOTENCY}

META_APPLIED_INDEX = b"applied_index"
META_SHARD_BOUNDS = b"shard_bounds"
META_FORMAT_VERSION = b"format_version"
STATE_FORMAT_VERSION = 1

_U64 = struct.Struct(">Q")
_BOUNDS = struct.Struct(">II")


def account_key(account_id: int) -> bytes:
    return _U64.pack(account_id)


def transaction_key(account_id: int, transaction_number: int) -> bytes:
    return _U64.pack(account_id) + _U64.pack(transaction_number)


def sequence_key(account_id: int, sequence: int) -> bytes:
    return _U64.pack(account_id) + _U64.pack(sequence)


def idempotency_key(account_id: int, request_id: str) -> bytes:
    return _U64.pack(account_id) + request_id.encode()


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(data: bytes) -> int:
    return int(_U64.unpack(data)[0])


def encode_bounds(lower_bound: int, upper_bound: int) -> bytes:
    return _BOUNDS.pack(lower_bound, upper_bound)


def decode_bounds(data: bytes) -> tuple[int, int]:
    lower, upper = _BOUNDS.unpack(data)
    return int(lower), int(upper)


def encode_record(record: core_pb2.AccountRecord | core_pb2.TransactionRecord) -> bytes:
    # Deterministic serialization: every replica must store identical bytes.
    return record.SerializeToString(deterministic=True)


def decode_account(data: bytes) -> core_pb2.AccountRecord:
    return core_pb2.AccountRecord.FromString(data)


def decode_transaction(data: bytes) -> core_pb2.TransactionRecord:
    return core_pb2.TransactionRecord.FromString(data)
