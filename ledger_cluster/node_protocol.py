"""The one definition of how a node answers the ClusterClient when it does not simply succeed:
the `ErrorInfo.reason` of each case, its status code, the metadata key of the leader hint, and
which reasons promise that the command never reached the log.

Nodes raise typed errors (errors.py) and `node_error` turns them into these statuses; clients,
backup and the nemesis read them back through `NodeReason` and `is_not_taken`, never through
string literals or message text.
"""

from __future__ import annotations

import enum

import grpc

from ledger_cluster.admission import TOO_MANY_REQUESTS_REASON
from ledger_cluster.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    LeadershipTransferDeniedError,
    LeadershipTransferIncompleteError,
    NotLeaderError,
    ProposalDeniedError,
    QueueFullError,
    UnknownOutcomeError,
)
from ledger_cluster.security import UNAUTHENTICATED_REASON
from ledger_cluster.status import ApiError

# ErrorInfo.metadata key of a NOT_LEADER answer: the node id of the leader this node follows.
LEADER_HINT_METADATA_KEY = "leader_node_id"
# ErrorInfo.metadata key naming the node that answered SHARD_NOT_HOSTED.
NODE_ID_METADATA_KEY = "node_id"
# Updates in one UpdateMany call: one per shard a node can lead is plenty (a gateway sends at most
# one update per shard in a call).
UPDATE_MANY_UPDATES_MAX = 1024


class NodeReason(enum.StrEnum):
    # Not taken: the command never reached the shard's log, so it may be sent again anywhere.
    NOT_LEADER = "NOT_LEADER"  # FAILED_PRECONDITION, with a leader hint
    NO_LEADER = "NO_LEADER"  # UNAVAILABLE: no leader is known
    SHARD_NOT_HOSTED = "SHARD_NOT_HOSTED"  # NOT_FOUND: this node has no replica of the shard
    QUEUE_FULL = "QUEUE_FULL"  # RESOURCE_EXHAUSTED: too many writes wait on the shard
    PROPOSAL_DENIED = "PROPOSAL_DENIED"  # UNAVAILABLE: the Raft group refused the proposal
    NOT_PROPOSED = "NOT_PROPOSED"  # DEADLINE_EXCEEDED: the deadline passed before the proposal
    TOO_MANY_REQUESTS = TOO_MANY_REQUESTS_REASON  # RESOURCE_EXHAUSTED: the service's in-flight cap
    NODE_UNAVAILABLE = "NODE_UNAVAILABLE"  # UNAVAILABLE: the node cannot take it now
    # Taken, fate unknown: the entry may still commit. Retry only with the same bytes.
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"  # UNAVAILABLE
    # Admin calls.
    INVALID_TRANSFER_TARGET = "INVALID_TRANSFER_TARGET"  # INVALID_ARGUMENT
    TRANSFER_DENIED = "TRANSFER_DENIED"  # FAILED_PRECONDITION: nothing changed
    TRANSFER_INCOMPLETE = "TRANSFER_INCOMPLETE"  # UNAVAILABLE: the election may still finish
    SNAPSHOT_BUSY = "SNAPSHOT_BUSY"  # RESOURCE_EXHAUSTED
    SNAPSHOT_FAILED = "SNAPSHOT_FAILED"  # INTERNAL
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # DEADLINE_EXCEEDED: an admin call's deadline passed
    # INVALID_ARGUMENT: item_budgets_us that do not match the command (a client bug; not taken)
    INVALID_ITEM_BUDGETS = "INVALID_ITEM_BUDGETS"
    # INVALID_ARGUMENT: an UpdateMany of more than UPDATE_MANY_UPDATES_MAX updates (not taken)
    TOO_MANY_UPDATES = "TOO_MANY_UPDATES"
    # INVALID_ARGUMENT: a command longer than COMMAND_BYTES_MAX, which no gateway builds (not taken)
    COMMAND_TOO_LARGE = "COMMAND_TOO_LARGE"
    # UNAUTHENTICATED: the call lacked the cluster token; refused before any handler ran
    UNAUTHENTICATED = UNAUTHENTICATED_REASON


NOT_TAKEN_REASONS = frozenset(
    {
        NodeReason.NOT_LEADER,
        NodeReason.NO_LEADER,
        NodeReason.SHARD_NOT_HOSTED,
        NodeReason.QUEUE_FULL,
        NodeReason.PROPOSAL_DENIED,
        NodeReason.NOT_PROPOSED,
        NodeReason.TOO_MANY_REQUESTS,
        NodeReason.NODE_UNAVAILABLE,
        # Refused before it was read: whatever it asked for never happened.
        NodeReason.UNAUTHENTICATED,
        NodeReason.COMMAND_TOO_LARGE,
    }
)


def is_not_taken(reason: str) -> bool:
    """Whether a node's answer promises the command never reached the log."""
    return reason in NOT_TAKEN_REASONS


def not_leader(message: str, leader_node_id: str | None) -> ApiError:
    if leader_node_id:
        return ApiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            NodeReason.NOT_LEADER,
            message,
            {LEADER_HINT_METADATA_KEY: leader_node_id},
        )
    return ApiError(grpc.StatusCode.UNAVAILABLE, NodeReason.NO_LEADER, message)


def node_error(error: Exception) -> ApiError | None:
    """What a replica's typed errors mean on the wire (None: not one of them, a bug)."""
    if isinstance(error, NotLeaderError):
        return not_leader(str(error), error.leader_node_id)
    if isinstance(error, QueueFullError):
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, NodeReason.QUEUE_FULL, str(error))
    if isinstance(error, ProposalDeniedError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, NodeReason.PROPOSAL_DENIED, str(error))
    if isinstance(error, BackendTimeoutError):
        return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, NodeReason.NOT_PROPOSED, str(error))
    if isinstance(error, BackendUnavailableError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, NodeReason.NODE_UNAVAILABLE, str(error))
    if isinstance(error, UnknownOutcomeError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, NodeReason.OUTCOME_UNKNOWN, str(error))
    if isinstance(error, LeadershipTransferDeniedError):
        return ApiError(grpc.StatusCode.FAILED_PRECONDITION, NodeReason.TRANSFER_DENIED, str(error))
    if isinstance(error, LeadershipTransferIncompleteError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, NodeReason.TRANSFER_INCOMPLETE, str(error))
    return None
