"""Who leads each shard, as the nodes that answer see it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ledger_cluster.api.v1 import node_pb2


@dataclass(frozen=True)
class ShardLeader:
    """A shard's leader and the term it leads in: every election, even one that re-elects the
    same node, starts a new term."""

    node_id: str
    term: int


def shard_leaders(statuses: Iterable[node_pb2.StatusResponse]) -> dict[str, ShardLeader]:
    """Shard id -> the replica that claims leadership with a quorum, at the highest term any
    answering replica of the shard reports (a replica at a higher term means an election is
    under way, and the old leader's claim is stale)."""
    claims: dict[str, list[node_pb2.ReplicaStatus]] = {}
    for status in statuses:
        for replica in status.replicas:
            claims.setdefault(replica.shard_id, []).append(replica)
    leaders: dict[str, ShardLeader] = {}
    for shard_id, views in claims.items():
        top_term = max(view.term for view in views)
        leading = [view for view in views if view.is_leader and view.has_quorum and view.term == top_term]
        if len(leading) == 1:
            leaders[shard_id] = ShardLeader(leading[0].node_id, leading[0].term)
    return leaders
