"""`ledger-dev status` rendered from node statuses given here, without starting nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ledger_cluster import config as cluster_config
from ledger_cluster.cli import dev
from ledger_cluster.client import NodeStatus
from ledger_cluster.config import ClusterConfig
from ledger_cluster.internal.v1 import node_pb2

TERM = 7


def _replica(shard_id: str, node_id: str, leader: str, *, has_quorum: bool = True) -> node_pb2.ReplicaStatus:
    return node_pb2.ReplicaStatus(
        shard_id=shard_id,
        node_id=node_id,
        is_leader=node_id == leader,
        leader_node_id=leader,
        term=TERM,
        commit_index=40,
        last_applied=40,
        has_quorum=has_quorum,
    )


def _statuses(config: ClusterConfig, leaders: dict[str, str], quorumless: str) -> list[NodeStatus]:
    """Every node up and holding a replica of every shard, led as `leaders` says; the leader of
    shard `quorumless` has lost its majority."""
    return [
        NodeStatus(
            node_id=node.node_id,
            address=node.grpc_address,
            replicas=tuple(
                _replica(
                    shard.shard_id,
                    node.node_id,
                    leaders[shard.shard_id],
                    has_quorum=shard.shard_id != quorumless,
                )
                for shard in config.shards
            ),
            error="",
        )
        for node in config.nodes
    ]


def test_status_shows_the_preferred_leader_and_marks_shards_led_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = cluster_config.generate(3, 4, 3)
    assert [shard.preferred_leader for shard in config.shards] == ["node01", "node02", "node03", "node01"]
    config_path = tmp_path / "cluster.json"
    cluster_config.write_atomic(config, config_path)
    leaders = {"shard-00": "node01", "shard-01": "node03", "shard-02": "node03", "shard-03": "node02"}
    statuses = _statuses(config, leaders, quorumless="shard-02")
    monkeypatch.setattr(dev, "node_statuses_now", lambda _config, _credentials, _timeout: statuses)

    result = CliRunner().invoke(dev.main, ["status", "--config", str(config_path)])

    assert result.exit_code == 1, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["shard"][:4] == ["shard", "leader", "preferred", "term"], result.stdout
    assert rows["shard-00"][:4] == ["shard-00", "node01", "node01", str(TERM)], result.stdout
    assert rows["shard-01"][:4] == ["shard-01", "node03*", "node02", str(TERM)], result.stdout
    # A leader without a majority is no leader, so nothing to compare with the preferred one.
    assert rows["shard-02"][:4] == ["shard-02", "NONE", "node03", str(TERM)], result.stdout
    assert rows["shard-03"][:4] == ["shard-03", "node02*", "node01", str(TERM)], result.stdout
    assert "* led by a node other than its preferred leader: shard-01, shard-03" in result.stdout
    assert "shards without a leader: shard-02" in result.stderr
