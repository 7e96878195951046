"""The command format of the shard log: typed constructors of every command the gateway, the
node and the standalone server send to a core, and the reading of a batch's answer.

Each command is an encoded `CommandEnvelope` (type, `now`, payload). Time and every new id are
chosen by the caller before the first attempt, so a retry sends the very same bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from google.protobuf.message import DecodeError

from ledger_cluster.errors import LedgerError
from ledger_cluster.internal.v1 import core_pb2

CommandType: TypeAlias = core_pb2.CommandType.ValueType
# What a caller learns of one command: its result, or a LedgerError saying it was not applied
# (BackendUnavailableError, BackendTimeoutError) or may have been (UnknownOutcomeError).
ItemAnswer: TypeAlias = core_pb2.CommandResult | LedgerError


def envelope(kind: CommandType, now: int, payload: bytes) -> bytes:
    return core_pb2.CommandEnvelope(type=kind, now=now, payload=payload).SerializeToString()


def create_account(account_id: int, request_id: str, now: int) -> bytes:
    payload = core_pb2.CreateAccountCommand(account_id=account_id, request_id=request_id)
    return envelope(core_pb2.COMMAND_TYPE_CREATE_ACCOUNT, now, payload.SerializeToString())


def create_transaction(
    *,
    account_id: int,
    transaction_number: int,
    amount: int,
    description: str,
    settled: bool,
    request_id: str,
    now: int,
) -> bytes:
    payload = core_pb2.CreateTransactionCommand(
        account_id=account_id,
        transaction_number=transaction_number,
        amount=amount,
        description=description,
        settled=settled,
        request_id=request_id,
    )
    return envelope(core_pb2.COMMAND_TYPE_CREATE_TRANSACTION, now, payload.SerializeToString())


def finish_transaction(kind: CommandType, account_id: int, transaction_number: int, now: int) -> bytes:
    """A settle or cancel (`kind`); both carry the same fields."""
    payload_type = (
        core_pb2.SettleTransactionCommand
        if kind == core_pb2.COMMAND_TYPE_SETTLE_TRANSACTION
        else core_pb2.CancelTransactionCommand
    )
    payload = payload_type(account_id=account_id, transaction_number=transaction_number)
    return envelope(kind, now, payload.SerializeToString())


def noop() -> bytes:
    """Changes nothing; a consistent read sends one through the log as a barrier."""
    return envelope(core_pb2.COMMAND_TYPE_NOOP, 0, b"")


def batch(commands: Sequence[bytes]) -> bytes:
    """Several commands (none of them a batch) as one entry: applied in order in one LMDB write
    transaction, each keeping its own ids, `now` and idempotency."""
    payload = core_pb2.BatchCommand(commands=commands).SerializeToString()
    return envelope(core_pb2.COMMAND_TYPE_BATCH, 0, payload)


def batch_items(command: bytes) -> tuple[bool, list[bytes] | None]:
    """Whether `command` is a batch, and its items (None when its payload does not decode).
    Bytes that do not decode as an envelope are no batch: the core refuses them as one item."""
    try:
        decoded = core_pb2.CommandEnvelope.FromString(command)
    except DecodeError:
        return False, None
    if decoded.type != core_pb2.COMMAND_TYPE_BATCH:
        return False, None
    try:
        return True, list(core_pb2.BatchCommand.FromString(decoded.payload).commands)
    except DecodeError:
        return True, None


def item_results(result: core_pb2.CommandResult, count: int) -> list[core_pb2.CommandResult] | None:
    """One result per item of a batch of `count`: each item's own, or, when the core refused
    the entry whole (its outcome says why, and nothing applied), that refusal for every item.
    None for an applied batch whose answer lacks its items' results (their fate is unknown to
    the caller)."""
    if result.outcome != core_pb2.OUTCOME_OK:
        return [result] * count
    if len(result.item_results) != count:
        return None
    return list(result.item_results)
