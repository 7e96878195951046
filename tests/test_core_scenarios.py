"""AccountsCore scenarios with explicit `now`, one per API.md rule, on real LMDB files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger_cluster.core import TABLE_NAMES, AccountsCore, commands
from ledger_cluster.errors import DataDirectoryInUseError, StorageLayoutError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import DESCRIPTION_BYTES_MAX, INT64_MAX, PAGE_SIZE_MAX, REQUEST_ID_BYTES_MAX
from ledger_cluster.sharding import shard_key
from ledger_cluster.storage import DirectoryLock, Storage
from tests.core_ledger import (
    ACCOUNT,
    CANCELLED,
    FULL_RANGE,
    INSUFFICIENT_FUNDS,
    OK,
    OTHER_ACCOUNT,
    PENDING,
    SETTLED,
    Ledger,
    viewed,
)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "shard")
    yield ledger
    assert ledger.core.verify() == []
    ledger.storage.close()


def test_scenario_1_numbers(ledger: Ledger) -> None:
    assert ledger.create_account(now=1_000).outcome == OK
    assert ledger.balances() == (0, 0)
    top_up = ledger.create(now=2_000, number=1, amount=100, settled=True)
    assert top_up.transaction.status == SETTLED
    assert ledger.balances() == (100, 100)
    purchase = ledger.create(now=3_000, number=2, amount=-10, settled=False)
    assert purchase.transaction.status == PENDING
    assert ledger.balances() == (90, 100)
    settled = ledger.settle(now=4_000, number=2)
    assert settled.transaction.status == SETTLED
    assert (settled.transaction.created_at, settled.transaction.updated_at) == (3_000, 4_000)
    assert ledger.balances() == (90, 90)
    big = ledger.create(now=5_000, number=3, amount=-1000, settled=True)
    assert big.outcome == OK
    assert big.transaction.status == INSUFFICIENT_FUNDS
    assert ledger.balances() == (90, 90)
    account = ledger.account()
    assert (account.created_at, account.updated_at) == (1_000, 4_000)


def test_pending_top_up_changes_nothing_until_settled(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=50, settled=False)
    assert ledger.balances() == (0, 0)
    assert ledger.account().updated_at == 1
    ledger.settle(now=3, number=1)
    assert ledger.balances() == (50, 50)
    assert ledger.account().updated_at == 3


def test_cancel_returns_a_hold_and_a_cancelled_top_up_changes_nothing(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=100, settled=True)
    ledger.create(now=3, number=2, amount=-30, settled=False)
    assert ledger.balances() == (70, 100)
    cancelled = ledger.cancel(now=4, number=2)
    assert cancelled.transaction.status == CANCELLED
    assert cancelled.transaction.updated_at == 4
    assert ledger.balances() == (100, 100)
    ledger.create(now=5, number=3, amount=40, settled=False)
    ledger.cancel(now=6, number=3)
    assert ledger.balances() == (100, 100)


def test_settled_purchase_shrinks_both_balances(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=100, settled=True)
    ledger.create(now=3, number=2, amount=-100, settled=True)
    assert ledger.balances() == (0, 0)


def test_a_purchase_is_checked_against_available_not_settled(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=100, settled=True)
    ledger.create(now=3, number=2, amount=-80, settled=False)
    refused = ledger.create(now=4, number=3, amount=-30, settled=True)
    assert refused.transaction.status == INSUFFICIENT_FUNDS
    assert ledger.balances() == (20, 100)


def test_settle_and_cancel_are_retry_safe_and_otherwise_need_pending(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=10, settled=True)
    ledger.create(now=3, number=2, amount=5, settled=False)
    ledger.cancel(now=4, number=2)
    ledger.create(now=5, number=3, amount=-99, settled=False)  # insufficient funds
    again = ledger.settle(now=6, number=1)
    assert again.outcome == OK
    assert (again.transaction.status, again.transaction.updated_at) == (SETTLED, 2)
    assert ledger.cancel(now=7, number=2).transaction.updated_at == 4
    for number, action in ((1, ledger.cancel), (2, ledger.settle), (3, ledger.settle), (3, ledger.cancel)):
        assert action(now=8, number=number).outcome == core_pb2.OUTCOME_TRANSACTION_NOT_PENDING
    assert ledger.balances() == (10, 10)


def test_unknown_account_and_transaction(ledger: Ledger) -> None:
    assert (
        ledger.create(now=1, number=1, amount=5, settled=True).outcome == core_pb2.OUTCOME_ACCOUNT_NOT_FOUND
    )
    ledger.create_account(now=2)
    assert ledger.settle(now=3, number=42).outcome == core_pb2.OUTCOME_TRANSACTION_NOT_FOUND
    assert ledger.cancel(now=3, number=42).outcome == core_pb2.OUTCOME_TRANSACTION_NOT_FOUND
    assert ledger.settle(now=3, number=1, account_id=OTHER_ACCOUNT).outcome == (
        core_pb2.OUTCOME_TRANSACTION_NOT_FOUND
    )
    assert ledger.transaction(42).outcome == core_pb2.OUTCOME_TRANSACTION_NOT_FOUND
    assert ledger.listing(0, 10, OTHER_ACCOUNT).outcome == core_pb2.OUTCOME_ACCOUNT_NOT_FOUND


def test_request_id_repeat_returns_the_original_result(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    first = ledger.create(now=2, number=1, amount=-10, settled=False, request_id="r-1")
    ledger.create(now=3, number=2, amount=100, settled=True)
    assert first.transaction.status == INSUFFICIENT_FUNDS
    # A later repeat (new id, new time) gets the first answer, not a new transaction.
    repeat = ledger.create(now=4, number=3, amount=-10, settled=False, request_id="r-1")
    assert repeat.outcome == OK
    assert repeat.transaction == first.transaction
    assert ledger.balances() == (100, 100)
    assert len(ledger.listing(0, 10).transactions) == 2


def test_request_id_repeat_after_settle_returns_the_original_not_the_current_state(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=100, settled=True)
    first = ledger.create(now=3, number=2, amount=-10, settled=False, request_id="order-7")
    ledger.settle(now=4, number=2)
    repeat = ledger.create(now=5, number=9, amount=-10, settled=False, request_id="order-7")
    assert repeat.transaction == first.transaction
    assert repeat.transaction.status == PENDING


@pytest.mark.parametrize(
    ("amount", "settled", "description"),
    [(-11, False, ""), (-10, True, ""), (-10, False, "other")],
)
def test_request_id_with_another_payload_is_rejected(
    ledger: Ledger, amount: int, settled: bool, description: str
) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=-10, settled=False, request_id="r")
    changed = ledger.create(
        now=3, number=2, amount=amount, settled=settled, request_id="r", description=description
    )
    assert changed.outcome == core_pb2.OUTCOME_REQUEST_ID_REUSED
    assert len(ledger.listing(0, 10).transactions) == 1


def test_request_id_is_scoped_per_account(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create_account(now=1, account_id=OTHER_ACCOUNT)
    assert ledger.create(now=2, number=1, amount=5, settled=True, request_id="same").outcome == OK
    other = ledger.create(
        now=3, number=1, amount=7, settled=True, request_id="same", account_id=OTHER_ACCOUNT
    )
    assert other.outcome == OK
    assert ledger.balances(OTHER_ACCOUNT) == (7, 7)


def test_create_account_repeats(ledger: Ledger) -> None:
    first = ledger.create_account(now=10, request_id="signup-1")
    later = ledger.create_account(now=20, request_id="signup-1")
    assert later.outcome == OK
    assert later.account == first.account
    # The same id without the same command (another `now`) is a collision, not a repeat.
    collision = ledger.create_account(now=30, account_id=OTHER_ACCOUNT)
    assert collision.outcome == OK
    assert ledger.create_account(now=31, account_id=OTHER_ACCOUNT).outcome == (
        core_pb2.OUTCOME_ACCOUNT_ID_COLLISION
    )


def test_redelivered_command_applies_once(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    command = commands.create_transaction(
        account_id=ACCOUNT,
        transaction_number=5,
        amount=30,
        description="",
        settled=True,
        request_id="",
        now=2,
    )
    first = ledger.submit(command)
    second = ledger.submit(command)  # a client retry: committed twice in the log
    assert second.outcome == OK
    assert second.transaction == first.transaction
    assert ledger.balances() == (30, 30)
    # Same transaction number with other content: a gateway id collision, not a repeat.
    assert ledger.create(now=3, number=5, amount=30, settled=True).outcome == (
        core_pb2.OUTCOME_TRANSACTION_ID_COLLISION
    )


def test_balance_overflow_stores_nothing(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=1, settled=True)
    overflow = ledger.create(now=3, number=2, amount=INT64_MAX, settled=True)
    assert overflow.outcome == core_pb2.OUTCOME_BALANCE_OVERFLOW
    assert ledger.transaction(2).outcome == core_pb2.OUTCOME_TRANSACTION_NOT_FOUND
    # Pending top-ups count: settling both could not fit.
    assert ledger.create(now=4, number=3, amount=INT64_MAX - 1, settled=False).outcome == OK
    blocked = ledger.create(now=5, number=4, amount=1, settled=False, request_id="x")
    assert blocked.outcome == core_pb2.OUTCOME_BALANCE_OVERFLOW
    assert ledger.create(now=6, number=5, amount=1, settled=False, request_id="x").outcome == (
        core_pb2.OUTCOME_BALANCE_OVERFLOW
    )
    assert ledger.settle(now=7, number=3).outcome == OK
    assert ledger.balances() == (INT64_MAX, INT64_MAX)
    assert len(ledger.listing(0, 10).transactions) == 2


def test_largest_purchase_is_insufficient_not_an_error(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=INT64_MAX, settled=True)
    assert (
        ledger.create(now=3, number=2, amount=-(2**63), settled=True).transaction.status == INSUFFICIENT_FUNDS
    )
    assert ledger.create(now=4, number=3, amount=-INT64_MAX, settled=True).transaction.status == SETTLED
    assert ledger.balances() == (0, 0)


def test_invalid_commands_are_consumed_without_effect(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    digest_before = ledger.core.state_digest()[1]

    def create(amount: int, description: str = "", request_id: str = "") -> bytes:
        return commands.create_transaction(
            account_id=ACCOUNT,
            transaction_number=1,
            amount=amount,
            description=description,
            settled=True,
            request_id=request_id,
            now=2,
        )

    for command in (
        b"\xff\xff garbage",
        commands.envelope(core_pb2.CommandType.ValueType(99), 2, b""),
        commands.envelope(core_pb2.COMMAND_TYPE_CREATE_TRANSACTION, 2, b"\xff\xff"),
        create(0),
        create(1, description="é" * (DESCRIPTION_BYTES_MAX // 2) + "x"),
        create(1, request_id="x" * (REQUEST_ID_BYTES_MAX + 1)),
        commands.create_account(OTHER_ACCOUNT, "é" * (REQUEST_ID_BYTES_MAX // 2) + "x", 2),
    ):
        assert ledger.submit(command).outcome == core_pb2.OUTCOME_INVALID_COMMAND
    applied_index, digest_after = ledger.core.state_digest()
    assert digest_after == digest_before
    assert applied_index == len(ledger.log)


def test_listing_follows_apply_order_across_equal_timestamps(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    numbers = [900, 5, 77, 2**64 - 1, 1, 300]  # id order differs from apply order
    for number in numbers:
        ledger.create(now=2, number=number, amount=1, settled=True)
    first = ledger.listing(0, 4)
    assert [t.id[16:] for t in first.transactions] == [f"{n:016x}" for n in numbers[:4]]
    assert first.next_sequence == 4
    rest = ledger.listing(first.next_sequence, 4)
    assert [t.id[16:] for t in rest.transactions] == [f"{n:016x}" for n in numbers[4:]]
    assert rest.next_sequence == 0
    assert ledger.listing(7, 4).outcome == core_pb2.OUTCOME_INVALID_PAGE_TOKEN
    assert ledger.listing(0, PAGE_SIZE_MAX + 1).outcome == core_pb2.OUTCOME_INVALID_COMMAND


def test_restart_reapplying_a_log_suffix_changes_nothing(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=100, settled=True)
    ledger.create(now=3, number=2, amount=-10, settled=False)
    ledger.settle(now=4, number=2)
    ledger.create(now=5, number=3, amount=-20, settled=False)
    ledger.cancel(now=6, number=3)
    ledger.create(now=7, number=4, amount=-500, settled=True)
    before = ledger.core.state_digest()
    ledger.reopen()
    # PySyncObj replays its journal after a restart: every entry arrives again at its index.
    for index in range(3, len(ledger.log) + 1):
        replay = viewed(ledger.core.apply(ledger.log[index - 1], index))
        assert replay.log_index == index
    assert ledger.core.state_digest() == before
    assert ledger.balances() == (90, 90)
    # And the log goes on from there.
    ledger.create(now=8, number=5, amount=1, settled=True)
    assert ledger.core.applied_index() == len(ledger.log)
    assert ledger.balances() == (91, 91)


def test_replayed_entry_answers_like_a_repeat(ledger: Ledger) -> None:
    ledger.create_account(now=1)
    created = ledger.create(now=2, number=1, amount=40, settled=True)
    replayed = viewed(ledger.core.apply(ledger.log[1], 2))
    assert replayed.outcome == OK
    assert replayed.transaction == created.transaction


def test_a_replayed_entry_nobody_waits_for_is_skipped(ledger: Ledger) -> None:
    """A restart replays the journal with no caller waiting: no answer is built, no record is
    read, and nothing changes; not even an entry that now would fail is looked at."""
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=40, settled=True)
    ledger.create(now=3, number=2, amount=-100, settled=True)  # refused: insufficient funds
    before = ledger.core.state_digest()
    for index, entry in enumerate(ledger.log, start=1):
        replayed = ledger.core.apply(entry, index, answering=False)
        assert (replayed.outcome, replayed.log_index) == (OK, index)
        assert not replayed.transaction and not replayed.account and not replayed.item_results
    assert ledger.core.apply(b"not a command", 1, answering=False).outcome == OK
    assert ledger.core.state_digest() == before


def test_data_directory_remembers_its_shard_bounds(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "shard", TABLE_NAMES)
    AccountsCore(storage, 0, 1000)
    storage.close()
    storage = Storage(tmp_path / "shard", TABLE_NAMES)
    try:
        with pytest.raises(StorageLayoutError, match="another shard layout"):
            AccountsCore(storage, 0, 2000)
        assert AccountsCore(storage, 0, 1000).applied_index() == 0
    finally:
        storage.close()


def test_map_grows_when_full(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "small", TABLE_NAMES, map_size_bytes=64 * 1024)
    try:
        core = AccountsCore(storage, *FULL_RANGE)
        initial_map_size = storage.map_size_bytes
        index = 0
        for account in range(1, 400):
            index += 1
            result = core.apply(commands.create_account(account, "", 1), index)
            assert result.outcome == OK
        assert storage.map_size_bytes > initial_map_size
        assert core.applied_index() == index
        assert core.verify() == []
    finally:
        storage.close()


def test_commands_and_reads_for_another_shard_are_refused(tmp_path: Path) -> None:
    half = 2**31
    ledger = Ledger(tmp_path / "lower", bounds=(0, half - 1))
    try:
        foreign = next(account for account in range(1, 100) if shard_key(account) >= half)
        local = next(account for account in range(1, 100) if shard_key(account) < half)
        assert ledger.create_account(now=1, account_id=foreign).outcome == core_pb2.OUTCOME_SHARD_MISMATCH
        assert ledger.create_account(now=1, account_id=local).outcome == OK
        query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=foreign))
        assert ledger.core.read(query).outcome == core_pb2.OUTCOME_SHARD_MISMATCH
        assert ledger.core.verify() == []
        with ledger.storage.read() as view:
            assert view.count("accounts") == 1
    finally:
        ledger.storage.close()


def test_a_data_directory_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    first = DirectoryLock(tmp_path / "data")
    try:
        # flock is per open file description: a second one conflicts even within a process,
        # as it does across processes.
        with pytest.raises(DataDirectoryInUseError, match="in use"):
            DirectoryLock(tmp_path / "data")
    finally:
        first.release()
    DirectoryLock(tmp_path / "data").release()
