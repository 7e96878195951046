"""A replica's Raft journal, dump and LMDB state across crashes: what a restart may keep, what it
must refuse, and how a refused replica is rebuilt. Real node processes on loopback."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from ledger_cluster.process import EXIT_CODE_REPLICA_BROKEN
from ledger_cluster.storage import RESTORE_MARKER_FILE_NAME
from tests.cluster import SMALL_LOG_COMPACTION_MIN_ENTRIES, Cluster, new_cluster, running_cluster
from tests.test_cluster import (
    Writer,
    WriteRecord,
    accounts_by_shard,
    check_ledger,
    new_record,
    send_until_answered,
)

# Compact whenever the log holds more than two entries: every tick, the most crash windows.
EVERY_TICK_COMPACTION_ENTRIES = 2
CRASH_ROUNDS = 5
WRITES_BETWEEN_CRASHES = 15
CRASH_JITTER_SECONDS = 0.2
WRITER_ACK_TIMEOUT_SECONDS = 30.0
BROKEN_EXIT_TIMEOUT_SECONDS = 30.0
WRITES_TO_COMPACT = SMALL_LOG_COMPACTION_MIN_ENTRIES + 60


def follower_of(cluster: Cluster, shard_id: str) -> str:
    leader = cluster.leader_of(shard_id)
    shard = next(shard for shard in cluster.config.shards if shard.shard_id == shard_id)
    return next(replica.node_id for replica in shard.replicas if replica.node_id != leader)


def shard_dir(cluster: Cluster, node_id: str, kind: str, shard_id: str) -> Path:
    return cluster.nodes[node_id].data_dir / kind / shard_id


def write_to_shard(cluster: Cluster, shard_id: str, count: int) -> tuple[list[str], list[WriteRecord]]:
    """`count` acknowledged top-ups on a new account of the shard, checked through the gateway."""
    stub = cluster.ledger_stub()
    accounts = accounts_by_shard(stub, cluster.config, per_shard=1)[shard_id]
    records = [new_record(accounts[0], 1 + index) for index in range(count)]
    for record in records:
        assert send_until_answered(stub, record), record.errors
    check_ledger(stub, accounts, records)
    return accounts, records


def test_follower_killed_around_compactions_keeps_its_journal(tmp_path: Path) -> None:
    """kill -9 lands between writing a dump and truncating the journal in some rounds; the
    restarted replica must keep every entry it had acknowledged and converge."""
    with running_cluster(tmp_path, log_compaction_min_entries=EVERY_TICK_COMPACTION_ENTRIES) as cluster:
        stub = cluster.ledger_stub()
        shard_id = cluster.config.shards[0].shard_id
        accounts = accounts_by_shard(stub, cluster.config, per_shard=2)[shard_id]
        writer = Writer(stub, accounts, seed=11)
        writer.start()
        chooser = random.Random(5)
        try:
            for _ in range(CRASH_ROUNDS):
                writer.wait_for(
                    WRITES_BETWEEN_CRASHES, "between crashes", WRITER_ACK_TIMEOUT_SECONDS, time.monotonic()
                )
                follower = follower_of(cluster, shard_id)
                time.sleep(chooser.uniform(0, CRASH_JITTER_SECONDS))  # an arbitrary moment
                cluster.kill_node(follower)
                cluster.restart_node(follower)  # fails if the node refuses its own journal
        finally:
            writer.stop()
        cluster.wait_converged()
        check_ledger(stub, accounts, writer.records())
        for node in cluster.nodes.values():
            assert "must be rebuilt" not in node.log_path.read_text(errors="replace")


def test_replica_with_a_corrupt_dump_stops_instead_of_serving(tmp_path: Path) -> None:
    with running_cluster(tmp_path, log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES) as cluster:
        shard_id = cluster.config.shards[0].shard_id
        write_to_shard(cluster, shard_id, WRITES_TO_COMPACT)
        follower = follower_of(cluster, shard_id)
        dump = shard_dir(cluster, follower, "raft", shard_id) / "dump"
        assert cluster.stop_node(follower) == 0
        assert dump.is_file(), f"{follower} never compacted {shard_id}"
        damaged = bytearray(dump.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01
        dump.write_bytes(bytes(damaged))

        process = cluster.start_node(follower)
        exit_code = process.wait_exit(BROKEN_EXIT_TIMEOUT_SECONDS)
        assert exit_code == EXIT_CODE_REPLICA_BROKEN, cluster.logs()
        # Where the flipped byte lands decides which check catches it first: the checksum, or a
        # record length that now runs past the end of the file.
        assert "SnapshotCorruptError" in cluster.nodes[follower].log_path.read_text(errors="replace")
        # The other two replicas carry on.
        write_to_shard(cluster, shard_id, 5)


def test_replica_whose_journal_lost_its_tail_refuses_to_start_and_is_rebuilt(tmp_path: Path) -> None:
    with running_cluster(tmp_path, log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES) as cluster:
        shard_id = cluster.config.shards[1].shard_id
        accounts, records = write_to_shard(cluster, shard_id, 20)
        follower = follower_of(cluster, shard_id)
        assert cluster.stop_node(follower) == 0
        raft_dir = shard_dir(cluster, follower, "raft", shard_id)
        for path in raft_dir.iterdir():
            path.unlink()  # the journal is gone; the LMDB state is still at its applied index

        process = cluster.start_node(follower)
        assert process.wait_exit(BROKEN_EXIT_TIMEOUT_SECONDS) == 1, cluster.logs()
        assert "must be rebuilt" in cluster.nodes[follower].log_path.read_text(errors="replace")

        # Do what the message says: drop this shard's replica and let the others rebuild it.
        shutil.rmtree(raft_dir)
        shutil.rmtree(shard_dir(cluster, follower, "replicas", shard_id))
        cluster.restart_node(follower)
        converged = cluster.wait_converged()
        assert cluster.digest(follower, shard_id) == converged[shard_id]
        assert converged[shard_id].applied_index > 0
        check_ledger(cluster.ledger_stub(), accounts, records)


JOURNAL_BOUND_ENTRIES = 3 * SMALL_LOG_COMPACTION_MIN_ENTRIES
LOAD_WRITES = 4 * SMALL_LOG_COMPACTION_MIN_ENTRIES


def log_entries(cluster: Cluster) -> dict[tuple[str, str], int]:
    """(node, shard) -> entries in that replica's Raft journal, from NodeService.Status."""
    entries = {}
    for node_id, status in cluster.statuses().items():
        assert not isinstance(status, str), f"{node_id}: {status}"
        for replica in status.replicas:
            entries[(node_id, replica.shard_id)] = replica.log_entries
    return entries


def test_compaction_keeps_journals_bounded_and_a_restart_from_dump_and_journal_is_exact(
    tmp_path: Path,
) -> None:
    with running_cluster(tmp_path, log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES) as cluster:
        stub = cluster.ledger_stub()
        shard_id = cluster.config.shards[2].shard_id
        accounts = accounts_by_shard(stub, cluster.config, per_shard=2)[shard_id]
        writer = Writer(stub, accounts, seed=21)
        writer.start()
        largest_journal = 0
        try:
            while len(writer.acked()) < LOAD_WRITES:
                writer.check()
                largest_journal = max(largest_journal, *log_entries(cluster).values())
                time.sleep(0.05)
        finally:
            writer.stop()
        assert largest_journal <= JOURNAL_BOUND_ENTRIES, largest_journal
        before = cluster.wait_converged()
        assert before[shard_id].applied_index > LOAD_WRITES
        # Every node restarts from its dump plus its journal's tail.
        for node_id in cluster.nodes:
            assert cluster.stop_node(node_id) == 0
        for node_id in cluster.nodes:
            cluster.start_node(node_id)
        for node_id in cluster.nodes:
            cluster.wait_node_serving(node_id)
        cluster.wait_healthy()
        after = cluster.wait_converged()
        for shard in cluster.config.shards:
            # A new leader's no-op entry may move the index; the state itself must not change.
            assert after[shard.shard_id].digest == before[shard.shard_id].digest
        check_ledger(stub, accounts, writer.records())


def test_kill_9_of_every_node_mid_load_loses_and_repeats_nothing(tmp_path: Path) -> None:
    with running_cluster(tmp_path, log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES) as cluster:
        stub = cluster.ledger_stub()
        by_shard = accounts_by_shard(stub, cluster.config, per_shard=1)
        accounts = [account for shard_accounts in by_shard.values() for account in shard_accounts]
        writer = Writer(stub, accounts, seed=31)
        writer.start()
        try:
            writer.wait_for(WRITES_BETWEEN_CRASHES * 4, "before the crash", WRITER_ACK_TIMEOUT_SECONDS)
            for node_id in cluster.nodes:
                cluster.kill_node(node_id)
            for node_id in cluster.nodes:
                cluster.start_node(node_id)
            for node_id in cluster.nodes:
                cluster.wait_node_serving(node_id)
            writer.wait_for(
                WRITES_BETWEEN_CRASHES, "after the restart", WRITER_ACK_TIMEOUT_SECONDS, time.monotonic()
            )
        finally:
            writer.stop()
        cluster.wait_converged()
        check_ledger(stub, accounts, writer.records())


def test_node_with_a_wiped_data_directory_is_rebuilt(tmp_path: Path) -> None:
    with running_cluster(tmp_path, log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES) as cluster:
        shard_id = cluster.config.shards[0].shard_id
        accounts, records = write_to_shard(cluster, shard_id, WRITES_TO_COMPACT)
        wiped = follower_of(cluster, shard_id)
        assert cluster.stop_node(wiped) == 0
        shutil.rmtree(cluster.nodes[wiped].data_dir)
        cluster.restart_node(wiped)
        converged = cluster.wait_converged()
        for shard in cluster.config.shards:
            assert cluster.digest(wiped, shard.shard_id) == converged[shard.shard_id]
        assert converged[shard_id].applied_index >= WRITES_TO_COMPACT
        check_ledger(cluster.ledger_stub(), accounts, records)


def test_node_refuses_a_data_directory_left_by_an_unfinished_restore(tmp_path: Path) -> None:
    cluster = new_cluster(tmp_path)
    node = cluster.nodes["node01"]
    node.data_dir.mkdir(parents=True)
    (node.data_dir / RESTORE_MARKER_FILE_NAME).write_text("interrupted\n")
    try:
        process = cluster.start_node("node01")
        assert process.wait_exit(BROKEN_EXIT_TIMEOUT_SECONDS) == 1, cluster.logs()
        assert "unfinished `ledger-dev restore`" in node.log_path.read_text(errors="replace")
    finally:
        cluster.stop_all()
        cluster.close_channels()


def test_a_failing_dump_does_not_wedge_compaction(tmp_path: Path) -> None:
    """A dump that cannot start (here its temp name is a directory) is reported as failed; once
    the cause is gone, compaction and snapshots work again."""
    with running_cluster(tmp_path, log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES) as cluster:
        shard_id = cluster.config.shards[3].shard_id
        blocked = follower_of(cluster, shard_id)
        raft_dir = shard_dir(cluster, blocked, "raft", shard_id)
        (raft_dir / "dump.tmp").mkdir()
        write_to_shard(cluster, shard_id, WRITES_TO_COMPACT)
        assert not (raft_dir / "dump").exists()
        (raft_dir / "dump.tmp").rmdir()
        accounts, records = write_to_shard(cluster, shard_id, WRITES_TO_COMPACT)
        deadline = time.monotonic() + BROKEN_EXIT_TIMEOUT_SECONDS
        while not (raft_dir / "dump").is_file():
            assert time.monotonic() < deadline, f"{blocked} never compacted again:\n{cluster.logs()}"
            time.sleep(0.05)
        assert log_entries(cluster)[(blocked, shard_id)] <= JOURNAL_BOUND_ENTRIES
        cluster.wait_converged()
        check_ledger(cluster.ledger_stub(), accounts, records)
