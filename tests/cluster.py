"""Test clusters: `ledger_cluster.localcluster.cluster` with a throwaway Raft password and
ports that never collide with the checked-in config's (a developer's `honcho start` may be
running)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ledger_cluster import config as cluster_config
from ledger_cluster.localcluster import cluster as local_cluster
from ledger_cluster.localcluster.cluster import (
    CLUSTER_READY_TIMEOUT_SECONDS,
    CONVERGE_TIMEOUT_SECONDS,
    DEV_CLI_TIMEOUT_SECONDS,
    NODE_RPC_TIMEOUT_SECONDS,
    Cluster,
    ClusterNode,
    config_ports,
    started_cluster,
)
from tests.processes import REPO_CONFIG_PATH

__all__ = [
    "CLUSTER_READY_TIMEOUT_SECONDS",
    "CONVERGE_TIMEOUT_SECONDS",
    "DEV_CLI_TIMEOUT_SECONDS",
    "NODE_RPC_TIMEOUT_SECONDS",
    "POLL_SECONDS",
    "PREFERRED_LEADERS_SECONDS",
    "SMALL_LOG_COMPACTION_MIN_ENTRIES",
    "TEST_RAFT_PASSWORD",
    "Cluster",
    "ClusterNode",
    "new_cluster",
    "preferred_leaders",
    "running_cluster",
    "started_cluster",
    "wait_for_preferred_leaders",
]

# A throwaway shared secret for the Raft transport of test clusters.
TEST_RAFT_PASSWORD = "ledger-cluster-tests-raft-password"
# Snapshot and truncate a shard's journal this often, so tests exercise log compaction and
# the snapshot transfer to a lagging follower.
SMALL_LOG_COMPACTION_MIN_ENTRIES = 200
POLL_SECONDS = 0.1
# The bound: leaders spread over their preferred nodes within 30 s of a start.
PREFERRED_LEADERS_SECONDS = 30.0


def new_cluster(
    base_dir: Path,
    nodes: int = 3,
    shards: int = 4,
    replicas: int = 3,
    log_compaction_min_entries: int | None = None,
) -> Cluster:
    """A test cluster's config and directories; nothing is started yet."""
    return local_cluster.new_cluster(
        base_dir,
        TEST_RAFT_PASSWORD,
        nodes=nodes,
        shards=shards,
        replicas=replicas,
        log_compaction_min_entries=log_compaction_min_entries,
        avoided_ports=frozenset(config_ports(cluster_config.load(REPO_CONFIG_PATH))),
    )


@contextmanager
def running_cluster(
    base_dir: Path,
    nodes: int = 3,
    shards: int = 4,
    replicas: int = 3,
    log_compaction_min_entries: int | None = None,
) -> Iterator[Cluster]:
    """A healthy cluster for the duration of the block; every process is stopped by PID when the
    block ends, however it ends (including a failed start)."""
    cluster = new_cluster(base_dir, nodes, shards, replicas, log_compaction_min_entries)
    with started_cluster(cluster) as started:
        yield started


def preferred_leaders(cluster: Cluster) -> dict[str, str]:
    return {shard.shard_id: shard.preferred_leader for shard in cluster.config.shards}


def wait_for_preferred_leaders(cluster: Cluster, timeout_seconds: float) -> float:
    """Poll until every shard is led by its preferred replica; the seconds it took."""
    wanted = preferred_leaders(cluster)
    started = time.monotonic()
    leaders: dict[str, str] = {}
    while time.monotonic() - started < timeout_seconds:
        cluster.check_processes()
        leadership = cluster.leadership()
        leaders = leadership.leaders
        if leadership.settled and leaders == wanted:
            return time.monotonic() - started
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"leaders {leaders} are not the preferred {wanted} after {timeout_seconds} s")
