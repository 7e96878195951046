"""Preferred leaders on real node processes: leadership settles on each shard's preferred
replica after start, moves away when that node goes, and returns once it is back and caught up;
a node that stops gracefully hands its shards over first."""

from __future__ import annotations

import time
from pathlib import Path

from tests.cluster import (
    PREFERRED_LEADERS_SECONDS,
    preferred_leaders,
    running_cluster,
    wait_for_preferred_leaders,
)
from tests.test_cluster import accounts_by_shard, new_record, send_until_answered

SHARDS = 6
# The bound: leaders spread again within 60 s of a node's restart.
SETTLE_AFTER_RESTART_SECONDS = 60.0
# A graceful stop hands over at once: peers lead its shards well before an election timeout
# would even have started one (0.4-1.0 s of silence, then the vote).
HAND_OFF_SECONDS = 5.0


def test_leaders_return_to_their_preferred_nodes_after_a_restart(tmp_path: Path) -> None:
    with running_cluster(tmp_path, shards=SHARDS) as cluster:
        assert sorted(preferred_leaders(cluster).values()) == sorted(
            [node.node_id for node in cluster.config.nodes] * (SHARDS // len(cluster.config.nodes))
        )
        wait_for_preferred_leaders(cluster, PREFERRED_LEADERS_SECONDS)
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
        wait_for_preferred_leaders(cluster, PREFERRED_LEADERS_SECONDS)
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
