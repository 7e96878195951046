"""The rules a command must meet, written once: the gateway refuses a request that breaks one
(INVALID_ARGUMENT with the problem's reason) before it reaches a shard, and the core refuses a
command that breaks one all the same (a log entry may come from another gateway, or an older
one), changing nothing.

Each rule is a pure function returning the Problem it finds, or None. They import nothing of
the public API or of gRPC: the core may not."""

from __future__ import annotations

from dataclasses import dataclass

from ledger_cluster.limits import BATCH_ITEMS_MAX, DESCRIPTION_BYTES_MAX, REQUEST_ID_BYTES_MAX

INVALID_AMOUNT = "INVALID_AMOUNT"
DESCRIPTION_TOO_LONG = "DESCRIPTION_TOO_LONG"
REQUEST_ID_TOO_LONG = "REQUEST_ID_TOO_LONG"
BATCH_TOO_LARGE = "BATCH_TOO_LARGE"

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
