"""The commands of transfers (docs/transfers.md): a debit leg on the debit account's shard D, a
credit leg on the credit account's shard C, linked to each other. D decides (funds, settle,
cancel, expiry); C follows and never refuses for funds. Every command is idempotent: a
re-delivery answers the stored state, so drivers and gateways may race and retry freely.

On one shard every command does both legs in the same entry, so a same-shard transfer is never
seen half-applied at all."""

from __future__ import annotations

import logging
from dataclasses import replace

from ledger_cluster.core import commands, rules, tables
from ledger_cluster.core.apply_failures import CORRUPT_RECORD_ERRORS
from ledger_cluster.core.balances import credit_overflows, debit_overflows, is_refused, require_invariant
from ledger_cluster.core.changes import (
    OK,
    AccountChange,
    Changes,
    failure,
    ok_transaction,
    replace_bookkeeping,
    replace_transaction,
    same_extras,
    store_new_transaction,
    transaction_metadata,
)
from ledger_cluster.core.records import (
    CANCELLED,
    CREDIT_LEG,
    CREDIT_OWED,
    CREDIT_REFUSED,
    DEBIT_LEG,
    EXPIRED,
    INSUFFICIENT_FUNDS,
    NO_REQUEST_DIGEST,
    PENDING,
    RESOLVE_OWED,
    SETTLED,
    TRANSACTION_HAS_METADATA,
    TRANSACTION_HAS_REQUEST_ID,
    TRANSACTION_SETTLED_REQUESTED,
    TransactionRecord,
    decode_transaction,
    encode_metadata,
    request_digest,
)
from ledger_cluster.errors import RecordFormatError
from ledger_cluster.internal.v1 import core_pb2

logger = logging.getLogger(__name__)

# A credit leg is stored at the transfer's number on the credit account, or at the next free
# number when the account has a transaction of that number already (numbers are drawn at
# random per account, so a clash is rare and two in a row rarer still). The bound keeps a
# search finite; past it the credit is refused and D reverses the debit.
LEG_NUMBER_PROBES_MAX = 64
# Pending transactions one ExpireDue entry expires at most; the leader proposes the next one
# at once when more are due.
EXPIRE_BATCH_MAX = 1000
_FINAL_FOR_LEGS = frozenset({SETTLED, CANCELLED, EXPIRED})


def _is_leg_of(record: TransactionRecord, debit_account_id: int, transfer_number: int) -> bool:
    return (
        bool(record.flags & CREDIT_LEG)
        and record.counterparty_account_id == debit_account_id
        and record.linked_number == transfer_number
    )


def find_credit_leg(
    changes: Changes, credit_account_id: int, debit_account_id: int, transfer_number: int
) -> tuple[TransactionRecord | None, int | None]:
    """(the stored credit leg of the transfer, None) or (None, the number to store it at); (None,
    None) when no number is free within the probes."""
    for offset in range(LEG_NUMBER_PROBES_MAX):
        number = (transfer_number + offset) % 2**64
        data = changes.transaction_bytes(credit_account_id, number)
        if data is None:
            return None, number
        record = decode_transaction(data)
        if _is_leg_of(record, debit_account_id, transfer_number):
            return record, None
    return None, None


def _answer(changes: Changes, debit_leg: TransactionRecord, repeat: bool = False) -> core_pb2.CommandResult:
    """The debit leg, its metadata, and its credit leg when this shard holds it."""
    if not changes.answering:
        return core_pb2.CommandResult(outcome=OK)
    credit_leg = b""
    if debit_leg.flags & DEBIT_LEG and changes.owns(debit_leg.counterparty_account_id):
        data = changes.transaction_bytes(debit_leg.counterparty_account_id, debit_leg.linked_number)
        credit_leg = data or b""
    return ok_transaction(
        changes,
        debit_leg.encode(),
        repeat=repeat,
        metadata=transaction_metadata(changes, debit_leg),
        credit_leg=credit_leg,
    )


def _same_transfer_payload(
    changes: Changes, record: TransactionRecord, command: commands.CreateTransfer, digest: bytes
) -> bool:
    return (
        bool(record.flags & DEBIT_LEG)
        and record.amount == -command.amount
        and record.counterparty_account_id == command.credit_account_id
        and record.description == command.description
        and record.settled_requested == command.settled
        and record.request_digest == digest
        and same_extras(changes, record, command.metadata, command.timeout_seconds)
    )


def _create_transfer_problem(command: commands.CreateTransfer) -> rules.Problem | None:
    problem = rules.create_transfer_problem(
        command.account_id,
        command.credit_account_id,
        command.amount,
        command.description,
        command.request_id,
        command.metadata,
        command.timeout_seconds,
        command.settled,
    ) or rules.currency_problem(command.currency)
    if problem is None and not commands.is_canonical(command.metadata):
        problem = rules.Problem(rules.INVALID_METADATA, "metadata entries out of key order")
    return problem


def create_transfer(changes: Changes, command: commands.CreateTransfer) -> core_pb2.CommandResult:
    problem = _create_transfer_problem(command)
    if problem is not None:
        return failure(core_pb2.OUTCOME_INVALID_COMMAND, f"{problem.reason}: {problem.message}")
    debit = changes.account(command.account_id)
    if debit is None:
        return failure(core_pb2.OUTCOME_ACCOUNT_NOT_FOUND, "debit account not found")
    digest, request_key = NO_REQUEST_DIGEST, b""
    if command.request_id:
        digest = request_digest(command.request_id)
        request_key = tables.request_key(command.account_id, digest)
        number = changes.find_request(request_key)
        if number is not None:
            return _repeat_of_transfer(changes, command, digest, number)
    existing = changes.transaction_bytes(command.account_id, command.transfer_number)
    if existing is not None:
        earlier = decode_transaction(existing)
        if _same_transfer_payload(changes, earlier, command, digest) and earlier.created_at == command.now:
            return _answer(changes, earlier, repeat=True)
        return failure(core_pb2.OUTCOME_TRANSACTION_ID_COLLISION, "transaction id already taken")
    # Across shards the gateway read the credit account's currency into the command; on one
    # shard the credit account is here to read (the gateway leaves the command's empty).
    credit = None
    credit_currency = command.currency
    if changes.owns(command.credit_account_id):
        credit = changes.account(command.credit_account_id)
        if credit is None:
            return failure(core_pb2.OUTCOME_CREDIT_ACCOUNT_NOT_FOUND, "credit account not found")
        credit_currency = credit.record.currency
    if debit.record.currency != credit_currency:
        return failure(
            core_pb2.OUTCOME_CURRENCY_MISMATCH,
            f"debit account's currency is {debit.record.currency!r}, credit account's {credit_currency!r}",
        )
    return _store_transfer(changes, command, debit, credit, digest, request_key)


def _repeat_of_transfer(
    changes: Changes, command: commands.CreateTransfer, digest: bytes, number: int
) -> core_pb2.CommandResult:
    data = changes.transaction_bytes(command.account_id, number)
    require_invariant(data is not None, "request id recorded without its transaction")
    assert data is not None  # narrowed for mypy; checked just above
    record = decode_transaction(data)
    if _same_transfer_payload(changes, record, command, digest):
        return _answer(changes, record, repeat=True)
    return failure(
        core_pb2.OUTCOME_REQUEST_ID_REUSED, "request_id was used for a different transfer or transaction"
    )


def _store_transfer(  # noqa: PLR0917 - what create_transfer looked up, passed on
    changes: Changes,
    command: commands.CreateTransfer,
    debit: AccountChange,
    credit: AccountChange | None,
    digest: bytes,
    request_key: bytes,
) -> core_pb2.CommandResult:
    now, amount = command.now, command.amount
    refused = is_refused(debit.record, -amount)
    if not refused and (
        debit_overflows(debit.record, amount)
        or (credit is not None and credit_overflows(credit.record, amount))
    ):
        return failure(core_pb2.OUTCOME_BALANCE_OVERFLOW, "a balance would exceed int64")
    credit_number = command.transfer_number
    if credit is not None and not refused:
        _, free_number = find_credit_leg(
            changes, command.credit_account_id, command.account_id, command.transfer_number
        )
        if free_number is None:
            return failure(core_pb2.OUTCOME_TRANSACTION_ID_COLLISION, "no free number for the credit leg")
        credit_number = free_number
    status = INSUFFICIENT_FUNDS if refused else (SETTLED if command.settled else PENDING)
    metadata = encode_metadata(command.metadata)
    flags = DEBIT_LEG
    if command.settled:
        flags |= TRANSACTION_SETTLED_REQUESTED
    if command.request_id:
        flags |= TRANSACTION_HAS_REQUEST_ID
    if metadata:
        flags |= TRANSACTION_HAS_METADATA
    if credit is None and not refused:
        flags |= CREDIT_OWED
    debit_leg = TransactionRecord(
        command.account_id,
        command.transfer_number,
        0,
        -amount,
        status,
        status,
        now,
        now,
        command.description,
        settled_amount=-amount if status == SETTLED else 0,
        expires_at=rules.expires_at_of(now, command.timeout_seconds) if status == PENDING else 0,
        flags=flags,
        request_digest=digest,
        linked_number=credit_number,
        counterparty_account_id=command.credit_account_id,
    )
    stored = store_new_transaction(changes, debit, debit_leg, request_key, metadata, now)
    require_invariant(stored is not None, "a free transaction key was taken within one apply")
    if credit is not None and not refused:
        leg = _credit_leg_record(
            command.credit_account_id,
            credit_number,
            command.account_id,
            command.transfer_number,
            amount,
            command.settled,
            command.description,
            bool(metadata),
            now,
            debit_leg.expires_at,
        )
        stored_leg = store_new_transaction(changes, credit, leg, b"", metadata, now)
        require_invariant(stored_leg is not None, "a free credit leg number was taken within one apply")
    return _answer(changes, debit_leg)


def _credit_leg_record(  # noqa: PLR0917 - the leg's fields
    credit_account_id: int,
    number: int,
    debit_account_id: int,
    transfer_number: int,
    amount: int,
    settled: bool,
    description: str,
    has_metadata: bool,
    created_at: int,
    expires_at: int,
    status: int | None = None,
) -> TransactionRecord:
    if status is None:
        status = SETTLED if settled else PENDING
    flags = CREDIT_LEG | (TRANSACTION_SETTLED_REQUESTED if settled else 0)
    if has_metadata:
        flags |= TRANSACTION_HAS_METADATA
    return TransactionRecord(
        credit_account_id,
        number,
        0,
        amount,
        status,
        status,
        created_at,
        created_at,
        description,
        settled_amount=amount if status == SETTLED else 0,
        expires_at=expires_at,
        flags=flags,
        linked_number=transfer_number,
        counterparty_account_id=debit_account_id,
    )


def _credit_leg_problem(command: commands.CreditLeg) -> str | None:
    if command.amount <= 0:
        return f"credit leg amount must be > 0, got {command.amount}"
    problem = (
        rules.description_problem(command.description)
        or rules.metadata_problem(command.metadata)
        or rules.currency_problem(command.currency)
    )
    if problem is not None:
        return problem.message
    if not commands.is_canonical(command.metadata):
        return "metadata entries out of key order"
    if command.account_id == command.debit_account_id:
        return "a transfer's accounts must differ"
    return None


def credit_leg(changes: Changes, command: commands.CreditLeg) -> core_pb2.CommandResult:
    """On C. Refused outright (nothing stored) only for what the gateway checked before the
    debit: a missing account, another currency, a malformed command."""
    problem = _credit_leg_problem(command)
    if problem is not None:
        return failure(core_pb2.OUTCOME_INVALID_COMMAND, problem)
    credit = changes.account(command.account_id)
    if credit is None:
        return failure(core_pb2.OUTCOME_CREDIT_ACCOUNT_NOT_FOUND, "credit account not found")
    if credit.record.currency != command.currency:
        return failure(core_pb2.OUTCOME_CURRENCY_MISMATCH, "the accounts' currencies differ")
    existing, free_number = find_credit_leg(
        changes, command.account_id, command.debit_account_id, command.transfer_number
    )
    if existing is not None:
        return ok_transaction(changes, existing.encode(), repeat=True)
    if free_number is None:
        return failure(core_pb2.OUTCOME_TRANSACTION_ID_COLLISION, "no free number for the credit leg")
    metadata = encode_metadata(command.metadata)
    # A credit that would take the account past int64 is stored CANCELLED: the refusal is
    # frozen like any leg, and D reverses the debit when it learns of it.
    status = CANCELLED if credit_overflows(credit.record, command.amount) else None
    leg = _credit_leg_record(
        command.account_id,
        free_number,
        command.debit_account_id,
        command.transfer_number,
        command.amount,
        command.settled,
        command.description,
        bool(metadata),
        command.created_at,
        command.expires_at,
        status,
    )
    stored = store_new_transaction(changes, credit, leg, b"", metadata, command.now)
    require_invariant(stored is not None, "a free credit leg number was taken within one apply")
    assert stored is not None  # narrowed for mypy; checked just above
    return ok_transaction(changes, stored)


def _settle_amount_of(debit_leg: TransactionRecord, requested: int) -> int | None:
    """The debit leg's settled amount (negative) for a settle of `requested` (0: all), or None
    when `requested` is out of range."""
    if requested == 0:
        return debit_leg.amount
    if not 0 < requested <= -debit_leg.amount:
        return None
    return -requested


def _resolved(leg: TransactionRecord, status: int, settled_amount: int, now: int) -> TransactionRecord:
    return replace(leg, status=status, settled_amount=settled_amount, updated_at=now)


def _resolve_debit_leg(
    changes: Changes, before: TransactionRecord, status: int, settled_amount: int, now: int
) -> TransactionRecord:
    """Move a pending debit leg to a final status, with its credit leg in the same entry when
    this shard holds it, or owing C the news."""
    change = changes.account(before.account_id)
    require_invariant(change is not None, f"debit leg of missing account {before.account_id:016x}")
    assert change is not None  # narrowed for mypy; checked just above
    after = _resolved(before, status, settled_amount, now)
    # A credit leg still owed (a transfer that a restore into another layout brought onto one
    # shard) is resolved by the driver after it stores the leg, like any cross-shard one.
    if changes.owns(before.counterparty_account_id) and not before.flags & CREDIT_OWED:
        _resolve_local_credit_leg(changes, before, status, -settled_amount, now)
    else:
        after.flags |= RESOLVE_OWED
    replace_transaction(changes, change, before, after, now)
    return after


def _resolve_local_credit_leg(
    changes: Changes, debit_leg: TransactionRecord, status: int, settled_amount: int, now: int
) -> None:
    data = changes.transaction_bytes(debit_leg.counterparty_account_id, debit_leg.linked_number)
    require_invariant(data is not None, "a same-shard transfer without its credit leg")
    assert data is not None  # narrowed for mypy; checked just above
    leg = decode_transaction(data)
    change = changes.account(leg.account_id)
    require_invariant(change is not None and leg.status == PENDING, "a same-shard credit leg out of step")
    assert change is not None  # narrowed for mypy; checked just above
    replace_transaction(changes, change, leg, _resolved(leg, status, settled_amount, now), now)


def _debit_leg(changes: Changes, account_id: int, number: int) -> TransactionRecord | None:
    data = changes.transaction_bytes(account_id, number)
    if data is None:
        return None
    record = decode_transaction(data)
    return record if record.flags & DEBIT_LEG else None


def resolve_transfer(changes: Changes, command: commands.ResolveTransfer) -> core_pb2.CommandResult:
    before = _debit_leg(changes, command.account_id, command.transfer_number)
    if before is None:
        return failure(core_pb2.OUTCOME_TRANSFER_NOT_FOUND, "transfer not found")
    target = SETTLED if command.settle else CANCELLED
    settled_amount = _settle_amount_of(before, command.amount) if command.settle else 0
    if settled_amount is None:
        return failure(
            core_pb2.OUTCOME_INVALID_SETTLE_AMOUNT,
            f"settle amount must be 0 (all) or 1..{-before.amount}, got {command.amount}",
        )
    if before.status == target and not before.flags & CREDIT_REFUSED:
        if command.settle and before.settled_amount != settled_amount:
            return failure(
                core_pb2.OUTCOME_SETTLED_WITH_OTHER_AMOUNT,
                f"transfer was settled for {-before.settled_amount}, not {-settled_amount}",
            )
        return _answer(changes, before)
    if before.status == EXPIRED:
        return failure(core_pb2.OUTCOME_TRANSACTION_EXPIRED, "transfer expired")
    if before.status != PENDING:
        return failure(core_pb2.OUTCOME_TRANSACTION_NOT_PENDING, "transfer is not pending")
    if before.expires_at and command.now >= before.expires_at:
        _resolve_debit_leg(changes, before, EXPIRED, 0, command.now)
        return failure(core_pb2.OUTCOME_TRANSACTION_EXPIRED, "transfer expired")
    return _answer(changes, _resolve_debit_leg(changes, before, target, settled_amount, command.now))


def resolve_leg(changes: Changes, command: commands.ResolveLeg) -> core_pb2.CommandResult:
    """On C: the credit leg takes its debit leg's final status. Sent only after the credit leg
    was confirmed (the driver sends CreditLeg first, in the same batch)."""
    if command.status not in _FINAL_FOR_LEGS:
        return failure(
            core_pb2.OUTCOME_INVALID_COMMAND, f"a leg cannot be resolved to status {command.status}"
        )
    leg, _ = find_credit_leg(changes, command.account_id, command.debit_account_id, command.transfer_number)
    if leg is None:
        return failure(core_pb2.OUTCOME_TRANSFER_NOT_FOUND, "credit leg not found")
    settled_amount = command.settled_amount if command.status == SETTLED else 0
    if command.status == SETTLED and not 0 < settled_amount <= leg.amount:
        return failure(
            core_pb2.OUTCOME_INVALID_SETTLE_AMOUNT, f"settled amount {settled_amount} out of range"
        )
    if leg.status == command.status and leg.settled_amount == settled_amount:
        return ok_transaction(changes, leg.encode(), repeat=True)
    if leg.status != PENDING:
        return failure(core_pb2.OUTCOME_TRANSACTION_NOT_PENDING, "credit leg is no longer pending")
    change = changes.account(leg.account_id)
    require_invariant(change is not None, f"credit leg of missing account {leg.account_id:016x}")
    assert change is not None  # narrowed for mypy; checked just above
    after = _resolved(leg, command.status, settled_amount, command.updated_at)
    return ok_transaction(changes, replace_transaction(changes, change, leg, after, command.now))


def _decoded_leg(data: bytes) -> TransactionRecord | None:
    try:
        return decode_transaction(data)
    except RecordFormatError:
        return None


def finish_transfer(changes: Changes, command: commands.FinishTransfer) -> core_pb2.CommandResult:
    """On D: what C answered. A stored credit leg clears the owed work it confirms; a refusal
    (or a leg C stored CANCELLED for overflow) reverses the debit leg."""
    before = _debit_leg(changes, command.account_id, command.transfer_number)
    if before is None:
        return failure(core_pb2.OUTCOME_TRANSFER_NOT_FOUND, "transfer not found")
    if not before.flags & (CREDIT_OWED | RESOLVE_OWED):
        return _answer(changes, before)
    leg = None if command.refusal else _decoded_leg(command.credit_leg)
    if leg is None and not command.refusal:
        return failure(core_pb2.OUTCOME_INVALID_COMMAND, "finish without a credit leg or a refusal")
    if leg is not None and (
        not _is_leg_of(leg, before.account_id, before.transaction_number)
        or leg.account_id != before.counterparty_account_id
    ):
        return failure(core_pb2.OUTCOME_INVALID_COMMAND, "the credit leg is another transfer's")
    after = replace(before)
    if leg is None or leg.initial_status == CANCELLED:
        if not before.flags & CREDIT_OWED:
            return failure(core_pb2.OUTCOME_INVALID_COMMAND, "a refusal of a credit leg that exists")
        # C will never hold this credit: the debit is undone, and the transfer ends CANCELLED.
        after.flags = (after.flags & ~(CREDIT_OWED | RESOLVE_OWED)) | CREDIT_REFUSED
        if after.status in (PENDING, SETTLED):
            after.status, after.settled_amount, after.updated_at = CANCELLED, 0, command.now
    else:
        after.flags &= ~CREDIT_OWED
        after.linked_number = leg.transaction_number
        if leg.status == before.status and leg.settled_amount == -before.settled_amount:
            after.flags &= ~RESOLVE_OWED
        # The common case: only bookkeeping, so the account is left alone.
        replace_bookkeeping(changes, before, after)
        return _answer(changes, after)
    change = changes.account(before.account_id)
    require_invariant(change is not None, f"debit leg of missing account {before.account_id:016x}")
    assert change is not None  # narrowed for mypy; checked just above
    replace_transaction(changes, change, before, after, command.now)
    return _answer(changes, after)


def _expiring(changes: Changes, account_id: int, number: int, key: bytes) -> TransactionRecord:
    """The pending transaction an expiries row lists, with its account loaded: every stored
    row its expiry needs first, read before anything is written."""
    data = changes.transaction_bytes(account_id, number)
    record = None if data is None else decode_transaction(data)
    require_invariant(
        record is not None and record.status == PENDING,
        f"expiries lists {key.hex()}, which is not pending",
    )
    assert record is not None  # narrowed for mypy; checked just above
    require_invariant(
        changes.account(account_id) is not None, f"transaction of missing account {account_id:016x}"
    )
    return record


def expire_due(changes: Changes, command: commands.ExpireDue) -> core_pb2.CommandResult:
    """Every pending transaction whose deadline is at or before `now`, up to EXPIRE_BATCH_MAX:
    released like a cancel, status EXPIRED. Answers how many it expired in `message`.

    A listed transaction whose own row or account row is corrupt is passed over (and stays
    listed), so it holds up no other expiry of the shard: that depends on the state alone, and
    nothing of it was written yet (apply_failures.py)."""
    expired = passed_over = 0
    for key, _ in changes.scan(tables.EXPIRIES, EXPIRE_BATCH_MAX):
        expires_at, account_id, number = tables.decode_expiry_key(key)
        if expires_at > command.now:
            break
        try:
            record = _expiring(changes, account_id, number, key)
        except CORRUPT_RECORD_ERRORS as error:
            logger.error("expiry of %s passed over: %s", key.hex(), error)
            passed_over += 1
            continue
        if record.flags & DEBIT_LEG:
            _resolve_debit_leg(changes, record, EXPIRED, 0, command.now)
        else:
            change = changes.account(account_id)
            assert change is not None  # narrowed for mypy; _expiring checked it
            replace_transaction(
                changes, change, record, _resolved(record, EXPIRED, 0, command.now), command.now
            )
        expired += 1
    message = f"expired {expired}"
    if passed_over:
        message += f", passed over {passed_over} with a corrupt record"
    return core_pb2.CommandResult(outcome=OK, message=message)
