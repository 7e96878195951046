"""Restore refuses a snapshot that passes its checksum but holds what no command of this release
makes, field by field of every stored record: unknown enum values, counts and totals out of
range, lengths past the gateway's limits, deadlines no timeout gives, transfer flags no step
sets. The refusal names the problem, and the restoring shard keeps its own state whole.

Each case damages one field of a state made by real commands, snapshots it (a valid stream),
and restores that into a shard that already holds state of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core import commands, records, tables
from ledger_cluster.errors import SnapshotCorruptError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import INT64_MAX, METADATA_VALUE_BYTES_MAX, TIMEOUT_SECONDS_MAX
from ledger_cluster.sharding import shard_key
from ledger_cluster.storage import WriteTransaction
from tests.core_ledger import ACCOUNT, BOUNDS_WITHOUT_FAR_ACCOUNT, FAR_ACCOUNT, OTHER_ACCOUNT, Ledger

OK = core_pb2.OUTCOME_OK
NOW = 1_700_000_000_000_000_000
NANOSECONDS_PER_SECOND = 1_000_000_000
TIMEOUT_SECONDS = 60
# Numbers of what `populate` makes, on ACCOUNT unless said.
TOP_UP = 1
PENDING_WITH_DEADLINE = 2
EXPIRED = 3
REFUSED = 4
WITH_METADATA = 5
SETTLED_TRANSFER = 6  # to OTHER_ACCOUNT, on this shard: its credit leg is OTHER_ACCOUNT's
FAR_TRANSFER = 7  # to FAR_ACCOUNT, on another shard: owes it the credit leg
ACCOUNT_LAYOUT_OFFSET = 0
ACCOUNT_FLAGS_OFFSET = 1
TRANSACTION_LAYOUT_OFFSET = 0
TRANSACTION_INITIAL_STATUS_OFFSET = 2
METADATA_KIND_OFFSET = 8


def create(number: int, amount: int, now: int, **extras: object) -> bytes:
    return commands.create_transaction(
        account_id=ACCOUNT,
        transaction_number=number,
        amount=amount,
        description="",
        settled=bool(extras.get("settled", True)),
        request_id="",
        now=now,
        metadata=extras.get("metadata", ()),  # type: ignore[arg-type]
        timeout_seconds=int(extras.get("timeout_seconds", 0)),  # type: ignore[call-overload]
    )


def transfer(number: int, credit_account_id: int, settled: bool) -> bytes:
    return commands.create_transfer(
        debit_account_id=ACCOUNT,
        transfer_number=number,
        credit_account_id=credit_account_id,
        amount=20,
        description="rent",
        settled=settled,
        request_id="",
        now=NOW + 10,
        timeout_seconds=0 if settled else TIMEOUT_SECONDS,
    )


def populate(ledger: Ledger) -> None:
    """One of each stored shape this file damages; every command must succeed."""
    steps = [
        commands.create_account(ACCOUNT, "", NOW),
        commands.create_account(OTHER_ACCOUNT, "", NOW),
        create(TOP_UP, 500, NOW + 1),
        create(PENDING_WITH_DEADLINE, -70, NOW + 2, settled=False, timeout_seconds=TIMEOUT_SECONDS),
        create(EXPIRED, -10, NOW + 3, settled=False, timeout_seconds=1),
        commands.expire_due(NOW + 3 + 2 * NANOSECONDS_PER_SECOND),
        create(REFUSED, -9_999, NOW + 4),
        create(WITH_METADATA, 5, NOW + 5, metadata=(("order", "o-1"),)),
        transfer(SETTLED_TRANSFER, OTHER_ACCOUNT, settled=True),
        transfer(FAR_TRANSFER, FAR_ACCOUNT, settled=False),
    ]
    for step in steps:
        answer = ledger.submit(step)
        assert answer.outcome == OK, (answer.outcome, answer.message)
    assert ledger.transaction(EXPIRED).transaction.status == ledger_pb2.TRANSACTION_STATUS_EXPIRED


def test_the_bounds_hold_both_accounts_but_not_the_far_one() -> None:
    lower, upper = BOUNDS_WITHOUT_FAR_ACCOUNT
    assert all(lower <= shard_key(account) <= upper for account in (ACCOUNT, OTHER_ACCOUNT))
    assert not lower <= shard_key(FAR_ACCOUNT) <= upper


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "source", BOUNDS_WITHOUT_FAR_ACCOUNT)
    try:
        populate(ledger)
        assert ledger.core.verify() == []
        yield ledger
    finally:
        ledger.storage.close()


# -- damage, one field each ------------------------------------------------------------------------


Damage = Callable[[WriteTransaction], None]


def change_byte(table: str, key: bytes, offset: int, value: int) -> Damage:
    def damage(transaction: WriteTransaction) -> None:
        data = bytearray(transaction.get(table, key) or b"")
        assert data, f"no {table} row {key.hex()}"
        data[offset] = value
        transaction.put(table, key, bytes(data))

    return damage


def change_account(change: Callable[[records.AccountRecord], None]) -> Damage:
    def damage(transaction: WriteTransaction) -> None:
        key = tables.account_key(ACCOUNT)
        account = records.decode_account(transaction.get(tables.ACCOUNTS, key) or b"")
        change(account)
        transaction.put(tables.ACCOUNTS, key, account.encode())

    return damage


def change_transaction(
    number: int, change: Callable[[records.TransactionRecord], None], account_id: int = ACCOUNT
) -> Damage:
    def damage(transaction: WriteTransaction) -> None:
        key = tables.transaction_key(account_id, number)
        record = records.decode_transaction(transaction.get(tables.TRANSACTIONS, key) or b"")
        change(record)
        transaction.put(tables.TRANSACTIONS, key, record.encode())

    return damage


def move_metadata_to_kind(kind: int) -> Damage:
    def damage(transaction: WriteTransaction) -> None:
        key = tables.metadata_key(ACCOUNT, tables.METADATA_OF_TRANSACTION, WITH_METADATA)
        value = transaction.get(tables.METADATA, key)
        assert value is not None
        transaction.delete(tables.METADATA, key)
        moved = bytearray(key)
        moved[METADATA_KIND_OFFSET] = kind
        transaction.put(tables.METADATA, bytes(moved), value)

    return damage


def overlong_metadata_value(transaction: WriteTransaction) -> None:
    key = tables.metadata_key(ACCOUNT, tables.METADATA_OF_TRANSACTION, WITH_METADATA)
    value = "v" * (METADATA_VALUE_BYTES_MAX + 1)
    transaction.put(tables.METADATA, key, records.encode_metadata((("order", value),)))


def credit_leg_of_settled_transfer(change: Callable[[records.TransactionRecord], None]) -> Damage:
    def damage(transaction: WriteTransaction) -> None:
        for key, value in transaction.iterate(tables.TRANSACTIONS):
            record = records.decode_transaction(value)
            if record.flags & records.CREDIT_LEG and record.linked_number == SETTLED_TRANSFER:
                change(record)
                transaction.put(tables.TRANSACTIONS, key, record.encode())
                return
        raise AssertionError("no credit leg of the settled transfer")

    return damage


def add_flags(flags: int) -> Callable[[records.TransactionRecord], None]:
    def change(record: records.TransactionRecord) -> None:
        record.flags |= flags

    return change


def set_field(name: str, value: Callable[[records.TransactionRecord], int]) -> Callable[..., None]:
    def change(record: records.TransactionRecord) -> None:
        setattr(record, name, value(record))

    return change


def negated_amounts(record: records.TransactionRecord) -> None:
    """Amount and settled amount both, so that only the leg's sign is wrong."""
    record.amount, record.settled_amount = -record.amount, -record.settled_amount


def deadline_after(seconds: int, extra_ns: int = 0) -> Callable[[records.TransactionRecord], int]:
    return lambda record: record.created_at + seconds * NANOSECONDS_PER_SECOND + extra_ns


@dataclass(frozen=True)
class Case:
    damage: Damage
    named: str  # a phrase of the refusal that says what is wrong


ACCOUNT_KEY = tables.account_key(ACCOUNT)
CASES = {
    # Unknown enum values and bits.
    "account layout": Case(
        change_byte(tables.ACCOUNTS, ACCOUNT_KEY, ACCOUNT_LAYOUT_OFFSET, 2),
        "account record layout 2 is unknown",
    ),
    "account flag bit": Case(
        change_byte(tables.ACCOUNTS, ACCOUNT_KEY, ACCOUNT_FLAGS_OFFSET, 0x80), "flags 0x80 are unknown"
    ),
    "transaction layout": Case(
        change_byte(
            tables.TRANSACTIONS,
            tables.transaction_key(ACCOUNT, TOP_UP),
            TRANSACTION_LAYOUT_OFFSET,
            9,
        ),
        "transaction record layout 9 is unknown",
    ),
    "initial status": Case(
        change_byte(
            tables.TRANSACTIONS,
            tables.transaction_key(ACCOUNT, TOP_UP),
            TRANSACTION_INITIAL_STATUS_OFFSET,
            0,
        ),
        "statuses 2/0 are unknown",
    ),
    "initial status expired": Case(
        change_transaction(TOP_UP, set_field("initial_status", lambda _: records.EXPIRED)),
        "has status 2 after initial status 5",
    ),
    "metadata kind": Case(move_metadata_to_kind(2), "belongs to no record flagged with metadata"),
    # Counts, totals and amounts out of range.
    "transaction count": Case(
        change_account(lambda account: setattr(account, "transaction_count", account.transaction_count + 1)),
        "in its order index",
    ),
    "total past int64": Case(
        change_account(lambda account: setattr(account, "credits_pending", INT64_MAX)),
        "settled balance plus pending credits leave int64",
    ),
    "negative total": Case(
        change_account(lambda account: setattr(account, "debits_pending", -1)), "a total is negative"
    ),
    "negative credit leg": Case(
        credit_leg_of_settled_transfer(negated_amounts),
        "is a credit leg with a debit leg's amount or flags",
    ),
    # Lengths past the gateway's limits.
    "metadata value length": Case(
        overlong_metadata_value, f"is {METADATA_VALUE_BYTES_MAX + 1} UTF-8 bytes; at most"
    ),
    # Deadlines that no timeout gives.
    "deadline not whole seconds": Case(
        change_transaction(
            PENDING_WITH_DEADLINE, set_field("expires_at", deadline_after(TIMEOUT_SECONDS, 1))
        ),
        "which no timeout of 1..2592000 whole seconds gives",
    ),
    "deadline past the longest timeout": Case(
        change_transaction(
            PENDING_WITH_DEADLINE, set_field("expires_at", deadline_after(TIMEOUT_SECONDS_MAX + 1))
        ),
        "which no timeout of 1..2592000 whole seconds gives",
    ),
    "deadline before creation": Case(
        change_transaction(PENDING_WITH_DEADLINE, set_field("expires_at", deadline_after(-1))),
        "which no timeout of 1..2592000 whole seconds gives",
    ),
    "expired without a deadline": Case(
        change_transaction(EXPIRED, set_field("expires_at", lambda _: 0)), "has expired without a deadline"
    ),
    "credit leg of a settled transfer with a deadline": Case(
        credit_leg_of_settled_transfer(set_field("expires_at", deadline_after(TIMEOUT_SECONDS))),
        "has a deadline but was created SETTLED",
    ),
    # Transfer flags that no step of a transfer sets.
    "pending leg owing a resolution": Case(
        change_transaction(FAR_TRANSFER, add_flags(records.RESOLVE_OWED)),
        "is a pending debit leg that owes its credit shard a resolution",
    ),
    "settled leg with its credit refused": Case(
        change_transaction(SETTLED_TRANSFER, add_flags(records.CREDIT_REFUSED)),
        "is a debit leg whose credit was refused, still SETTLED",
    ),
    "owing leg with its credit refused": Case(
        change_transaction(FAR_TRANSFER, add_flags(records.CREDIT_REFUSED)),
        "is a debit leg whose credit was refused, still PENDING or owing its credit shard work",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_restore_refuses_a_snapshot_of_a_state_no_command_makes(
    source: Ledger, tmp_path: Path, name: str
) -> None:
    case = CASES[name]
    source.storage.write(case.damage)
    snapshot = tmp_path / "damaged.snapshot"
    source.core.write_snapshot(snapshot)

    target = Ledger(tmp_path / "target", source.bounds)
    try:
        assert target.create_account(now=NOW, account_id=OTHER_ACCOUNT).outcome == OK
        assert (
            target.create(now=NOW + 1, number=1, amount=40, settled=True, account_id=OTHER_ACCOUNT).outcome
            == OK
        )
        before = target.core.state_digest()

        with pytest.raises(SnapshotCorruptError, match="passes its checksum but is inconsistent") as refused:
            target.core.restore_snapshot(snapshot)

        assert case.named in str(refused.value)
        # Nothing half-restored: the shard's own state and index, and it goes on applying.
        assert target.core.state_digest() == before
        assert target.core.verify() == []
        assert (
            target.create(now=NOW + 2, number=2, amount=1, settled=True, account_id=OTHER_ACCOUNT).outcome
            == OK
        )
    finally:
        target.storage.close()


def test_the_undamaged_source_restores(source: Ledger, tmp_path: Path) -> None:
    """What every case above starts from restores: each refusal is its one damaged field's."""
    snapshot = tmp_path / "source.snapshot"
    source.core.write_snapshot(snapshot)
    target = Ledger(tmp_path / "target", source.bounds)
    try:
        target.core.restore_snapshot(snapshot)
        assert target.core.state_digest() == source.core.state_digest()
    finally:
        target.storage.close()
