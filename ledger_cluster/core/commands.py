"""The command format of the shard log, in one place: typed constructors of every command the
gateway, the node and the standalone server send to a core, the typed parsing the core and the
replica read them with, and the reading of a batch's answer.

Each command is an encoded `CommandEnvelope` (type, `now`, payload). Time and every new id are
chosen by the caller before the first attempt, so a retry sends the very same bytes.

Constructors check nothing but the format: what a core refuses (a zero amount, a description
that is too long) is in `rules`, which both the gateway and the core call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from google.protobuf.message import DecodeError

from ledger_cluster.core.records import SETTLED, Metadata, TransactionRecord
from ledger_cluster.errors import LedgerError
from ledger_cluster.internal.v1 import core_pb2

CommandType: TypeAlias = core_pb2.CommandType.ValueType
# What a caller learns of one command: its result, or a LedgerError saying it was not applied
# (BackendUnavailableError, BackendTimeoutError) or may have been (UnknownOutcomeError).
ItemAnswer: TypeAlias = core_pb2.CommandResult | LedgerError

_Record = TypeVar("_Record")

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform

    @dataclass_transform(frozen_default=True)
    def _parsed(cls: type[_Record]) -> type[_Record]: ...

else:

    def _parsed(cls):
        # Frozen to the type checker only: a frozen dataclass costs about 1.2 µs more per
        # construction (each field goes through object.__setattr__), and the core parses
        # every item of every entry on every replica.
        return dataclass(slots=True)(cls)


# -- building commands -------------------------------------------------------------------------


def envelope(kind: CommandType, now: int, payload: bytes) -> bytes:
    """Any envelope, even one no constructor below builds (tests of the core's refusals)."""
    return core_pb2.CommandEnvelope(type=kind, now=now, payload=payload).SerializeToString()


def canonical_metadata(metadata: Mapping[str, str] | Iterable[tuple[str, str]]) -> Metadata:
    """Entries sorted by key: the one order metadata travels and is stored in."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple(sorted(items))


def _metadata_entries(metadata: Metadata) -> list[core_pb2.MetadataEntry]:
    return [core_pb2.MetadataEntry(key=key, value=value) for key, value in metadata]


def create_account(
    account_id: int,
    request_id: str,
    now: int,
    *,
    currency: str = "",
    overdraft_limit: int = 0,
    metadata: Metadata = (),
) -> bytes:
    payload = core_pb2.CreateAccountCommand(
        account_id=account_id,
        request_id=request_id,
        currency=currency,
        overdraft_limit=overdraft_limit,
        metadata=_metadata_entries(metadata),
    )
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
    metadata: Metadata = (),
    timeout_seconds: int = 0,
) -> bytes:
    payload = core_pb2.CreateTransactionCommand(
        account_id=account_id,
        transaction_number=transaction_number,
        amount=amount,
        description=description,
        settled=settled,
        request_id=request_id,
        metadata=_metadata_entries(metadata),
        timeout_seconds=timeout_seconds,
    )
    return envelope(core_pb2.COMMAND_TYPE_CREATE_TRANSACTION, now, payload.SerializeToString())


def settle_transaction(account_id: int, transaction_number: int, now: int, amount: int = 0) -> bytes:
    """`amount` 0 settles all; else that much (signed like the transaction), the rest released."""
    payload = core_pb2.SettleTransactionCommand(
        account_id=account_id, transaction_number=transaction_number, amount=amount
    )
    return envelope(core_pb2.COMMAND_TYPE_SETTLE_TRANSACTION, now, payload.SerializeToString())


def cancel_transaction(account_id: int, transaction_number: int, now: int) -> bytes:
    payload = core_pb2.CancelTransactionCommand(account_id=account_id, transaction_number=transaction_number)
    return envelope(core_pb2.COMMAND_TYPE_CANCEL_TRANSACTION, now, payload.SerializeToString())


# settle_transaction or cancel_transaction: the gateway serves both the same way.
FinishTransaction: TypeAlias = Callable[[int, int, int], bytes]


def create_transfer(
    *,
    debit_account_id: int,
    transfer_number: int,
    credit_account_id: int,
    amount: int,
    description: str,
    settled: bool,
    request_id: str,
    now: int,
    currency: str = "",
    metadata: Metadata = (),
    timeout_seconds: int = 0,
) -> bytes:
    """For the debit account's shard. `currency` is the credit account's, as the gateway read it."""
    payload = core_pb2.CreateTransferCommand(
        debit_account_id=debit_account_id,
        transfer_number=transfer_number,
        credit_account_id=credit_account_id,
        amount=amount,
        description=description,
        settled=settled,
        request_id=request_id,
        metadata=_metadata_entries(metadata),
        timeout_seconds=timeout_seconds,
        currency=currency,
    )
    return envelope(core_pb2.COMMAND_TYPE_CREATE_TRANSFER, now, payload.SerializeToString())


def credit_leg_of(debit_leg: TransactionRecord, metadata: Metadata, currency: str, now: int) -> bytes:
    """The credit leg that the debit leg `debit_leg` owes its counterparty's shard: everything
    in it comes from the stored debit leg, so every sender sends the same command."""
    payload = core_pb2.CreditLegCommand(
        credit_account_id=debit_leg.counterparty_account_id,
        debit_account_id=debit_leg.account_id,
        transfer_number=debit_leg.transaction_number,
        amount=-debit_leg.amount,
        settled=debit_leg.initial_status == SETTLED,
        description=debit_leg.description,
        metadata=_metadata_entries(metadata),
        created_at=debit_leg.created_at,
        expires_at=debit_leg.expires_at,
        currency=currency,
    )
    return envelope(core_pb2.COMMAND_TYPE_CREDIT_LEG, now, payload.SerializeToString())


def resolve_transfer(
    debit_account_id: int, transfer_number: int, settle: bool, amount: int, now: int
) -> bytes:
    payload = core_pb2.ResolveTransferCommand(
        debit_account_id=debit_account_id, transfer_number=transfer_number, settle=settle, amount=amount
    )
    return envelope(core_pb2.COMMAND_TYPE_RESOLVE_TRANSFER, now, payload.SerializeToString())


def resolve_leg_of(debit_leg: TransactionRecord, now: int) -> bytes:
    """The credit leg's move to the (final) status of `debit_leg`."""
    payload = core_pb2.ResolveLegCommand(
        credit_account_id=debit_leg.counterparty_account_id,
        debit_account_id=debit_leg.account_id,
        transfer_number=debit_leg.transaction_number,
        status=debit_leg.status,
        settled_amount=-debit_leg.settled_amount,
        updated_at=debit_leg.updated_at,
    )
    return envelope(core_pb2.COMMAND_TYPE_RESOLVE_LEG, now, payload.SerializeToString())


def finish_transfer(
    debit_account_id: int, transfer_number: int, credit_leg: bytes, refusal: int, now: int
) -> bytes:
    """What the credit shard answered: its stored leg, or the outcome with which it refused."""
    payload = core_pb2.FinishTransferCommand(
        debit_account_id=debit_account_id,
        transfer_number=transfer_number,
        credit_leg=credit_leg,
        refusal=refusal,
    )
    return envelope(core_pb2.COMMAND_TYPE_FINISH_TRANSFER, now, payload.SerializeToString())


def expire_due(now: int) -> bytes:
    return envelope(core_pb2.COMMAND_TYPE_EXPIRE_DUE, now, b"")


def noop(now: int = 0) -> bytes:
    """Changes nothing; a consistent read sends one through the log as a barrier."""
    return envelope(core_pb2.COMMAND_TYPE_NOOP, now, b"")


def batch(commands: Sequence[bytes]) -> bytes:
    """Several commands (none of them a batch) as one entry: applied in order in one LMDB write
    transaction, each keeping its own ids, `now` and idempotency."""
    payload = core_pb2.BatchCommand(commands=commands).SerializeToString()
    return envelope(core_pb2.COMMAND_TYPE_BATCH, 0, payload)


# -- reading commands --------------------------------------------------------------------------


@_parsed
class CreateAccount:
    account_id: int
    request_id: str
    now: int
    currency: str = ""
    overdraft_limit: int = 0
    metadata: Metadata = ()


@_parsed
class CreateTransaction:
    account_id: int
    transaction_number: int
    amount: int
    description: str
    settled: bool
    request_id: str
    now: int
    metadata: Metadata = ()
    timeout_seconds: int = 0


@_parsed
class SettleTransaction:
    account_id: int
    transaction_number: int
    now: int
    amount: int = 0


@_parsed
class CancelTransaction:
    account_id: int
    transaction_number: int
    now: int


@_parsed
class CreateTransfer:
    account_id: int  # the debit account: the shard routes and checks by it
    transfer_number: int
    credit_account_id: int
    amount: int
    description: str
    settled: bool
    request_id: str
    metadata: Metadata
    timeout_seconds: int
    currency: str
    now: int


@_parsed
class CreditLeg:
    account_id: int  # the credit account
    debit_account_id: int
    transfer_number: int
    amount: int
    settled: bool
    description: str
    metadata: Metadata
    created_at: int
    expires_at: int
    currency: str
    now: int


@_parsed
class ResolveTransfer:
    account_id: int  # the debit account
    transfer_number: int
    settle: bool
    amount: int
    now: int


@_parsed
class ResolveLeg:
    account_id: int  # the credit account
    debit_account_id: int
    transfer_number: int
    status: int
    settled_amount: int
    updated_at: int
    now: int


@_parsed
class FinishTransfer:
    account_id: int  # the debit account
    transfer_number: int
    credit_leg: bytes
    refusal: int
    now: int


@_parsed
class ExpireDue:
    now: int


@_parsed
class Noop:
    now: int


@_parsed
class Batch:
    items: tuple[bytes, ...]


@_parsed
class Undecodable:
    """Bytes that are no command this format knows; a core refuses them, changing nothing."""

    reason: str


# The commands that name an account (`account_id`); the core checks that its shard owns it.
AccountCommand: TypeAlias = (
    CreateAccount
    | CreateTransaction
    | SettleTransaction
    | CancelTransaction
    | CreateTransfer
    | CreditLeg
    | ResolveTransfer
    | ResolveLeg
    | FinishTransfer
)
Command: TypeAlias = AccountCommand | ExpireDue | Noop | Batch | Undecodable


def parse_batch_items(payload: bytes) -> tuple[bytes, ...]:
    """The items of a batch envelope's payload. Raises DecodeError for bytes that are none."""
    return tuple(core_pb2.BatchCommand.FromString(payload).commands)


def _metadata_of(entries: Sequence[core_pb2.MetadataEntry]) -> Metadata:
    """As sent: the core refuses entries out of order or twice (rules.metadata_problem and
    `is_canonical`), so equal metadata is always equal bytes."""
    return tuple((entry.key, entry.value) for entry in entries)


def is_canonical(metadata: Metadata) -> bool:
    if len(metadata) < 2:  # nearly every command: no metadata at all
        return True
    return all(metadata[index][0] < metadata[index + 1][0] for index in range(len(metadata) - 1))


def _create_account_of(payload: bytes, now: int) -> CreateAccount:
    decoded = core_pb2.CreateAccountCommand.FromString(payload)
    return CreateAccount(
        decoded.account_id,
        decoded.request_id,
        now,
        decoded.currency,
        decoded.overdraft_limit,
        _metadata_of(decoded.metadata) if decoded.metadata else (),
    )


def _create_transaction_of(payload: bytes, now: int) -> CreateTransaction:
    decoded = core_pb2.CreateTransactionCommand.FromString(payload)
    return CreateTransaction(
        decoded.account_id,
        decoded.transaction_number,
        decoded.amount,
        decoded.description,
        decoded.settled,
        decoded.request_id,
        now,
        _metadata_of(decoded.metadata) if decoded.metadata else (),
        decoded.timeout_seconds,
    )


def _settle_transaction_of(payload: bytes, now: int) -> SettleTransaction:
    decoded = core_pb2.SettleTransactionCommand.FromString(payload)
    return SettleTransaction(decoded.account_id, decoded.transaction_number, now, decoded.amount)


def _create_transfer_of(payload: bytes, now: int) -> CreateTransfer:
    decoded = core_pb2.CreateTransferCommand.FromString(payload)
    return CreateTransfer(
        decoded.debit_account_id,
        decoded.transfer_number,
        decoded.credit_account_id,
        decoded.amount,
        decoded.description,
        decoded.settled,
        decoded.request_id,
        _metadata_of(decoded.metadata) if decoded.metadata else (),
        decoded.timeout_seconds,
        decoded.currency,
        now,
    )


def _credit_leg_of(payload: bytes, now: int) -> CreditLeg:
    decoded = core_pb2.CreditLegCommand.FromString(payload)
    return CreditLeg(
        decoded.credit_account_id,
        decoded.debit_account_id,
        decoded.transfer_number,
        decoded.amount,
        decoded.settled,
        decoded.description,
        _metadata_of(decoded.metadata) if decoded.metadata else (),
        decoded.created_at,
        decoded.expires_at,
        decoded.currency,
        now,
    )


def _resolve_transfer_of(payload: bytes, now: int) -> ResolveTransfer:
    decoded = core_pb2.ResolveTransferCommand.FromString(payload)
    return ResolveTransfer(
        decoded.debit_account_id, decoded.transfer_number, decoded.settle, decoded.amount, now
    )


def _resolve_leg_of(payload: bytes, now: int) -> ResolveLeg:
    decoded = core_pb2.ResolveLegCommand.FromString(payload)
    return ResolveLeg(
        decoded.credit_account_id,
        decoded.debit_account_id,
        decoded.transfer_number,
        decoded.status,
        decoded.settled_amount,
        decoded.updated_at,
        now,
    )


def _finish_transfer_of(payload: bytes, now: int) -> FinishTransfer:
    decoded = core_pb2.FinishTransferCommand.FromString(payload)
    return FinishTransfer(
        decoded.debit_account_id, decoded.transfer_number, decoded.credit_leg, decoded.refusal, now
    )


def _expire_due_of(payload: bytes, now: int) -> ExpireDue:
    return ExpireDue(now)


def _cancel_transaction_of(payload: bytes, now: int) -> CancelTransaction:
    decoded = core_pb2.CancelTransactionCommand.FromString(payload)
    return CancelTransaction(decoded.account_id, decoded.transaction_number, now)


def _noop_of(payload: bytes, now: int) -> Noop:
    return Noop(now)  # its payload is never read: a noop carries nothing


def _batch_of(payload: bytes, now: int) -> Batch:
    return Batch(parse_batch_items(payload))


def _nested_batch_of(payload: bytes, now: int) -> Undecodable:
    return Undecodable("a batch item cannot be a batch")  # refused before its items are read


_PayloadReader: TypeAlias = Callable[[bytes, int], Command]
_PAYLOAD_READERS: dict[int, _PayloadReader] = {
    core_pb2.COMMAND_TYPE_CREATE_ACCOUNT: _create_account_of,
    core_pb2.COMMAND_TYPE_CREATE_TRANSACTION: _create_transaction_of,
    core_pb2.COMMAND_TYPE_SETTLE_TRANSACTION: _settle_transaction_of,
    core_pb2.COMMAND_TYPE_CANCEL_TRANSACTION: _cancel_transaction_of,
    core_pb2.COMMAND_TYPE_NOOP: _noop_of,
    core_pb2.COMMAND_TYPE_BATCH: _batch_of,
    core_pb2.COMMAND_TYPE_CREATE_TRANSFER: _create_transfer_of,
    core_pb2.COMMAND_TYPE_CREDIT_LEG: _credit_leg_of,
    core_pb2.COMMAND_TYPE_RESOLVE_TRANSFER: _resolve_transfer_of,
    core_pb2.COMMAND_TYPE_RESOLVE_LEG: _resolve_leg_of,
    core_pb2.COMMAND_TYPE_FINISH_TRANSFER: _finish_transfer_of,
    core_pb2.COMMAND_TYPE_EXPIRE_DUE: _expire_due_of,
}
_ITEM_PAYLOAD_READERS: dict[int, _PayloadReader] = {
    **_PAYLOAD_READERS,
    core_pb2.COMMAND_TYPE_BATCH: _nested_batch_of,
}


def _undecodable(error: DecodeError) -> Undecodable:
    return Undecodable(f"undecodable command: {error}")


_read_envelope = core_pb2.CommandEnvelope.FromString
_read_create_transaction = core_pb2.CreateTransactionCommand.FromString
_CREATE_TRANSACTION = core_pb2.COMMAND_TYPE_CREATE_TRANSACTION


def _parse_with(command: bytes, readers: dict[int, _PayloadReader]) -> Command:
    try:
        decoded = _read_envelope(command)
        kind = decoded.type
        if kind == _CREATE_TRANSACTION:
            # Inline: nearly every item is one, and each call here costs a third of a parse.
            payload = _read_create_transaction(decoded.payload)
            return CreateTransaction(
                payload.account_id,
                payload.transaction_number,
                payload.amount,
                payload.description,
                payload.settled,
                payload.request_id,
                decoded.now,
                _metadata_of(payload.metadata) if payload.metadata else (),
                payload.timeout_seconds,
            )
    except DecodeError as error:
        return _undecodable(error)
    read_payload = readers.get(kind)
    if read_payload is None:
        return Undecodable(f"unknown command type {kind}")
    try:
        return read_payload(decoded.payload, decoded.now)
    except DecodeError as error:
        return _undecodable(error)


def parse(command: bytes) -> Command:
    """The command that `command` encodes, or Undecodable saying why it is none. Never raises
    for any bytes: a log entry that does not decode is a refusal, not a broken replica."""
    return _parse_with(command, _PAYLOAD_READERS)


def parse_item(command: bytes) -> Command:
    """`parse` of one item of a batch, which may be anything but a batch: a batch there is
    Undecodable (so the result is never a Batch)."""
    return _parse_with(command, _ITEM_PAYLOAD_READERS)


def parse_batch(command: bytes) -> Batch | Undecodable | None:
    """A batch command's items, or Undecodable for a batch whose items do not decode (a core
    refuses it whole). None for any other bytes, which a core takes as one item (and refuses,
    when they are no command). Cheaper than `parse` for a command that is no batch: its
    payload is not decoded."""
    try:
        decoded = core_pb2.CommandEnvelope.FromString(command)
    except DecodeError:
        return None
    if decoded.type != core_pb2.COMMAND_TYPE_BATCH:
        return None
    try:
        return _batch_of(decoded.payload, decoded.now)
    except DecodeError as error:
        return _undecodable(error)


# -- reading answers ---------------------------------------------------------------------------


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
