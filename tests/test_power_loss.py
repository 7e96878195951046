"""Power loss of every node at once, simulated with real node processes: each node keeps a copy
of what its last fsync made durable of every Raft journal and meta
(`SYNCED_COPIES_ENVIRONMENT_VARIABLE`); the test kills every node with SIGKILL while clients
write through the gateway, puts those copies in place of the files (a file never synced is
deleted), restarts the nodes, and checks that no acknowledged write is missing or doubled and
that no two replicas of a shard ever led in the same term.

LMDB runs with `sync` but not `metasync` in this mode: a power loss may undo its last commit
(the newest of its two meta pages not yet written back), never more and never its integrity.
The test undoes the last commit of every replica's LMDB, the worst case, by writing the older
meta page over the newer one; the journal must replay what it loses. Compaction dumps and
installed snapshots are fsynced before anything depends on them (replica_dump.py) and are left
as they are.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import shutil
import signal
import struct
import time
from collections import defaultdict
from pathlib import Path

import pytest
from pysyncobj import journal as pysyncobj_journal

from ledger_cluster.replica_journal import (
    META_SUFFIX,
    SYNCED_COPIES_ENVIRONMENT_VARIABLE,
    SYNCED_COPY_SUFFIX,
)
from tests.cluster import Cluster, running_cluster
from tests.test_cluster import Writer, accounts_by_shard, check_ledger

POWER_LOSSES = 3
# Acknowledged writes per client between two power losses.
WRITES_BETWEEN_POWER_LOSSES = 15
WRITER_ACK_TIMEOUT_SECONDS = 60.0
# The power goes at an arbitrary moment of the writes, not right after an acknowledgement.
POWER_LOSS_JITTER_SECONDS = 0.3
# Compacting often puts journal trims and dumps among the writes the power loss lands on.
LOG_COMPACTION_MIN_ENTRIES = 25
JOURNAL_FILE_NAMES = ("journal", "journal" + META_SUFFIX)
RECORD_SIZE = struct.Struct("<I")
# LMDB's data file starts with two meta pages of the OS page size; the newer one (the larger
# transaction id: after a 16-byte page header, magic, version, address and map size, two
# database records of 48 bytes and the last page number) is the one in use.
LMDB_DATA_FILE = "data.mdb"
LMDB_META_PAGES = 2
LMDB_PAGE_NUMBER_BYTES = 8
LMDB_TRANSACTION_ID = struct.Struct("<Q")
LMDB_TRANSACTION_ID_OFFSET = 16 + 4 + 4 + 8 + 8 + 2 * 48 + 8
LEADS_IN_TERM = re.compile(r"shard (\S+): (\S+) leads in term (\d+)")


def kill_every_node(cluster: Cluster) -> None:
    """SIGKILL to every node before reaping any: none goes on alone for a moment."""
    for node in cluster.nodes.values():
        assert node.process is not None and node.is_running(), f"{node.node_id} is not running"
        node.down_on_purpose = True
        os.kill(node.process.pid, signal.SIGKILL)
    for node_id in cluster.nodes:
        assert cluster.kill_node(node_id) == -signal.SIGKILL


def drop_unsynced_writes(cluster: Cluster) -> int:
    """Every journal and meta back to what was last fsynced, every LMDB state without its last
    commit; returns the journal entries dropped."""
    dropped_entries = 0
    for node in cluster.nodes.values():
        for raft_dir in sorted((node.data_dir / "raft").iterdir()):
            entries_before = entries_in(raft_dir / "journal")
            for name in JOURNAL_FILE_NAMES:
                path = raft_dir / name
                synced = raft_dir / (name + SYNCED_COPY_SUFFIX)
                if synced.is_file():
                    shutil.copyfile(synced, path)
                else:
                    path.unlink(missing_ok=True)
            dropped_entries += entries_before - entries_in(raft_dir / "journal")
        for replica_dir in sorted((node.data_dir / "replicas").iterdir()):
            undo_last_lmdb_commit(replica_dir / LMDB_DATA_FILE)
    return dropped_entries


def undo_last_lmdb_commit(data_file: Path) -> None:
    """The newer meta page replaced by the older one (its own page number kept): the state of
    the commit before the last, as if the last meta write never reached the disk."""
    data = bytearray(data_file.read_bytes())
    page = mmap.PAGESIZE
    transaction_ids = [
        LMDB_TRANSACTION_ID.unpack_from(data, index * page + LMDB_TRANSACTION_ID_OFFSET)[0]
        for index in range(LMDB_META_PAGES)
    ]
    newer = transaction_ids.index(max(transaction_ids))
    older = 1 - newer
    data[newer * page + LMDB_PAGE_NUMBER_BYTES : (newer + 1) * page] = data[
        older * page + LMDB_PAGE_NUMBER_BYTES : (older + 1) * page
    ]
    data_file.write_bytes(bytes(data))


def entries_in(journal_path: Path) -> int:
    """Records up to the journal's end-of-records mark, in PySyncObj's file format."""
    if not journal_path.is_file():
        return 0
    data = journal_path.read_bytes()
    (end,) = RECORD_SIZE.unpack_from(data, pysyncobj_journal.LAST_RECORD_OFFSET_OFFSET)
    offset, count = pysyncobj_journal.FIRST_RECORD_OFFSET, 0
    while offset < end:
        (size,) = RECORD_SIZE.unpack_from(data, offset)
        offset += 2 * RECORD_SIZE.size + size
        count += 1
    return count


def leaders_by_term(cluster: Cluster) -> dict[tuple[str, int], set[str]]:
    """(shard, term) -> the nodes that took leadership in it, from every node's whole log."""
    leaders: dict[tuple[str, int], set[str]] = defaultdict(set)
    for node in cluster.nodes.values():
        for shard_id, node_id, term in LEADS_IN_TERM.findall(node.log_path.read_text(errors="replace")):
            leaders[(shard_id, int(term))].add(node_id)
    return leaders


def test_acknowledged_writes_survive_power_loss_of_every_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SYNCED_COPIES_ENVIRONMENT_VARIABLE, "1")
    with running_cluster(tmp_path, log_compaction_min_entries=LOG_COMPACTION_MIN_ENTRIES) as cluster:
        stub = cluster.ledger_stub()
        accounts = accounts_by_shard(stub, cluster.config, per_shard=2)
        # One client per shard, so the power goes while every shard's leader is writing.
        writers = [Writer(stub, ids, seed=index) for index, ids in enumerate(accounts.values())]
        for writer in writers:
            writer.start()
        chooser = random.Random(7)
        acknowledged_just_before: list[int] = []
        dropped: list[int] = []
        try:
            for _ in range(POWER_LOSSES):
                since = time.monotonic()
                for writer in writers:
                    writer.wait_for(
                        WRITES_BETWEEN_POWER_LOSSES, "before a power loss", WRITER_ACK_TIMEOUT_SECONDS, since
                    )
                time.sleep(chooser.uniform(0, POWER_LOSS_JITTER_SECONDS))
                power_lost = time.monotonic()
                kill_every_node(cluster)
                acknowledged_just_before.append(
                    sum(
                        1
                        for writer in writers
                        for record in writer.acked()
                        if record.acked_at is not None and power_lost - record.acked_at < 1.0
                    )
                )
                dropped.append(drop_unsynced_writes(cluster))
                for node_id in cluster.nodes:
                    cluster.start_node(node_id)
                cluster.wait_healthy()
        finally:
            for writer in writers:
                writer.stop()
        records = [record for writer in writers for record in writer.records()]
        print(
            f"{len(records)} writes, {sum(1 for r in records if r.transaction is not None)} acknowledged; "
            f"acknowledged in the last second before each power loss: {acknowledged_just_before}; "
            f"journal entries the power loss dropped: {dropped}"
        )
        cluster.wait_converged()
        check_ledger(stub, [account for ids in accounts.values() for account in ids], records)
        leaders = leaders_by_term(cluster)
        assert leaders, "no leadership was logged"
        shared = {key: nodes for key, nodes in leaders.items() if len(nodes) > 1}
        assert not shared, f"two leaders in one term: {shared}"
