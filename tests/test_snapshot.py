"""Snapshot stream: round trip, replace semantics, bounds filtering, corruption rejected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger_cluster.core import SNAPSHOT_TABLES, records
from ledger_cluster.errors import SnapshotCorruptError
from ledger_cluster.sharding import shard_key
from ledger_cluster.storage import WriteTransaction, read_snapshot_header
from tests.core_ledger import Ledger

ACCOUNTS = [0x10 + index for index in range(12)]


def all_records(ledger: Ledger) -> dict[str, list[tuple[bytes, bytes]]]:
    with ledger.storage.read() as view:
        return {name: list(view.iterate(name)) for name in SNAPSHOT_TABLES.values()}


def populate(ledger: Ledger) -> None:
    now = 1_000
    for account in ACCOUNTS:
        now += 1
        ledger.create_account(now=now, account_id=account)
        ledger.create(now=now, number=1, amount=500, settled=True, account_id=account, request_id="seed")
        ledger.create(now=now, number=2, amount=-70, settled=False, account_id=account)
        ledger.create(now=now, number=3, amount=30, settled=False, account_id=account, description="é" * 100)
        ledger.create(now=now, number=4, amount=-9_999, settled=True, account_id=account)
        ledger.settle(now=now + 1, number=2, account_id=account)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "source")
    populate(ledger)
    yield ledger
    ledger.storage.close()


def test_round_trip_restores_every_table(ledger: Ledger, tmp_path: Path) -> None:
    snapshot = tmp_path / "shard.snapshot"
    records_before = all_records(ledger)
    digest_before = ledger.core.state_digest()
    header = ledger.core.write_snapshot(snapshot, metadata=b"raft position")
    assert header.metadata == b"raft position"
    assert header.applied_index == len(ledger.log)
    assert header.record_count == sum(len(rows) for rows in records_before.values())
    assert read_snapshot_header(snapshot) == header

    # Mutate after the snapshot: new rows, changed rows.
    ledger.cancel(now=5_000, number=3, account_id=ACCOUNTS[0])
    ledger.create_account(now=5_001, account_id=0xFFFF)
    assert ledger.core.state_digest() != digest_before

    restored = ledger.core.restore_snapshot(snapshot)
    assert restored == header
    assert all_records(ledger) == records_before
    assert ledger.core.state_digest() == digest_before
    assert ledger.core.applied_index() == header.applied_index
    assert ledger.core.verify() == []


def test_restore_into_a_fresh_replica(ledger: Ledger, tmp_path: Path) -> None:
    snapshot = tmp_path / "shard.snapshot"
    ledger.core.write_snapshot(snapshot)
    fresh = Ledger(tmp_path / "fresh")
    try:
        fresh.core.restore_snapshot(snapshot)
        assert fresh.core.state_digest() == ledger.core.state_digest()
        assert all_records(fresh) == all_records(ledger)
    finally:
        fresh.storage.close()


def test_restore_keeps_only_rows_inside_the_shard_bounds(ledger: Ledger, tmp_path: Path) -> None:
    snapshot = tmp_path / "shard.snapshot"
    ledger.core.write_snapshot(snapshot)
    middle = 2**31
    lower = Ledger(tmp_path / "lower-half", bounds=(0, middle - 1))
    try:
        core = lower.core
        core.restore_snapshot(snapshot, applied_index=lambda header: 0)
        kept_accounts = {int.from_bytes(key, "big") for key, _ in all_records(lower)["accounts"]}
        expected = {account for account in ACCOUNTS if shard_key(account) < middle}
        assert kept_accounts == expected
        assert 0 < len(expected) < len(ACCOUNTS)
        for rows in all_records(lower).values():
            assert all(shard_key(int.from_bytes(key[:8], "big")) < middle for key, _ in rows)
        assert core.applied_index() == 0
        assert core.verify() == []
    finally:
        lower.storage.close()


def corrupt_copies(snapshot: Path, directory: Path) -> Iterator[tuple[str, Path]]:
    data = snapshot.read_bytes()
    cases = {
        "flipped byte in a record": len(data) // 2,
        "flipped byte in the header": 20,
        "flipped byte in the checksum": len(data) - 1,
        "flipped magic": 0,
    }
    for name, offset in cases.items():
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        path = directory / name.replace(" ", "-")
        path.write_bytes(bytes(damaged))
        yield name, path
    for name, length in {"cut short": len(data) - 7, "cut to header": 30, "empty": 0}.items():
        path = directory / name.replace(" ", "-")
        path.write_bytes(data[:length])
        yield name, path
    path = directory / "trailing-bytes"
    path.write_bytes(data + b"\x00")
    yield "trailing bytes", path


def test_corrupt_or_truncated_snapshots_are_rejected_and_change_nothing(
    ledger: Ledger, tmp_path: Path
) -> None:
    snapshot = tmp_path / "shard.snapshot"
    ledger.core.write_snapshot(snapshot)
    ledger.create_account(now=9_000, account_id=0xABCDEF)  # state now differs from the snapshot
    state_before = ledger.core.state_digest()
    damaged_directory = tmp_path / "damaged"
    damaged_directory.mkdir()
    rejected = []
    for name, path in corrupt_copies(snapshot, damaged_directory):
        with pytest.raises(SnapshotCorruptError):
            ledger.core.restore_snapshot(path)
        assert ledger.core.state_digest() == state_before, name
        rejected.append(name)
    assert len(rejected) == 8
    ledger.core.restore_snapshot(snapshot)  # the undamaged one still restores
    assert ledger.core.verify() == []


def test_snapshot_write_is_atomic(ledger: Ledger, tmp_path: Path) -> None:
    snapshot = tmp_path / "shard.snapshot"
    ledger.core.write_snapshot(snapshot)
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == ["shard.snapshot"]


def assert_restore_refused(ledger: Ledger, tmp_path: Path) -> None:
    """A snapshot of `ledger`'s (invalid) state is a valid stream, which a fresh shard refuses
    to restore, keeping its own state."""
    snapshot = tmp_path / "invalid-state.snapshot"
    ledger.core.write_snapshot(snapshot)
    fresh = Ledger(tmp_path / "fresh")
    try:
        before = fresh.core.state_digest()
        with pytest.raises(SnapshotCorruptError, match="inconsistent"):
            fresh.core.restore_snapshot(snapshot)
        assert fresh.core.state_digest() == before
    finally:
        fresh.storage.close()


@pytest.mark.parametrize(
    ("table", "damage"),
    [
        ("accounts", "delete the account of live transactions"),
        ("account_transactions", "delete an order-index row"),
        ("recent_requests", "delete a request_id row"),
        ("requests", "point a request digest at no transaction"),
        ("accounts", "raise an account's settled credits"),
        ("transactions", "settle a transaction for less than its amount"),
        ("transactions", "store an undecodable transaction"),
        ("transactions", "store a transaction under a short key"),
        ("transactions", "give a refused purchase status 99"),
        ("transactions", "give a refused purchase status cancelled"),
    ],
)
def test_snapshot_that_passes_its_checksum_but_is_inconsistent_is_rejected(
    ledger: Ledger, tmp_path: Path, table: str, damage: str
) -> None:
    account_key = ACCOUNTS[0].to_bytes(8, "big")

    def corrupt(transaction: WriteTransaction) -> None:
        if damage.startswith("delete the account"):
            transaction.delete(table, account_key)
        elif damage.startswith("delete an order"):
            transaction.delete(table, account_key + (0).to_bytes(8, "big"))
        elif damage.startswith("delete a request_id"):
            (key, _), *_ = transaction.iterate(table)
            transaction.delete(table, key)
        elif damage.startswith("point a request"):
            transaction.put(table, account_key + bytes(16), (12345).to_bytes(8, "big"))
        elif damage.startswith("raise an account"):
            account = records.decode_account(transaction.get(table, account_key) or b"")
            account.credits_settled += 1
            transaction.put(table, account_key, account.encode())
        elif damage.startswith("settle a transaction"):
            key = account_key + (1).to_bytes(8, "big")
            settled = records.decode_transaction(transaction.get(table, key) or b"")
            assert settled.status == records.Status.SETTLED
            settled.settled_amount -= 1
            transaction.put(table, key, settled.encode())
        elif damage.startswith("store an undecodable"):
            transaction.put(table, account_key + (99).to_bytes(8, "big"), b"\xff\xff\xff")
        elif damage.startswith("give a"):
            # Transaction 4 was refused (INSUFFICIENT_FUNDS): it counts in no balance, so the
            # balances still add up; only its status says what no command ever produced.
            key = account_key + (4).to_bytes(8, "big")
            record = records.decode_transaction(transaction.get(table, key) or b"")
            assert record.status == records.Status.INSUFFICIENT_FUNDS
            record.status = 99 if "99" in damage else records.Status.CANCELLED
            transaction.put(table, key, record.encode())
        else:
            transaction.put(table, b"abc", b"")

    ledger.storage.write(corrupt)
    assert_restore_refused(ledger, tmp_path)


def unmade_state(transaction: WriteTransaction, table: str, damage: str) -> None:
    """One state that no command makes."""
    account_key = ACCOUNTS[0].to_bytes(8, "big")
    if damage.startswith("grant an overdraft"):
        # An overdraft limit is legal only with the totals it allows: this one is spent already.
        account = records.decode_account(transaction.get(table, account_key) or b"")
        account.overdraft_limit = -1
        transaction.put(table, account_key, account.encode())
    elif damage.startswith("lower-case"):
        account = records.decode_account(transaction.get(table, account_key) or b"")
        account.currency = "usd"
        transaction.put(table, account_key, account.encode())
    elif damage.startswith("pad the currency"):
        data = bytearray(transaction.get(table, account_key) or b"")
        data[10:14] = b"\0USD"  # the currency field starts after layout, flags and id
        transaction.put(table, account_key, bytes(data))
    elif damage.startswith("store a metadata"):
        transaction.put(table, account_key + bytes(9), b"{}")
    else:
        key = account_key + (4).to_bytes(8, "big")
        refused = records.decode_transaction(transaction.get(table, key) or b"")
        if damage.startswith("turn a refused purchase"):
            refused.amount = -refused.amount
        else:
            refused.description = "d" * 1_025
        transaction.put(table, key, refused.encode())


@pytest.mark.parametrize(
    ("table", "damage"),
    [
        ("accounts", "grant an overdraft limit below zero"),
        ("accounts", "lower-case the currency"),
        ("accounts", "pad the currency with a leading NUL"),
        ("transactions", "turn a refused purchase into a refused top-up"),
        ("transactions", "store a description over the limit"),
        ("metadata", "store a metadata row"),
    ],
)
def test_a_snapshot_of_a_state_no_command_makes_is_rejected(
    ledger: Ledger, tmp_path: Path, table: str, damage: str
) -> None:
    """An overdraft limit, say, would let a later purchase through: such a state is refused
    at restore, before any replica acts on it."""
    ledger.storage.write(lambda transaction: unmade_state(transaction, table, damage))
    assert ledger.core.verify() != []
    assert_restore_refused(ledger, tmp_path)
