"""Backup, restore and verify (issue 4, items 4 and 5) with real processes on loopback.

A source cluster (3 nodes, 4 shards) gets accounts on every shard and a mix of settled, pending,
settled-later, cancelled and insufficient-funds transactions; `ledger-dev backup` saves it. The
backup is restored into fresh clusters with 2 and with 8 shards, which must answer every
account and every listing exactly as the source did, pass `ledger-dev verify`, and take new
writes. Damaged backups (one flipped byte, cut short) must be refused before anything is
written, and `verify` must notice a replica whose LMDB state was tampered with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.backup import MANIFEST_FILE_NAME, file_sha256
from ledger_cluster.core import TABLE_NAMES, AccountsCore, records, tables
from ledger_cluster.ids import parse_transaction_id
from ledger_cluster.internal.v1 import node_pb2
from ledger_cluster.node import SNAPSHOT_CHUNK_BYTES_MAX
from ledger_cluster.status import error_details
from ledger_cluster.storage import RESTORE_MARKER_FILE_NAME, Storage, WriteTransaction, read_snapshot_header
from tests.cluster import DEV_CLI_TIMEOUT_SECONDS, Cluster, new_cluster, running_cluster, started_cluster
from tests.processes import REPO_ROOT, run_dev_cli
from tests.test_cluster import (
    RPC_TIMEOUT_SECONDS,
    Stub,
    accounts_by_shard,
    create,
    get_account,
    list_all,
    shard_of,
)

SOURCE_SHARDS = 4
ACCOUNTS_PER_SOURCE_SHARD = 3
RESTORED_SHARD_COUNTS = (2, 8)
# A byte in the middle of a snapshot's records, past the header.
FLIPPED_BYTE_FRACTION = 0.5
CUT_SHORT_FRACTION = 0.75
SNAPSHOT_TIMEOUT_SECONDS = "30"
ACCOUNT_FLAGS_OFFSET = 1  # records.py: after the layout byte
UNKNOWN_ACCOUNT_FLAG = 0x80
VERIFY_SETTLE_SECONDS = "5"
# Enough bytes in one shard that its snapshot streams in more than one chunk.
BULK_TRANSACTIONS = 1_100
BULK_DESCRIPTION_BYTES = 1_000
BULK_WRITERS = 8

Expected = dict[str, tuple[ledger_pb2.Account, list[ledger_pb2.Transaction]]]


def run_dev(*arguments: str, cluster: Cluster | None = None) -> subprocess.CompletedProcess[str]:
    """`ledger-dev`, with the cluster token of `cluster` for the commands that call its nodes."""
    environment = cluster.environment() if cluster is not None else None
    return run_dev_cli(arguments, DEV_CLI_TIMEOUT_SECONDS, cwd=REPO_ROOT, environment=environment)


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def populate(stub: Stub, account_ids: list[str]) -> None:
    """Every kind of transaction on every account, some with request ids."""
    for index, account_id in enumerate(account_ids):
        create(stub, account_id, 1_000 + index, request_id=f"seed-{index}")
        pending_purchase = create(stub, account_id, -100, settled=False)
        pending_top_up = create(stub, account_id, 50, settled=False)
        create(stub, account_id, -30)
        create(stub, account_id, -1_000_000)  # INSUFFICIENT_FUNDS
        to_cancel = create(stub, account_id, -7, settled=False)
        stub.SettleTransaction(
            ledger_pb2.SettleTransactionRequest(transaction_id=pending_purchase.id),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        stub.CancelTransaction(
            ledger_pb2.CancelTransactionRequest(transaction_id=to_cancel.id), timeout=RPC_TIMEOUT_SECONDS
        )
        if index % 2:
            stub.SettleTransaction(
                ledger_pb2.SettleTransactionRequest(transaction_id=pending_top_up.id),
                timeout=RPC_TIMEOUT_SECONDS,
            )


def bulk_load(stub: Stub, account_id: str) -> None:
    """Many transactions with long descriptions on one account, written concurrently."""

    def write(index: int) -> None:
        request = ledger_pb2.CreateTransactionRequest(
            account_id=account_id,
            amount=1,
            settled=True,
            description=f"{index:06d}".ljust(BULK_DESCRIPTION_BYTES, "x"),
        )
        stub.CreateTransaction(request, timeout=RPC_TIMEOUT_SECONDS)

    with ThreadPoolExecutor(max_workers=BULK_WRITERS) as pool:
        list(pool.map(write, range(BULK_TRANSACTIONS)))


def snapshot_of(stub: Stub, account_ids: list[str]) -> Expected:
    return {
        account_id: (get_account(stub, account_id), list_all(stub, account_id)) for account_id in account_ids
    }


@dataclass(frozen=True)
class Source:
    cluster: Cluster
    expected: Expected
    backup_dir: Path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    """The source cluster, populated and backed up with `ledger-dev backup`."""
    base = tmp_path_factory.mktemp("backup-source")
    with running_cluster(base / "cluster", shards=SOURCE_SHARDS) as cluster:
        stub = cluster.ledger_stub()
        by_shard = accounts_by_shard(stub, cluster.config, ACCOUNTS_PER_SOURCE_SHARD)
        account_ids = [account_id for ids in by_shard.values() for account_id in ids]
        populate(stub, account_ids)
        bulk_load(stub, by_shard[cluster.config.shards[0].shard_id][0])
        expected = snapshot_of(stub, account_ids)
        cluster.wait_converged()
        backup_dir = base / "backup"
        result = run_dev(
            "backup",
            "--config",
            str(cluster.config_path),
            "--out",
            str(backup_dir),
            "--timeout-seconds",
            SNAPSHOT_TIMEOUT_SECONDS,
            cluster=cluster,
        )
        assert result.returncode == 0, describe(result)
        yield Source(cluster=cluster, expected=expected, backup_dir=backup_dir)


def restore(source: Source, config_path: Path, data_root: Path) -> subprocess.CompletedProcess[str]:
    return restore_backup(source.backup_dir, config_path, data_root)


def restore_backup(backup_dir: Path, config_path: Path, data_root: Path) -> subprocess.CompletedProcess[str]:
    return run_dev(
        "restore", "--backup", str(backup_dir), "--config", str(config_path), "--data-root", str(data_root)
    )


def damaged_copy(source: Source, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the source's backup, and in it the snapshot a test damages."""
    damaged = tmp_path / "damaged-backup"
    shutil.copytree(source.backup_dir, damaged)
    return damaged, damaged / f"{source.cluster.config.shards[1].shard_id}.snapshot"


def verify(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    return run_dev(
        "verify",
        "--config",
        str(cluster.config_path),
        "--settle-seconds",
        VERIFY_SETTLE_SECONDS,
        cluster=cluster,
    )


# -- backup -------------------------------------------------------------------------------------


def test_backup_manifest_describes_every_checked_shard(source: Source) -> None:
    manifest = json.loads((source.backup_dir / MANIFEST_FILE_NAME).read_text())
    config = source.cluster.config
    assert manifest["format_version"] == 1
    assert manifest["config"] == config.to_json_object()
    shards = manifest["shards"]
    assert [shard["shard_id"] for shard in shards] == [shard.shard_id for shard in config.shards]
    digests = source.cluster.wait_converged()
    for entry, shard in zip(shards, config.shards, strict=True):
        path = source.backup_dir / entry["file"]
        assert entry["file"] == f"{shard.shard_id}.snapshot"
        assert file_sha256(path) == entry["sha256"]
        assert path.stat().st_size == entry["size_bytes"]
        assert (entry["lower_bound"], entry["upper_bound"]) == (shard.lower_bound, shard.upper_bound)
        # Nothing was written after the backup: the snapshot is the state every replica has now.
        assert entry["applied_index"] == digests[shard.shard_id].applied_index
        assert entry["record_count"] > 0
    assert shards[0]["size_bytes"] > SNAPSHOT_CHUNK_BYTES_MAX, "the bulk shard must stream in several chunks"
    assert sorted(path.name for path in source.backup_dir.iterdir()) == sorted(
        [MANIFEST_FILE_NAME] + [entry["file"] for entry in shards]
    )


def test_snapshot_from_a_follower_names_the_leader(source: Source) -> None:
    shard = source.cluster.config.shards[0]
    leader = source.cluster.leader_of(shard.shard_id)
    follower = next(replica.node_id for replica in shard.replicas if replica.node_id != leader)
    chunks = source.cluster.node_stub(follower).Snapshot(
        node_pb2.SnapshotRequest(shard_id=shard.shard_id), timeout=RPC_TIMEOUT_SECONDS
    )
    with pytest.raises(grpc.RpcError) as raised:
        next(iter(chunks))
    details = error_details(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_LEADER")
    assert details.metadata["leader_node_id"] == leader


def test_backup_refuses_a_non_empty_directory(source: Source, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me\n")
    result = run_dev(
        "backup", "--config", str(source.cluster.config_path), "--out", str(occupied), cluster=source.cluster
    )
    assert result.returncode != 0, describe(result)
    assert "is not empty" in result.stderr, describe(result)
    assert sorted(path.name for path in occupied.iterdir()) == ["notes.txt"]


def test_verify_is_clean_on_the_source(source: Source) -> None:
    result = verify(source.cluster)
    assert result.returncode == 0, describe(result)
    assert f"all {SOURCE_SHARDS} shards verified" in result.stdout, describe(result)


# -- restore ------------------------------------------------------------------------------------


def assert_same_ledger(stub: Stub, expected: Expected) -> None:
    for account_id, (account, transactions) in expected.items():
        assert get_account(stub, account_id) == account, f"account {account_id} differs after restore"
        assert list_all(stub, account_id) == transactions, f"transactions of {account_id} differ"


@pytest.mark.parametrize("shard_count", RESTORED_SHARD_COUNTS)
def test_restore_into_another_shard_count(source: Source, tmp_path: Path, shard_count: int) -> None:
    target = new_cluster(tmp_path / "restored", shards=shard_count)
    data_root = target.base_dir / "data"
    result = restore(source, target.config_path, data_root)
    assert result.returncode == 0, describe(result)
    assert f"restored {shard_count} shards" in result.stdout, describe(result)

    with started_cluster(target) as cluster:
        stub = cluster.ledger_stub()
        assert_same_ledger(stub, source.expected)
        cluster.wait_converged()
        result = verify(cluster)
        assert result.returncode == 0, describe(result)
        assert f"all {shard_count} shards verified" in result.stdout, describe(result)

        # New writes: on restored accounts (continuing their transaction numbers) and new ones.
        for account_id, (account, transactions) in source.expected.items():
            added = create(stub, account_id, 5)
            assert added.id not in {transaction.id for transaction in transactions}
            assert get_account(stub, account_id).settled_balance == account.settled_balance + 5
            assert list_all(stub, account_id) == [*transactions, added]
        fresh = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account
        create(stub, fresh.id, 77)
        assert get_account(stub, fresh.id).available_balance == 77
        cluster.wait_converged()


def test_restore_refuses_existing_shard_data(source: Source, tmp_path: Path) -> None:
    target = new_cluster(tmp_path / "restored", shards=2)
    data_root = target.base_dir / "data"
    first = restore(source, target.config_path, data_root)
    assert first.returncode == 0, describe(first)
    before = sorted(str(path) for path in data_root.rglob("*"))
    second = restore(source, target.config_path, data_root)
    assert second.returncode != 0, describe(second)
    assert "refusing to overwrite existing shard data" in second.stderr, describe(second)
    assert sorted(str(path) for path in data_root.rglob("*")) == before


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * FLIPPED_BYTE_FRACTION)] ^= 0x01
    path.write_bytes(bytes(data))


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * CUT_SHORT_FRACTION)])


def rehash_in_manifest(backup_dir: Path, file_name: str) -> None:
    """Make the manifest agree with a damaged file, so only the snapshot's own checksum is left
    to notice."""
    manifest_path = backup_dir / MANIFEST_FILE_NAME
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        if entry["file"] == file_name:
            entry["sha256"] = file_sha256(backup_dir / file_name)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flipped-byte", "is damaged: sha256"),
        ("cut-short", "cut short"),
        ("flipped-byte-rehashed", "snapshot checksum mismatch"),
    ],
)
def test_restore_rejects_a_damaged_backup(source: Source, tmp_path: Path, damage: str, message: str) -> None:
    damaged, victim = damaged_copy(source, tmp_path)
    if damage == "cut-short":
        cut_short(victim)
    else:
        flip_one_byte(victim)
        if damage == "flipped-byte-rehashed":
            rehash_in_manifest(damaged, victim.name)
    target = new_cluster(tmp_path / "restored", shards=2)
    data_root = target.base_dir / "data"
    result = restore_backup(damaged, target.config_path, data_root)
    assert result.returncode != 0, describe(result)
    assert message in result.stderr and victim.name in result.stderr, describe(result)
    assert not data_root.exists(), f"restore wrote {sorted(data_root.rglob('*'))}"


def rewrite_with_unknown_account_flag(snapshot: Path, scratch: Path) -> None:
    """The same snapshot (header, record count, size) with one account row carrying a flag bit
    no release sets: a valid stream whose checksum holds, so only restore's checks remain."""
    header = read_snapshot_header(snapshot)
    storage = Storage(scratch, TABLE_NAMES)
    try:
        core = AccountsCore(storage, header.shard_lower_bound, header.shard_upper_bound)
        core.restore_snapshot(snapshot)

        def damage(transaction: WriteTransaction) -> None:
            (key, value), *_ = transaction.iterate(tables.ACCOUNTS)
            data = bytearray(value)
            data[ACCOUNT_FLAGS_OFFSET] |= UNKNOWN_ACCOUNT_FLAG
            transaction.put(tables.ACCOUNTS, key, bytes(data))

        storage.write(damage)
        core.write_snapshot(snapshot, metadata=header.metadata)
    finally:
        storage.close()


def test_restore_refuses_a_backup_whose_state_no_command_makes(source: Source, tmp_path: Path) -> None:
    """A shard snapshot that passes every checksum (the manifest's and its own) but holds a row
    no command writes: restore names the row's problem and leaves no replica behind."""
    damaged, victim = damaged_copy(source, tmp_path)
    size_before = victim.stat().st_size
    rewrite_with_unknown_account_flag(victim, tmp_path / "scratch")
    assert victim.stat().st_size == size_before
    rehash_in_manifest(damaged, victim.name)
    target = new_cluster(tmp_path / "restored", shards=2)
    data_root = target.base_dir / "data"

    result = restore_backup(damaged, target.config_path, data_root)

    assert result.returncode != 0, describe(result)
    assert "passes its checksum but is inconsistent" in result.stderr, describe(result)
    assert "flags 0x80 are unknown" in result.stderr, describe(result)
    assert sorted(data_root.rglob("*.mdb")) == [], "restore left a replica behind"
    assert sorted(data_root.rglob(RESTORE_MARKER_FILE_NAME)) == []


# -- verify finds tampering ----------------------------------------------------------------------


def tamper(data_dir: Path, shard_id: str, change: str, transaction_id: str) -> None:
    """Change one replica's LMDB state behind the log's back (its node is stopped): `balance`
    breaks the balance of the transaction's account, `description` only makes this replica
    differ from the others."""
    storage = Storage(data_dir / "replicas" / shard_id, TABLE_NAMES)
    parsed = parse_transaction_id(transaction_id)

    def write(transaction: WriteTransaction) -> None:
        if change == "balance":
            key = tables.account_key(parsed.account_id)
            data = transaction.get(tables.ACCOUNTS, key)
            assert data is not None, f"no account row for {transaction_id} in {shard_id} on {data_dir}"
            account = records.decode_account(data)
            account.credits_settled += 1
            transaction.put(tables.ACCOUNTS, key, account.encode())
        else:
            key = tables.transaction_key(parsed.account_id, parsed.transaction_number)
            data = transaction.get(tables.TRANSACTIONS, key)
            assert data is not None, f"no row for {transaction_id} in {shard_id} on {data_dir}"
            record = records.decode_transaction(data)
            record.description = "tampered"
            transaction.put(tables.TRANSACTIONS, key, record.encode())

    try:
        storage.write(write)
    finally:
        storage.close()


def test_verify_fails_on_a_tampered_replica(source: Source, tmp_path: Path) -> None:
    target = new_cluster(tmp_path / "restored", shards=2)
    result = restore(source, target.config_path, target.base_dir / "data")
    assert result.returncode == 0, describe(result)
    by_shard: dict[str, str] = {}
    for account_id, (_, transactions) in source.expected.items():
        by_shard.setdefault(shard_of(target.config, account_id), transactions[0].id)
    balance_shard, description_shard = (shard.shard_id for shard in target.config.shards)
    victim = target.config.shards[0].replicas[-1].node_id
    with started_cluster(target) as cluster:
        cluster.wait_converged()
        assert cluster.stop_node(victim) == 0
        data_dir = cluster.nodes[victim].data_dir
        tamper(data_dir, balance_shard, "balance", by_shard[balance_shard])
        tamper(data_dir, description_shard, "description", by_shard[description_shard])
        cluster.restart_node(victim)
        cluster.wait_healthy()
        result = verify(cluster)
    assert result.returncode == 1, describe(result)
    lines = result.stdout.splitlines()
    assert any(line.startswith(balance_shard) and "FAILED" in line for line in lines), describe(result)
    assert any(line.startswith(description_shard) and "FAILED" in line for line in lines), describe(result)
    assert f"{victim}: 1 problems" in result.stdout, describe(result)
    assert "replicas differ at applied index" in result.stdout, describe(result)
