"""State format 2 (issue 13): fixed-layout records, request ids in two tables, the way up from
format 1, and the collision rule of request digests.

`tests/data/backup-v1` is a real `ledger-dev backup` of a 2-shard cluster written by the last
release of state format 1 (commit e63d42f), with every kind of transaction and request ids;
`backup-v1-expected.json` is what its gateway answered for every account and listing then.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf.json_format import ParseDict

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core import TABLE_NAMES, AccountsCore, accounts_core, records, tables
from ledger_cluster.errors import SnapshotCorruptError, StorageLayoutError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.status import error_details
from ledger_cluster.storage import Storage, WriteTransaction
from tests.cluster import new_cluster, started_cluster
from tests.core_ledger import ACCOUNT, OK, Ledger
from tests.test_backup import describe, run_dev
from tests.test_cluster import RPC_TIMEOUT_SECONDS, create, get_account, list_all

DATA = Path(__file__).parent / "data"
V1_BACKUP = DATA / "backup-v1"
V1_EXPECTED = DATA / "backup-v1-expected.json"
SMALL_RECENT_REQUESTS_MAX = 4
REQUESTS_MOVED_ROUNDS = 3


def expected_v1() -> dict[str, tuple[ledger_pb2.Account, list[ledger_pb2.Transaction]]]:
    document = json.loads(V1_EXPECTED.read_text())
    return {
        account_id: (
            ParseDict(entry["account"], ledger_pb2.Account()),
            [ParseDict(item, ledger_pb2.Transaction()) for item in entry["transactions"]],
        )
        for account_id, entry in document.items()
    }


Viewed = TypeVar("Viewed", ledger_pb2.Account, ledger_pb2.Transaction)
# The fields the format-1 gateway answered (1-5 of Account, 1-7 of Transaction); the fields of
# the second wave are checked by the totals test above.
_FIRST_WAVE_FIELDS = {"Account": 5, "Transaction": 7}


def first_wave_fields(message: Viewed) -> Viewed:
    kept = type(message)()
    highest = _FIRST_WAVE_FIELDS[message.DESCRIPTOR.name]
    for descriptor, value in message.ListFields():
        if descriptor.number <= highest and descriptor.message_type is None:
            setattr(kept, descriptor.name, value)
    return kept


def request_id_count(ledger: Ledger) -> tuple[int, int]:
    """(ids in `requests`, ids in `recent_requests`)."""
    with ledger.storage.read() as view:
        recent = sum(
            len(value) // tables.RECENT_REQUEST.size for _, value in view.iterate(tables.RECENT_REQUESTS)
        )
        return view.count(tables.REQUESTS), recent


# -- format 1 ---------------------------------------------------------------------------------


def test_a_data_directory_of_format_1_is_refused_with_the_way_up(tmp_path: Path) -> None:
    directory = tmp_path / "old-replica"
    storage = Storage(directory, TABLE_NAMES)

    def write_format_1_meta(transaction: WriteTransaction) -> None:
        transaction.put(tables.META, tables.META_SHARD_BOUNDS, tables.encode_bounds(0, 2**32 - 1))
        transaction.put(tables.META, tables.META_FORMAT_VERSION, tables.encode_u64(1))
        transaction.put(tables.META, tables.META_APPLIED_INDEX, tables.encode_u64(7))

    storage.write(write_format_1_meta)
    storage.close()
    with pytest.raises(
        StorageLayoutError, match=r"state format 1; this release reads format 2 only"
    ) as raised:
        AccountsCore.open(directory, 0, 2**32 - 1)
    assert "ledger-dev restore --backup" in str(raised.value)


def test_a_format_1_snapshot_converts_and_verifies(tmp_path: Path) -> None:
    manifest = json.loads((V1_BACKUP / "manifest.json").read_text())
    expected = expected_v1()
    for shard in manifest["shards"]:
        core = AccountsCore.open(tmp_path / shard["shard_id"], shard["lower_bound"], shard["upper_bound"])
        try:
            header = core.restore_snapshot(V1_BACKUP / shard["file"])
            assert header.format_version == 1
            assert core.verify() == []
            for account_id, (account, transactions) in expected.items():
                number = int(account_id, 16)
                if not core.owns_account(number):
                    continue
                query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=number))
                record = records.decode_account(core.read(query).account)
                assert (record.available_balance, record.settled_balance) == (
                    account.available_balance,
                    account.settled_balance,
                )
                assert record.transaction_count == len(transactions)
                # Lifetime totals, which format 1 did not keep, come from the transactions.
                settled = [
                    t.amount for t in transactions if t.status == ledger_pb2.TRANSACTION_STATUS_SETTLED
                ]
                assert record.credits_settled == sum(a for a in settled if a > 0)
                assert record.debits_settled == -sum(a for a in settled if a < 0)
        finally:
            core.close()


def test_a_format_1_backup_restores_into_a_format_2_cluster(tmp_path: Path) -> None:
    """`ledger-dev restore` of the old release's backup: every account and listing answers as
    the old cluster did, `verify` passes, and request ids of the old release still protect."""
    target = new_cluster(tmp_path / "restored", shards=3)
    result = run_dev(
        "restore", "--backup", str(V1_BACKUP), "--config", str(target.config_path), "--data-root",
        str(target.base_dir / "data"),
    )  # fmt: skip
    assert result.returncode == 0, describe(result)
    expected = expected_v1()
    with started_cluster(target) as cluster:
        stub = cluster.ledger_stub()
        for account_id, (account, transactions) in expected.items():
            assert first_wave_fields(get_account(stub, account_id)) == account
            assert [
                first_wave_fields(transaction) for transaction in list_all(stub, account_id)
            ] == transactions
        cluster.wait_converged()
        verified = run_dev(
            "verify", "--config", str(cluster.config_path), "--settle-seconds", "5", cluster=cluster
        )
        assert verified.returncode == 0, describe(verified)
        # The fixture's last top-up of each account (5) carried the request id "again-<account>".
        for account_id, (_, transactions) in expected.items():
            repeat = create(stub, account_id, 5, request_id=f"again-{account_id}")
            assert first_wave_fields(repeat) == transactions[-1]
            other = ledger_pb2.CreateTransactionRequest(
                account_id=account_id, amount=6, settled=True, request_id=f"again-{account_id}"
            )
            with pytest.raises(grpc.RpcError) as raised:
                stub.CreateTransaction(other, timeout=RPC_TIMEOUT_SECONDS)
            details = error_details(raised.value)
            assert (details.code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


def test_a_format_1_account_whose_lifetime_totals_leave_int64_is_refused_by_name(tmp_path: Path) -> None:
    """Format 1 kept net balances: 2^63-1 in, 2^63-1 out and 5 in is a balance of 5, but
    lifetime credits beyond int64, which format 2 cannot hold. Restore says so and writes nothing."""
    account_id = 0xA1
    maximum = 2**63 - 1
    amounts = [maximum, -maximum, 5]
    rows: list[tuple[int, bytes, bytes]] = [
        (1, tables.account_key(account_id), core_pb2.AccountRecordV1(
            account_id=account_id, available_balance=5, settled_balance=5, transaction_count=3,
        ).SerializeToString()),
    ]  # fmt: skip
    for number, amount in enumerate(amounts, start=1):
        record = core_pb2.TransactionRecordV1(
            account_id=account_id, transaction_number=number, amount=amount, status=2, initial_status=2,
            settled_requested=True, sequence=number - 1,
        )  # fmt: skip
        rows.append((2, tables.transaction_key(account_id, number), record.SerializeToString()))
        rows.append((3, tables.sequence_key(account_id, number - 1), tables.encode_u64(number)))
    snapshot = tmp_path / "v1.snapshot"
    write_v1_snapshot(snapshot, rows)
    core = AccountsCore.open(tmp_path / "shard", 0, 2**32 - 1)
    try:
        before = core.state_digest()
        with pytest.raises(SnapshotCorruptError, match="lifetime"):
            core.restore_snapshot(snapshot)
        assert core.state_digest() == before
    finally:
        core.close()


def write_v1_snapshot(path: Path, rows: list[tuple[int, bytes, bytes]]) -> None:
    """A format-1 snapshot stream of `rows` (table id, key, value), as storage.py lays it out."""
    body = b"".join(
        struct.pack(">BHI", table, len(key), len(value)) + key + value for table, key, value in rows
    )
    header = struct.pack(">8sHIIQQI", b"LEDGSNAP", 1, 0, 2**32 - 1, len(rows), len(rows), 0)
    data = header + body
    path.write_bytes(data + b"LEDGEND!" + hashlib.sha256(data).digest())


# -- request ids ------------------------------------------------------------------------------


def test_request_ids_move_to_the_main_table_and_still_protect(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "shard")
    ledger.core = AccountsCore(ledger.storage, *ledger.bounds, recent_requests_max=SMALL_RECENT_REQUESTS_MAX)
    ledger.create_account(now=1)
    first = {}
    count = SMALL_RECENT_REQUESTS_MAX * REQUESTS_MOVED_ROUNDS + 1
    for number in range(1, count + 1):
        answer = ledger.create(
            now=1 + number, number=number, amount=number, settled=True, request_id=f"r{number}"
        )
        first[number] = answer.transaction
    moved, recent = request_id_count(ledger)
    assert (moved, recent) == (SMALL_RECENT_REQUESTS_MAX * REQUESTS_MOVED_ROUNDS, 1)
    assert ledger.core.verify() == []
    # After a reopen the recent ids come back from the table, not from memory.
    ledger.storage.close()
    ledger.storage = Storage(ledger.directory, TABLE_NAMES)
    ledger.core = AccountsCore(ledger.storage, *ledger.bounds, recent_requests_max=SMALL_RECENT_REQUESTS_MAX)
    for number in (1, count):
        repeat = ledger.create(
            now=10_000 + number, number=9_000 + number, amount=number, settled=True, request_id=f"r{number}"
        )
        assert repeat.transaction == first[number]
        reused = ledger.create(
            now=20_000 + number, number=8_000 + number, amount=-1, settled=True, request_id=f"r{number}"
        )
        assert reused.outcome == core_pb2.OUTCOME_REQUEST_ID_REUSED
    assert len(ledger.listing(0, 1_000).transactions) == count
    assert ledger.balances() == (count * (count + 1) // 2,) * 2


def test_request_digests_that_collide_are_one_request_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The written-down rule, forced: the digest stands for the id, so two ids with one digest
    are one id (a repeat with the same payload, REQUEST_ID_REUSED with another)."""
    monkeypatch.setattr(
        accounts_core, "request_digest", lambda request_id: b"\x01" * records.REQUEST_DIGEST_BYTES
    )
    ledger = Ledger(tmp_path / "shard")
    ledger.create_account(now=1)
    first = ledger.create(now=2, number=1, amount=5, settled=True, request_id="alpha")
    same_payload = ledger.create(now=3, number=2, amount=5, settled=True, request_id="beta")
    assert same_payload.outcome == OK and same_payload.transaction == first.transaction
    other_payload = ledger.create(now=4, number=3, amount=6, settled=True, request_id="gamma")
    assert other_payload.outcome == core_pb2.OUTCOME_REQUEST_ID_REUSED
    assert len(ledger.listing(0, 10).transactions) == 1


def test_without_collisions_distinct_request_ids_stay_apart(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "shard")
    ledger.create_account(now=1, account_id=ACCOUNT)
    ledger.create(now=2, number=1, amount=5, settled=True, request_id="alpha")
    beta = ledger.create(now=3, number=2, amount=5, settled=True, request_id="beta")
    assert beta.transaction.id.endswith(f"{2:016x}")
    assert len(ledger.listing(0, 10).transactions) == 2


def test_a_snapshot_keeps_recent_request_ids_and_a_restore_elsewhere_moves_them(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "source")
    ledger.create_account(now=1)
    ledger.create(now=2, number=1, amount=5, settled=True, request_id="kept")
    snapshot = tmp_path / "shard.snapshot"
    ledger.core.write_snapshot(snapshot)
    same = Ledger(tmp_path / "replica")
    same.core.restore_snapshot(snapshot)
    same.log = list(ledger.log)
    assert same.core.state_digest() == ledger.core.state_digest(), "a replica install is byte-identical"
    moved = Ledger(tmp_path / "restored")
    moved.core.restore_snapshot(snapshot, applied_index=lambda _header: 0)
    assert request_id_count(moved) == (1, 0), "another log's indexes must not name recent rows"
    for target in (same, moved):
        repeat = target.create(now=50, number=7, amount=5, settled=True, request_id="kept")
        assert repeat.transaction.id.endswith(f"{1:016x}")
        assert target.core.verify() == []
