"""Request checks at the edge: a request that fails one (a malformed id, a broken limit, a zero
amount) gets INVALID_ARGUMENT with a reason and never reaches a shard. The rules on commands
are `core.rules`, which the core applies again to every command; this module turns their
problems into API errors. Page tokens and the account id that a CreateAccount `request_id`
stands for live here too."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping

import grpc

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core import commands, rules
from ledger_cluster.core.records import Metadata
from ledger_cluster.core.rules import Problem
from ledger_cluster.errors import InvalidIdError
from ledger_cluster.ids import TransactionId, parse_account_id, parse_transaction_id
from ledger_cluster.limits import PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX
from ledger_cluster.status import ApiError
from ledger_cluster.text import escaped

PAGE_TOKEN_VERSION = 1
_PAGE_TOKEN_CHECKSUM_BYTES = 8
_PAGE_TOKEN_BYTES = 1 + 8 + 8 + _PAGE_TOKEN_CHECKSUM_BYTES
_PAGE_TOKEN_CONTEXT = b"ledger-cluster/page-token/v1"
# A base64 page token of _PAGE_TOKEN_BYTES is 34 characters; anything much longer is garbage,
# refused before it is decoded.
PAGE_TOKEN_CHARACTERS_MAX = 64
_ACCOUNT_REQUEST_CONTEXT = b"ledger-cluster/account-request-id/v1"


def invalid(reason: str, message: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def account_id_of(text: str) -> int:
    try:
        return parse_account_id(text)
    except InvalidIdError as error:
        raise invalid("INVALID_ACCOUNT_ID", str(error), account_id=escaped(text)) from None


def _id_of(text: str, reason: str, field_name: str) -> TransactionId:
    """A transaction id (a transfer's has the same form), or INVALID_ARGUMENT `reason` naming
    the field it came in."""
    try:
        return parse_transaction_id(text)
    except InvalidIdError as error:
        raise invalid(reason, str(error), **{field_name: escaped(text)}) from None


def transaction_id_of(text: str) -> TransactionId:
    return _id_of(text, "INVALID_TRANSACTION_ID", "transaction_id")


def _raise_problem(problem: Problem | None) -> None:
    if problem is not None:
        raise invalid(problem.reason, problem.message)


def check_request_id(request_id: str) -> None:
    _raise_problem(rules.request_id_problem(request_id))


def metadata_of(metadata: Mapping[str, str]) -> Metadata:
    return commands.canonical_metadata(metadata)


def check_create_account(request: ledger_pb2.CreateAccountRequest) -> None:
    _raise_problem(
        rules.create_account_problem(
            request.request_id, request.currency, request.overdraft_limit, metadata_of(request.metadata)
        )
    )


def check_create_transaction(request: ledger_pb2.CreateTransactionRequest) -> None:
    _raise_problem(rules.create_transaction_problem(request.amount, request.description, request.request_id))
    if request.metadata or request.timeout_seconds:
        _raise_problem(
            rules.create_transaction_extras_problem(
                metadata_of(request.metadata), request.timeout_seconds, request.settled
            )
        )


def check_create_transfer(
    request: ledger_pb2.CreateTransferRequest, debit_account_id: int, credit_account_id: int
) -> None:
    _raise_problem(
        rules.create_transfer_problem(
            debit_account_id,
            credit_account_id,
            request.amount,
            request.description,
            request.request_id,
            metadata_of(request.metadata),
            request.timeout_seconds,
            request.settled,
        )
    )


def check_transfer_settle_amount(amount: int) -> None:
    _raise_problem(rules.transfer_settle_amount_problem(amount))


def transfer_id_of(text: str) -> TransactionId:
    return _id_of(text, "INVALID_TRANSFER_ID", "transfer_id")


def check_batch_size(count: int) -> None:
    _raise_problem(rules.batch_size_problem(count))


def page_size_of(requested: int) -> int:
    if requested < 0:
        raise invalid("INVALID_PAGE_SIZE", f"page_size must not be negative, got {requested}")
    if requested == 0:
        return PAGE_SIZE_DEFAULT
    return min(requested, PAGE_SIZE_MAX)


def _page_token_checksum(body: bytes) -> bytes:
    """A checksum, not a signature: it turns away garbage and tokens of another account's
    listing. A token someone built by hand can only name another position in the listing of
    the same account, which its caller may read anyway."""
    return hashlib.sha256(_PAGE_TOKEN_CONTEXT + body).digest()[:_PAGE_TOKEN_CHECKSUM_BYTES]


def encode_page_token(account_id: int, sequence: int) -> str:
    body = bytes([PAGE_TOKEN_VERSION]) + account_id.to_bytes(8, "big") + sequence.to_bytes(8, "big")
    return base64.urlsafe_b64encode(body + _page_token_checksum(body)).decode().rstrip("=")


def decode_page_token(token: str, account_id: int) -> int:
    """The start sequence a token encodes, if it was issued for this account's listing."""
    bad = invalid("INVALID_PAGE_TOKEN", "page_token was not issued for this account's listing")
    if len(token) > PAGE_TOKEN_CHARACTERS_MAX:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        raise bad from None
    if len(raw) != _PAGE_TOKEN_BYTES or raw[0] != PAGE_TOKEN_VERSION:
        raise bad
    body, checksum = raw[:-_PAGE_TOKEN_CHECKSUM_BYTES], raw[-_PAGE_TOKEN_CHECKSUM_BYTES:]
    if checksum != _page_token_checksum(body) or int.from_bytes(body[1:9], "big") != account_id:
        raise bad
    return int.from_bytes(body[9:17], "big")


def account_id_for_request(request_id: str) -> int:
    """A CreateAccount request_id is global: deriving the account id from it sends every
    repeat to the same shard, where the account itself remembers the request_id."""
    digest = hashlib.sha256(_ACCOUNT_REQUEST_CONTEXT + request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big")
