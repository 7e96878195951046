"""Preferred leaders on real node processes: leadership settles on each shard's preferred
replica after start, moves away when that node goes, and returns once it is back and caught up;
a node that stops gracefully hands its shards over first."""

from __future__ import annotations

import time
from pathlib import Path

from tests.cluster import Cluster, running_cluster
from tests.test_cluster import accounts_by_shard, new_record, send_until_answered

SHARDS = 6
# The bounds: leaders spread within 30 s of a start and within 60 s of a node's restart.
SETTLE_AFTER_START_SECONDS = 30.0
SETTLE_AFTER_RESTART_SECONDS = 60.0
# A graceful stop hands over at once: peers lead its shards well before an election timeout
# would even have started one (0.4-1.0 s of silence, then the vote).
HAND_OFF_SECONDS = 5.0
POLL_SECONDS = 0.1


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


def test_leaders_return_to_their_preferred_nodes_after_a_restart(tmp_path: Path) -> None:
    with running_cluster(tmp_path, shards=SHARDS) as cluster:
        assert sorted(preferred_leaders(cluster).values()) == sorted(
            [node.node_id for node in cluster.config.nodes] * (SHARDS // len(cluster.config.nodes))
        )
        wait_for_preferred_leaders(cluster, SETTLE_AFTER_START_SECONDS)
        stopped = cluster.config.nodes[0].node_id
        cluster.kill_node(stopped)
        leaders = cluster.wait_leaders()
        assert stopped not in leaders.values()
        # Writes go on while it is away, so it has to catch up before it may lead again.
        stub = cluster.ledger_stub()
        for shard_id, accounts in accounts_by_shard(stub, cluster.config, per_shard=1).items():
            assert send_until_answered(stub, new_record(accounts[0], 1)), shard_id
        cluster.restart_node(stopped)
        wait_for_preferred_leaders(cluster, SETTLE_AFTER_RESTART_SECONDS)


def test_a_graceful_stop_hands_its_leaderships_to_peers(tmp_path: Path) -> None:
    with running_cluster(tmp_path, shards=SHARDS) as cluster:
        wait_for_preferred_leaders(cluster, SETTLE_AFTER_START_SECONDS)
        leaving = cluster.config.nodes[1].node_id
        led_before = [shard for shard, leader in cluster.leadership().leaders.items() if leader == leaving]
        assert led_before
        cluster.stop_node(leaving)  # SIGTERM: the node hands off, then exits
        log = cluster.nodes[leaving].log_path.read_text(encoding="utf-8")
        handed_off = [shard for shard in led_before if f"shard {shard}: leadership handed off to" in log]
        assert handed_off == led_before, log[-4000:]
        started = time.monotonic()
        leaders = cluster.wait_leaders(HAND_OFF_SECONDS)
        assert leaving not in leaders.values()
        assert time.monotonic() - started < HAND_OFF_SECONDS
