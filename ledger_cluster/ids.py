"""Account and transaction ids: fixed-width lowercase hex of big-endian unsigned integers.

An account id is one uint64 (16 hex chars). A transaction id is the account id followed by the
transaction's uint64 number (32 hex chars), so the owning account, and with it the shard, is
known from the transaction id alone.
"""

import functools
from typing import NamedTuple

from ledger_cluster.errors import InvalidIdError
from ledger_cluster.text import echo

ACCOUNT_ID_HEX_LENGTH = 16
TRANSACTION_ID_HEX_LENGTH = 32
UINT64_MAX = 2**64 - 1

_HEX_DIGITS = frozenset("0123456789abcdef")
# Batch calls name the same accounts over and over; parsing was a tenth of the gateway's time.
PARSED_ACCOUNT_IDS_CACHED_MAX = 2**16


class TransactionId(NamedTuple):
    account_id: int
    transaction_number: int


def _parse_hex(text: str, length: int, what: str) -> int:
    if len(text) != length or not _HEX_DIGITS.issuperset(text):
        raise InvalidIdError(f"{what} must be {length} lowercase hex characters, got {echo(text)}")
    return int(text, 16)


def _check_uint64(value: int, what: str) -> None:
    if not 0 <= value <= UINT64_MAX:
        raise InvalidIdError(f"{what} {value} does not fit in uint64")


def parse_account_id(text: str) -> int:
    # Checked before the cache, which would otherwise hash a huge malformed input first.
    if len(text) != ACCOUNT_ID_HEX_LENGTH:
        raise InvalidIdError(
            f"account id must be {ACCOUNT_ID_HEX_LENGTH} lowercase hex characters, got {echo(text)}"
        )
    return _parse_account_id_cached(text)


@functools.lru_cache(maxsize=PARSED_ACCOUNT_IDS_CACHED_MAX)
def _parse_account_id_cached(text: str) -> int:
    return _parse_hex(text, ACCOUNT_ID_HEX_LENGTH, "account id")


def format_account_id(account_id: int) -> str:
    _check_uint64(account_id, "account id")
    return f"{account_id:016x}"


def parse_transaction_id(text: str) -> TransactionId:
    value = _parse_hex(text, TRANSACTION_ID_HEX_LENGTH, "transaction id")
    return TransactionId(account_id=value >> 64, transaction_number=value & UINT64_MAX)


def format_transaction_id(account_id: int, transaction_number: int) -> str:
    _check_uint64(account_id, "account id")
    _check_uint64(transaction_number, "transaction number")
    return f"{account_id:016x}{transaction_number:016x}"
