"""Key layout of the core's tables (state format 2). Every key is big-endian and fixed-width, so
an LMDB cursor walks records in a meaningful order, and every data key but one starts with the
8-byte account id, so the shard of a record is known from its key alone (snapshots rely on it).
The exception, recent_requests, names its accounts in its values, and restore splits them.

    accounts              account id (8)                         -> AccountRecord (records.py)
    transactions          account id (8) + number (8)            -> TransactionRecord
    account_transactions  account id (8) + sequence (8)          -> number (8)   apply order
    requests              account id (8) + request digest (16)   -> number (8)
    recent_requests       log index (8)            -> (account id (8) + digest (16) + number (8))*
    metadata              account id (8) + kind (1) + number (8) -> records.encode_metadata
    transfer_work         account id (8) + number (8)            -> b""  debit legs owing work
    expiries              expires at (8) + account id (8) + number (8) -> b""
    meta                  name                                   -> value

`expiries` lists the pending transactions (and debit legs) with a deadline, in deadline order.
It is derived from the transactions: not shipped in snapshots (its keys start with a time, not
an account), rebuilt by restore.

Idempotency lives in two tables. `requests` is keyed by a random digest, so one insert per item
would dirty one B-tree leaf per item. New request ids go to `recent_requests` instead, one row
per log entry (appended at the end of the table, in a few contiguous pages), and a copy of them
is kept in memory for lookups. When that table holds RECENT_REQUESTS_MAX ids, the entry that
reached it moves them all into `requests` in key order: one pass over the leaves for many ids.
"""

from __future__ import annotations

import struct

ACCOUNTS = "accounts"
TRANSACTIONS = "transactions"
ACCOUNT_TRANSACTIONS = "account_transactions"
REQUESTS = "requests"
RECENT_REQUESTS = "recent_requests"
METADATA = "metadata"
TRANSFER_WORK = "transfer_work"
EXPIRIES = "expiries"
META = "meta"
TABLE_NAMES = (
    ACCOUNTS,
    TRANSACTIONS,
    ACCOUNT_TRANSACTIONS,
    REQUESTS,
    RECENT_REQUESTS,
    METADATA,
    TRANSFER_WORK,
    EXPIRIES,
    META,
)
METADATA_OF_ACCOUNT = 0
METADATA_OF_TRANSACTION = 1

# Snapshot table ids: a wire contract, never renumbered. Meta is not shipped: the restoring
# side writes its own from the snapshot header and its own shard bounds. Id 4 was format 1's
# idempotency table (account + request id text -> number), read only to migrate.
SNAPSHOT_TABLES = {
    1: ACCOUNTS,
    2: TRANSACTIONS,
    3: ACCOUNT_TRANSACTIONS,
    5: REQUESTS,
    6: RECENT_REQUESTS,
    7: METADATA,
    8: TRANSFER_WORK,
}
SNAPSHOT_TABLE_RECENT_REQUESTS = 6
SNAPSHOT_TABLE_V1_IDEMPOTENCY = 4
SNAPSHOT_TABLE_IDS_V1 = frozenset({1, 2, 3, SNAPSHOT_TABLE_V1_IDEMPOTENCY})

META_APPLIED_INDEX = b"applied_index"
META_SHARD_BOUNDS = b"shard_bounds"
META_FORMAT_VERSION = b"format_version"
STATE_FORMAT_VERSION = 2

# Request ids held in `recent_requests` (and in memory, about 130 bytes each: 17 MiB for a full
# shard) before they move into `requests`. Larger means fewer leaf writes per id and more
# memory: at 1.6 million ids in `requests` (about 16k leaves), a move writes every leaf, about
# 0.5 KiB per id moved at this size.
RECENT_REQUESTS_MAX = 131_072

_U64 = struct.Struct(">Q")
_TWO_U64 = struct.Struct(">QQ")
_BOUNDS = struct.Struct(">II")
ACCOUNT_KEY_BYTES = 8
# One new request id in a recent_requests row: account id, digest, transaction number.
RECENT_REQUEST = struct.Struct(">Q16sQ")
RECENT_REQUEST_KEY_BYTES = ACCOUNT_KEY_BYTES + 16


def account_key(account_id: int) -> bytes:
    return _U64.pack(account_id)


def transaction_key(account_id: int, transaction_number: int) -> bytes:
    return _TWO_U64.pack(account_id, transaction_number)


def sequence_key(account_id: int, sequence: int) -> bytes:
    return _TWO_U64.pack(account_id, sequence)


def request_key(account_id: int, digest: bytes) -> bytes:
    return _U64.pack(account_id) + digest


def recent_requests_key(log_index: int) -> bytes:
    return _U64.pack(log_index)


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(data: bytes) -> int:
    return int(_U64.unpack(data)[0])


def encode_bounds(lower_bound: int, upper_bound: int) -> bytes:
    return _BOUNDS.pack(lower_bound, upper_bound)


def decode_bounds(data: bytes) -> tuple[int, int]:
    lower, upper = _BOUNDS.unpack(data)
    return int(lower), int(upper)


def metadata_key(account_id: int, kind: int, number: int) -> bytes:
    return _METADATA_KEY.pack(account_id, kind, number)


def expiry_key(expires_at: int, account_id: int, number: int) -> bytes:
    return _EXPIRY_KEY.pack(expires_at, account_id, number)


def decode_expiry_key(key: bytes) -> tuple[int, int, int]:
    expires_at, account_id, number = _EXPIRY_KEY.unpack(key)
    return int(expires_at), int(account_id), int(number)


_METADATA_KEY = struct.Struct(">QBQ")
_EXPIRY_KEY = struct.Struct(">QQQ")
