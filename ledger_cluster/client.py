"""ClusterClient: shard key -> shard -> leader node, with a leader cache refreshed from hints,
and retries with backoff inside the caller's deadline.

A retry always re-sends the very same command bytes (same ids, same `now`), so the core
recognises a repeat and a command can never apply twice however often it is sent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from ledger_cluster.api.v1 import core_pb2, node_pb2, node_pb2_grpc
from ledger_cluster.config import ClusterConfig, ShardConfig
from ledger_cluster.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    UnknownOutcomeError,
)
from ledger_cluster.status import ErrorDetails, error_details

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

ATTEMPT_TIMEOUT_SECONDS_MAX = 2.0
BACKOFF_INITIAL_SECONDS = 0.02
BACKOFF_MAX_SECONDS = 0.5
ATTEMPTS_MAX = 200  # a bound on the loop even with a huge deadline
# Leader hints followed without backoff in one call: two nodes pointing at each other during an
# election must not spin.
HINTS_FOLLOWED_MAX = 3
LEADERLESS_FAIL_FAST_SECONDS = 3.0
STATUS_TIMEOUT_SECONDS = 1.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Reconnect quickly to a node that restarts: failover must not wait on gRPC's long backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Reasons with which a node says "I did not take this command".
_RETRIED_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}
_NOT_TAKEN_REASONS = {"NOT_LEADER", "NO_LEADER", "QUEUE_FULL", "SHARD_NOT_HOSTED", "NOT_TAKEN"}


def _never_sent(code: grpc.StatusCode, message: str) -> bool:
    """gRPC fails a call on a channel it could not connect at all before sending anything: that
    command certainly did not reach the node (unlike a connection lost mid-call)."""
    return code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in message.lower()


def _may_have_applied(error: grpc.RpcError, details: ErrorDetails) -> bool:
    """Whether a failed attempt may still have reached the log; re-raises errors that are
    neither "not taken" nor a transport failure or timeout (a bug, not a retry case)."""
    if details.reason in _NOT_TAKEN_REASONS:
        return False
    if details.code not in _RETRIED_CODES:
        raise error
    # Lost connection, timeout, or a proposal with unknown fate: keep trying the same bytes.
    return True


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    address: str
    replicas: tuple[node_pb2.ReplicaStatus, ...]
    error: str  # empty when the node answered


class ClusterClient:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._channels = {
            node.node_id: grpc.insecure_channel(node.grpc_address, options=CHANNEL_OPTIONS)
            for node in config.nodes
        }
        self._stubs = {
            node_id: node_pb2_grpc.NodeServiceStub(channel) for node_id, channel in self._channels.items()
        }
        self._shards_by_id = {shard.shard_id: shard for shard in config.shards}
        self._leaders: dict[str, str] = {}
        self._leaders_lock = threading.Lock()
        # When each shard was last seen without a usable leader (None: it has one, or unknown).
        self._leaderless_since: dict[str, float] = {}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # -- leader cache --

    def cached_leader(self, shard_id: str) -> str | None:
        with self._leaders_lock:
            return self._leaders.get(shard_id)

    def remember_leader(self, shard_id: str, node_id: str | None) -> None:
        shard = self._shards_by_id.get(shard_id)
        if shard is None:
            return  # a node reporting a shard this config does not know
        with self._leaders_lock:
            if node_id and any(r.node_id == node_id for r in shard.replicas):
                self._leaders[shard_id] = node_id
            else:
                self._leaders.pop(shard_id, None)

    def _candidate(self, shard: ShardConfig, attempt: int) -> str:
        leader = self.cached_leader(shard.shard_id)
        if leader is not None:
            return leader
        return shard.replicas[attempt % len(shard.replicas)].node_id

    # -- calls --

    def update(self, account_id: int, command: bytes, timeout_seconds: float) -> core_pb2.CommandResult:
        shard = self.config.shard_for_account(account_id)
        request = node_pb2.UpdateRequest(shard_id=shard.shard_id, command=command)

        def invoke(stub: node_pb2_grpc.NodeServiceStub, attempt_timeout: float) -> core_pb2.CommandResult:
            return stub.Update(request, timeout=attempt_timeout).result

        return self._call(shard, invoke, timeout_seconds, is_update=True)

    def read(
        self, account_id: int, query: core_pb2.ReadQuery, consistent: bool, timeout_seconds: float
    ) -> core_pb2.ReadResult:
        shard = self.config.shard_for_account(account_id)
        request = node_pb2.ReadRequest(shard_id=shard.shard_id, query=query, consistent=consistent)

        def invoke(stub: node_pb2_grpc.NodeServiceStub, attempt_timeout: float) -> core_pb2.ReadResult:
            return stub.Read(request, timeout=attempt_timeout).result

        return self._call(shard, invoke, timeout_seconds, is_update=False)

    def _call(
        self,
        shard: ShardConfig,
        invoke: Callable[[node_pb2_grpc.NodeServiceStub, float], Result],
        timeout_seconds: float,
        is_update: bool,
    ) -> Result:
        deadline = time.monotonic() + timeout_seconds
        outcome_unknown = False
        last_problem = ""
        backoff_seconds = BACKOFF_INITIAL_SECONDS
        hints_followed = 0
        for attempt in range(ATTEMPTS_MAX):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            node_id = self._candidate(shard, attempt)
            try:
                return invoke(self._stubs[node_id], min(remaining, ATTEMPT_TIMEOUT_SECONDS_MAX))
            except grpc.RpcError as error:
                details = error_details(error)
                last_problem = f"{node_id}: {details.code.name} {details.reason} {details.message}".strip()
                if details.reason == "NOT_LEADER":
                    hint = details.metadata.get("leader_node_id") or None
                    self.remember_leader(shard.shard_id, hint)
                    if hint is not None and hint != node_id and hints_followed < HINTS_FOLLOWED_MAX:
                        hints_followed += 1
                        continue  # follow the hint at once
                elif _never_sent(details.code, details.message) or details.reason == "NO_LEADER":
                    self.remember_leader(shard.shard_id, None)
                    if self.leaderless_seconds(shard.shard_id) > LEADERLESS_FAIL_FAST_SECONDS:
                        # An election takes at most ~1.4 s: a shard leaderless for longer has
                        # lost its majority. Say so now instead of holding a thread to the deadline.
                        break
                else:
                    outcome_unknown = (_may_have_applied(error, details) and is_update) or outcome_unknown
                    self.remember_leader(shard.shard_id, None)
            sleep_seconds = min(backoff_seconds * random.uniform(0.5, 1.0), deadline - time.monotonic())
            if sleep_seconds > 0:
                time.sleep(sleep_seconds)
            backoff_seconds = min(backoff_seconds * 2, BACKOFF_MAX_SECONDS)
        message = f"shard {shard.shard_id} did not answer in time; last: {last_problem}"
        if outcome_unknown:
            raise UnknownOutcomeError(message)
        if not last_problem:
            raise BackendTimeoutError(f"shard {shard.shard_id}: the deadline passed before any attempt")
        raise BackendUnavailableError(message)

    # -- status --

    def node_statuses(self, timeout_seconds: float = STATUS_TIMEOUT_SECONDS) -> list[NodeStatus]:
        """Every node's view of its replicas, asked in parallel; unreachable nodes say why."""
        calls = {
            node.node_id: self._stubs[node.node_id].Status.future(
                node_pb2.StatusRequest(), timeout=timeout_seconds
            )
            for node in self.config.nodes
        }
        statuses = []
        for node in self.config.nodes:
            try:
                response = calls[node.node_id].result()
                statuses.append(NodeStatus(node.node_id, node.grpc_address, tuple(response.replicas), ""))
            except grpc.RpcError as error:
                details = error_details(error)
                statuses.append(NodeStatus(node.node_id, node.grpc_address, (), details.code.name))
        return statuses

    def refresh_leaders(self, timeout_seconds: float = STATUS_TIMEOUT_SECONDS) -> dict[str, str]:
        """Ask every node who leads what; remember and return shard id -> leader node id for
        the shards whose leader answered as leader with a majority in reach (the highest term
        wins a disagreement)."""
        best: dict[str, tuple[int, str]] = {}
        for status in self.node_statuses(timeout_seconds):
            for replica in status.replicas:
                usable = replica.is_leader and replica.has_quorum
                if usable and replica.term >= best.get(replica.shard_id, (-1, ""))[0]:
                    best[replica.shard_id] = (replica.term, replica.node_id)
        leaders = {shard_id: node_id for shard_id, (_, node_id) in best.items()}
        for shard_id, node_id in leaders.items():
            self.remember_leader(shard_id, node_id)
        now = time.monotonic()
        with self._leaders_lock:
            for shard_id in self._shards_by_id:
                if shard_id in leaders:
                    self._leaderless_since.pop(shard_id, None)
                else:
                    self._leaderless_since.setdefault(shard_id, now)
        return leaders

    def leaderless_seconds(self, shard_id: str) -> float:
        """How long refresh_leaders has seen this shard without a usable leader (0: it has one,
        or nobody polls)."""
        with self._leaders_lock:
            since = self._leaderless_since.get(shard_id)
        return 0.0 if since is None else time.monotonic() - since
