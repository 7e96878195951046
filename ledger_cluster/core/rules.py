"""The rules a command must meet, written once: the gateway refuses a request that breaks one
(INVALID_ARGUMENT with the problem's reason) before it reaches a shard, and the core refuses a
command that breaks one all the same (a log entry may come from another gateway, or an older
one), changing nothing.

Each rule is a pure function returning the Problem it finds, or None. They import nothing of
the public API or of gRPC: the core may not."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ledger_cluster.limits import (
    BATCH_ITEMS_MAX,
    CURRENCY_CHARACTERS_MAX,
    DESCRIPTION_BYTES_MAX,
    INT64_MAX,
    METADATA_ENTRIES_MAX,
    METADATA_KEY_BYTES_MAX,
    METADATA_VALUE_BYTES_MAX,
    REQUEST_ID_BYTES_MAX,
    TIMEOUT_SECONDS_MAX,
)

INVALID_AMOUNT = "INVALID_AMOUNT"
DESCRIPTION_TOO_LONG = "DESCRIPTION_TOO_LONG"
REQUEST_ID_TOO_LONG = "REQUEST_ID_TOO_LONG"
BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
INVALID_CURRENCY = "INVALID_CURRENCY"
INVALID_OVERDRAFT_LIMIT = "INVALID_OVERDRAFT_LIMIT"
INVALID_METADATA = "INVALID_METADATA"
INVALID_TIMEOUT = "INVALID_TIMEOUT"
INVALID_SETTLE_AMOUNT = "INVALID_SETTLE_AMOUNT"
SAME_ACCOUNT = "SAME_ACCOUNT"

_CURRENCY = re.compile(rf"[A-Z0-9_]{{1,{CURRENCY_CHARACTERS_MAX}}}")
_METADATA_KEY = re.compile(rf"[a-z0-9_.\-]{{1,{METADATA_KEY_BYTES_MAX}}}")
_NANOSECONDS_PER_SECOND = 1_000_000_000

# A code point is at most this many UTF-8 bytes, so text of at most limit / 4 characters fits
# without being encoded (the common case, checked for every item of every entry).
_UTF8_BYTES_PER_CHARACTER_MAX = 4


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a command is refused: `reason` is the public error reason (UPPER_SNAKE), `message`
    says what was wrong and what the rule allows."""

    reason: str
    message: str


def _text_problem(text: str, name: str, limit: int, reason: str) -> Problem | None:
    """A Problem when `text` exceeds `limit` UTF-8 bytes."""
    if len(text) * _UTF8_BYTES_PER_CHARACTER_MAX <= limit:
        return None
    size = len(text.encode())
    if size > limit:
        return Problem(reason, f"{name} is {size} UTF-8 bytes; at most {limit}")
    return None


def amount_problem(amount: int) -> Problem | None:
    if amount == 0:
        return Problem(INVALID_AMOUNT, "amount must not be zero: > 0 is a top-up, < 0 a purchase")
    return None


def description_problem(description: str) -> Problem | None:
    return _text_problem(description, "description", DESCRIPTION_BYTES_MAX, DESCRIPTION_TOO_LONG)


def request_id_problem(request_id: str) -> Problem | None:
    return _text_problem(request_id, "request_id", REQUEST_ID_BYTES_MAX, REQUEST_ID_TOO_LONG)


# Texts this many characters long or shorter fit their limit whatever they hold.
_DESCRIPTION_CHARACTERS_SAFE = DESCRIPTION_BYTES_MAX // _UTF8_BYTES_PER_CHARACTER_MAX
_REQUEST_ID_CHARACTERS_SAFE = REQUEST_ID_BYTES_MAX // _UTF8_BYTES_PER_CHARACTER_MAX


def create_transaction_problem(amount: int, description: str, request_id: str) -> Problem | None:
    """The first problem of a CreateTransaction, checked in this order."""
    if (
        amount
        and len(description) <= _DESCRIPTION_CHARACTERS_SAFE
        and len(request_id) <= _REQUEST_ID_CHARACTERS_SAFE
    ):
        return None  # the common case, without a call per rule (every item of every entry)
    return amount_problem(amount) or description_problem(description) or request_id_problem(request_id)


def batch_size_problem(count: int) -> Problem | None:
    """An empty batch is no problem: it applies nothing and answers no item."""
    if count > BATCH_ITEMS_MAX:
        return Problem(BATCH_TOO_LARGE, f"{count} items; a batch holds at most {BATCH_ITEMS_MAX}")
    return None


def currency_problem(currency: str) -> Problem | None:
    if currency and not _CURRENCY.fullmatch(currency):
        return Problem(
            INVALID_CURRENCY,
            f"currency must be empty or 1-{CURRENCY_CHARACTERS_MAX} characters of [A-Z0-9_],"
            f" got {currency!r}",
        )
    return None


def overdraft_limit_problem(overdraft_limit: int) -> Problem | None:
    if overdraft_limit < 0:
        return Problem(INVALID_OVERDRAFT_LIMIT, f"overdraft_limit must be >= 0, got {overdraft_limit}")
    return None


def metadata_problem(entries: Sequence[tuple[str, str]]) -> Problem | None:
    """Entries as (key, value) pairs; a key twice is a problem (a command's list may hold one)."""
    if not entries:
        return None
    if len(entries) > METADATA_ENTRIES_MAX:
        return Problem(INVALID_METADATA, f"{len(entries)} metadata entries; at most {METADATA_ENTRIES_MAX}")
    keys = set()
    for key, value in entries:
        if not _METADATA_KEY.fullmatch(key):
            return Problem(
                INVALID_METADATA,
                f"metadata key {key[:80]!r} must be 1-{METADATA_KEY_BYTES_MAX} characters of [a-z0-9_.-]",
            )
        if key in keys:
            return Problem(INVALID_METADATA, f"metadata key {key!r} appears twice")
        keys.add(key)
        size = len(value.encode())
        if size > METADATA_VALUE_BYTES_MAX:
            return Problem(
                INVALID_METADATA,
                f"metadata value of {key!r} is {size} UTF-8 bytes; at most {METADATA_VALUE_BYTES_MAX}",
            )
    return None


def timeout_problem(timeout_seconds: int, settled: bool) -> Problem | None:
    if timeout_seconds == 0:
        return None
    if settled:
        return Problem(INVALID_TIMEOUT, "timeout_seconds applies to pending writes only (settled is set)")
    if not 0 < timeout_seconds <= TIMEOUT_SECONDS_MAX:
        return Problem(
            INVALID_TIMEOUT,
            f"timeout_seconds must be 1..{TIMEOUT_SECONDS_MAX} (30 days), got {timeout_seconds}",
        )
    return None


def expires_at_of(now: int, timeout_seconds: int) -> int:
    """The deadline of a write created at `now`: 0 (never) without a timeout; capped at int64."""
    if timeout_seconds <= 0:
        return 0
    return min(now + timeout_seconds * _NANOSECONDS_PER_SECOND, INT64_MAX)


def is_deadline_of(created_at: int, expires_at: int) -> bool:
    """Whether `expires_at_of(created_at, t)` gives `expires_at` for a timeout t the rules allow."""
    if expires_at == INT64_MAX:
        # Capped: any timeout long enough to reach past int64 gives it.
        return created_at + TIMEOUT_SECONDS_MAX * _NANOSECONDS_PER_SECOND >= INT64_MAX
    timeout_ns = expires_at - created_at
    return (
        timeout_ns % _NANOSECONDS_PER_SECOND == 0
        and _NANOSECONDS_PER_SECOND <= timeout_ns <= TIMEOUT_SECONDS_MAX * _NANOSECONDS_PER_SECOND
    )


def create_account_problem(
    request_id: str, currency: str, overdraft_limit: int, metadata: Sequence[tuple[str, str]]
) -> Problem | None:
    return (
        request_id_problem(request_id)
        or currency_problem(currency)
        or overdraft_limit_problem(overdraft_limit)
        or metadata_problem(metadata)
    )


def create_transaction_extras_problem(
    metadata: Sequence[tuple[str, str]], timeout_seconds: int, settled: bool
) -> Problem | None:
    """The second wave's fields of a CreateTransaction, apart so the common case (none) costs
    one test."""
    if not metadata and not timeout_seconds:
        return None
    return metadata_problem(metadata) or timeout_problem(timeout_seconds, settled)


def settle_amount_problem(requested: int, amount: int) -> Problem | None:
    """A settle of `requested` (0: all) of a transaction of `amount` (signed)."""
    if requested == 0:
        return None
    if (requested > 0) != (amount > 0) or abs(requested) > abs(amount):
        return Problem(
            INVALID_SETTLE_AMOUNT,
            f"settle amount must be 0 (all) or 1..{abs(amount)} with the transaction's sign, got {requested}",
        )
    return None


def transfer_settle_amount_problem(requested: int) -> Problem | None:
    """What the edge can tell without the transfer: its amounts are positive."""
    if requested < 0:
        return Problem(
            INVALID_SETTLE_AMOUNT, f"settle amount of a transfer must be >= 0 (0: all), got {requested}"
        )
    return None


def create_transfer_problem(  # noqa: PLR0917 - the request's fields, checked in order
    debit_account_id: int,
    credit_account_id: int,
    amount: int,
    description: str,
    request_id: str,
    metadata: Sequence[tuple[str, str]],
    timeout_seconds: int,
    settled: bool,
) -> Problem | None:
    if debit_account_id == credit_account_id:
        return Problem(SAME_ACCOUNT, "debit and credit account must differ")
    if amount <= 0:
        return Problem(INVALID_AMOUNT, f"transfer amount must be > 0, got {amount}")
    return (
        description_problem(description)
        or request_id_problem(request_id)
        or metadata_problem(metadata)
        or timeout_problem(timeout_seconds, settled)
    )
