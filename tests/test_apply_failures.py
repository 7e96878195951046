"""A command whose apply raises a deterministic error is that command's answer, rolled back,
the same on every replica (core/apply_failures.py); the shard goes on applying the rest.

Each test drives two independent cores on real LMDB files with the same log, damages the same
stored row in both, and compares what they answer and store."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core import commands, records, tables
from ledger_cluster.core.apply_failures import DETERMINISTIC_ERRORS
from ledger_cluster.errors import (
    InvariantViolationError,
    RecordFormatError,
    ReplicaBrokenError,
    SnapshotCorruptError,
    StorageError,
)
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.storage import WriteTransaction
from tests.core_ledger import (
    ACCOUNT,
    BOUNDS_WITHOUT_FAR_ACCOUNT,
    FAR_ACCOUNT,
    OTHER_ACCOUNT,
    Ledger,
    create_item,
)

OK = core_pb2.OUTCOME_OK
CORRUPT_RECORD = core_pb2.OUTCOME_CORRUPT_RECORD
THIRD_ACCOUNT = 0x00000000000000C3
NOW = 2_000
NANOSECONDS_PER_SECOND = 1_000_000_000
# A layout byte and a status byte, then nothing: a transaction row cut short.
UNDECODABLE_ROW = b"\x01\x63"
ACCOUNT_FLAGS_OFFSET = 1  # after the layout byte
UNKNOWN_ACCOUNT_FLAG = 0x80
Damage = Callable[[WriteTransaction], None]


def seed(ledger: Ledger) -> None:
    for account_id in (ACCOUNT, OTHER_ACCOUNT, THIRD_ACCOUNT):
        ledger.create_account(now=1_000, account_id=account_id)
        ledger.create(now=1_001, number=1, amount=100, settled=True, account_id=account_id)
        ledger.create(now=1_002, number=2, amount=-30, settled=False, account_id=account_id)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    """Two replicas of one shard: same log, separate LMDB environments."""
    first, second = Ledger(tmp_path / "first"), Ledger(tmp_path / "second")
    try:
        seed(first)
        seed(second)
        yield first, second
    finally:
        first.storage.close()
        second.storage.close()


def unknown_account_flag(transaction: WriteTransaction) -> None:
    key = tables.account_key(ACCOUNT)
    data = bytearray(transaction.get(tables.ACCOUNTS, key) or b"")
    data[ACCOUNT_FLAGS_OFFSET] |= UNKNOWN_ACCOUNT_FLAG
    transaction.put(tables.ACCOUNTS, key, bytes(data))


def overspent_account(transaction: WriteTransaction) -> None:
    """A row that decodes, with debits its transactions never made: available balance below
    the overdraft limit, which `check` refuses once a command touched the account."""
    key = tables.account_key(ACCOUNT)
    account = records.decode_account(transaction.get(tables.ACCOUNTS, key) or b"")
    account.debits_settled += 500
    transaction.put(tables.ACCOUNTS, key, account.encode())


def undecodable_transaction(transaction: WriteTransaction) -> None:
    transaction.put(tables.TRANSACTIONS, tables.transaction_key(ACCOUNT, 2), UNDECODABLE_ROW)


def damage_both(replicas: tuple[Ledger, Ledger], damage: Damage) -> None:
    for ledger in replicas:
        ledger.storage.write(damage)


def apply_on_both(
    replicas: tuple[Ledger, Ledger], command: bytes
) -> tuple[core_pb2.CommandResult, core_pb2.CommandResult]:
    """The leader answers; the follower applies without anybody waiting, as a replica does."""
    leader, follower = replicas
    leader.log.append(command)
    follower.log.append(command)
    index = len(leader.log)
    return leader.core.apply(command, index), follower.core.apply(command, index, answering=False)


def create(account_id: int, number: int, amount: int) -> bytes:
    return create_item(NOW, number, amount, account_id=account_id)


def digests(replicas: tuple[Ledger, Ledger]) -> list[tuple[int, str]]:
    return [ledger.core.state_digest() for ledger in replicas]


@pytest.mark.parametrize(
    ("damage", "command", "named"),
    [
        (unknown_account_flag, create(ACCOUNT, 9, 5), "flags 0x80 are unknown"),
        (overspent_account, create(ACCOUNT, 9, 5), "below the overdraft limit"),
        (undecodable_transaction, commands.settle_transaction(ACCOUNT, 2, NOW), "cut short"),
        (undecodable_transaction, commands.cancel_transaction(ACCOUNT, 2, NOW), "cut short"),
    ],
)
def test_a_command_that_meets_a_corrupt_record_is_refused_alike_and_changes_nothing(
    replicas: tuple[Ledger, Ledger], damage: Damage, command: bytes, named: str
) -> None:
    damage_both(replicas, damage)
    (_, before), _ = digests(replicas)

    answer, follower_answer = apply_on_both(replicas, command)

    assert answer.outcome == CORRUPT_RECORD, answer
    assert named in answer.message
    assert answer.log_index == len(replicas[0].log)
    assert follower_answer.outcome == CORRUPT_RECORD
    # Nothing of the command stays, and the entry is consumed on both.
    assert digests(replicas) == [(len(replicas[0].log), before)] * 2
    assert [ledger.core.refused_commands for ledger in replicas] == [1, 1]


def test_a_batch_refuses_only_its_items_that_meet_a_corrupt_record(replicas: tuple[Ledger, Ledger]) -> None:
    """A log entry carries many callers' writes: the others apply as if the refused ones were
    never sent, on the leader and on the follower alike."""
    damage_both(replicas, unknown_account_flag)
    batch = commands.batch(
        [
            create(OTHER_ACCOUNT, 10, 7),
            create(ACCOUNT, 10, 5),
            create(THIRD_ACCOUNT, 10, 3),
            create(ACCOUNT, 11, 6),
            create(OTHER_ACCOUNT, 11, 1),
        ]
    )

    answer, follower_answer = apply_on_both(replicas, batch)

    assert answer.outcome == OK
    assert follower_answer.outcome == OK
    assert [item.outcome for item in answer.item_results] == [OK, CORRUPT_RECORD, OK, CORRUPT_RECORD, OK]
    assert {item.log_index for item in answer.item_results} == {len(replicas[0].log)}
    first, second = digests(replicas)
    assert first == second
    leader, _ = replicas
    assert leader.balances(OTHER_ACCOUNT) == (78, 108)
    assert leader.balances(THIRD_ACCOUNT) == (73, 103)
    assert leader.transaction(10, ACCOUNT).outcome == core_pb2.OUTCOME_TRANSACTION_NOT_FOUND
    assert leader.core.refused_commands == 2


def test_an_account_that_breaks_an_invariant_refuses_each_item_that_touches_it(
    replicas: tuple[Ledger, Ledger],
) -> None:
    damage_both(replicas, overspent_account)
    batch = commands.batch([create(ACCOUNT, 10, 5), create(OTHER_ACCOUNT, 10, 7), create(ACCOUNT, 11, 2)])

    answer, _ = apply_on_both(replicas, batch)

    assert [item.outcome for item in answer.item_results] == [CORRUPT_RECORD, OK, CORRUPT_RECORD]
    assert "below the overdraft limit" in answer.item_results[2].message
    first, second = digests(replicas)
    assert first == second
    assert replicas[0].balances(OTHER_ACCOUNT) == (77, 107)


def test_a_refused_entry_replayed_after_a_restart_answers_alike_and_stops_nothing(
    replicas: tuple[Ledger, Ledger],
) -> None:
    """PySyncObj applies its journal again after every restart: the entry that was refused
    must not raise then either (that was the crash loop of the whole shard)."""
    leader, _ = replicas
    damage_both(replicas, unknown_account_flag)
    command = create(ACCOUNT, 9, 5)
    first_answer, _ = apply_on_both(replicas, command)
    index = len(leader.log)
    digest = leader.core.state_digest()

    leader.reopen()
    replayed = leader.core.apply(command, index)
    unanswered = leader.core.apply(command, index, answering=False)

    assert (replayed.outcome, replayed.message) == (first_answer.outcome, first_answer.message)
    assert unanswered.outcome == OK  # a replay nobody waits for is skipped
    assert leader.core.state_digest() == digest
    assert leader.submit(create(OTHER_ACCOUNT, 12, 4)).outcome == OK


def test_a_read_of_a_corrupt_record_answers_corrupt_record(replicas: tuple[Ledger, Ledger]) -> None:
    leader, _ = replicas
    damage_both(replicas, unknown_account_flag)
    query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=ACCOUNT))

    result = leader.core.read(query)

    assert result.outcome == CORRUPT_RECORD
    assert "flags 0x80 are unknown" in result.message
    assert leader.balances(OTHER_ACCOUNT) == (70, 100)


def test_an_expiry_passes_over_a_corrupt_transaction_and_expires_the_others(
    replicas: tuple[Ledger, Ledger],
) -> None:
    """One corrupt row listed in `expiries` must not hold up every expiry of its shard."""
    for account_id in (ACCOUNT, OTHER_ACCOUNT):
        pending = commands.create_transaction(
            account_id=account_id,
            transaction_number=20,
            amount=-5,
            description="",
            settled=False,
            request_id="",
            now=NOW,
            timeout_seconds=1,
        )
        assert [answer.outcome for answer in apply_on_both(replicas, pending)] == [OK, OK]
    damage_both(
        replicas,
        lambda transaction: transaction.put(
            tables.TRANSACTIONS, tables.transaction_key(ACCOUNT, 20), UNDECODABLE_ROW
        ),
    )

    answer, _ = apply_on_both(replicas, commands.expire_due(NOW + 2 * NANOSECONDS_PER_SECOND))

    assert answer.outcome == OK
    assert answer.message == "expired 1, passed over 1 with a corrupt record"
    leader, _ = replicas
    assert leader.transaction(20, OTHER_ACCOUNT).transaction.status == ledger_pb2.TRANSACTION_STATUS_EXPIRED
    assert leader.core.earliest_deadline() == NOW + NANOSECONDS_PER_SECOND  # the corrupt one stays listed
    first, second = digests(replicas)
    assert first == second


def test_the_transfer_work_listing_leaves_out_a_corrupt_debit_leg(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger", BOUNDS_WITHOUT_FAR_ACCOUNT)
    try:
        for account_id in (ACCOUNT, OTHER_ACCOUNT):
            ledger.create_account(now=NOW, account_id=account_id)
            ledger.submit(create_item(NOW, 1, 100, account_id=account_id))
            transfer = commands.create_transfer(
                debit_account_id=account_id,
                transfer_number=30,
                credit_account_id=FAR_ACCOUNT,
                amount=10,
                description="",
                settled=True,
                request_id="",
                now=NOW,
            )
            assert ledger.submit(transfer).outcome == OK
        ledger.storage.write(
            lambda transaction: transaction.put(
                tables.TRANSACTIONS, tables.transaction_key(ACCOUNT, 30), UNDECODABLE_ROW
            )
        )
        query = core_pb2.ReadQuery(transfer_work=core_pb2.TransferWorkQuery(limit=10))

        work = ledger.core.read(query)

        assert work.outcome == OK
        assert [records.decode_transaction(leg).account_id for leg in work.transactions] == [OTHER_ACCOUNT]
    finally:
        ledger.storage.close()


@pytest.mark.parametrize(
    "error",
    [
        StorageError("commit failed: disk full"),
        SnapshotCorruptError("checksum mismatch"),
        ReplicaBrokenError("entry 7 was applied by another writer"),
        OSError(28, "No space left on device"),
        MemoryError(),
        RecursionError(),
    ],
)
def test_errors_of_the_machine_are_not_answered_but_stop_the_replica(error: Exception) -> None:
    """They differ between replicas: answering one as a refusal would make replicas differ."""
    assert not isinstance(error, DETERMINISTIC_ERRORS)


@pytest.mark.parametrize(
    "error",
    [
        RecordFormatError("flags unknown"),
        InvariantViolationError("total negative"),
        struct.error("unpack requires a buffer of 8 bytes"),
        KeyError(7),
        ValueError("99 is not a valid Status"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        ZeroDivisionError(),
    ],
)
def test_errors_that_follow_from_the_log_and_the_state_are_answered(error: Exception) -> None:
    assert isinstance(error, DETERMINISTIC_ERRORS)
