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
from ledger_cluster.status import error_details

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

ATTEMPT_TIMEOUT_SECONDS_MAX = 2.0
BACKOFF_INITIAL_SECONDS = 0.02
BACKOFF_MAX_SECONDS = 0.5
ATTEMPTS_MAX = 200  # a bound on the loop even with a huge deadline
STATUS_TIMEOUT_SECONDS = 1.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Reconnect quickly to a node that restarts: failover must not wait on gRPC's long backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Reasons with which a node says "I did not take this command".
_NOT_TAKEN_REASONS = {"NOT_LEADER", "NO_LEADER", "QUEUE_FULL", "SHARD_NOT_HOSTED"}


def _never_sent(code: grpc.StatusCode, message: str) -> bool:
    """gRPC fails a call on a channel it could not connect at all before sending anything: that
    command certainly did not reach the node (unlike a connection lost mid-call)."""
    return code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in message.lower()


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
        self._leaders: dict[str, str] = {}
        self._leaders_lock = threading.Lock()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # -- leader cache --

    def cached_leader(self, shard_id: str) -> str | None:
        with self._leaders_lock:
            return self._leaders.get(shard_id)

    def remember_leader(self, shard_id: str, node_id: str | None) -> None:
        with self._leaders_lock:
            if node_id and any(r.node_id == node_id for r in self._shard(shard_id).replicas):
                self._leaders[shard_id] = node_id
            else:
                self._leaders.pop(shard_id, None)

    def _shard(self, shard_id: str) -> ShardConfig:
        for shard in self.config.shards:
            if shard.shard_id == shard_id:
                return shard
        raise KeyError(shard_id)

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
                    if hint is not None and hint != node_id:
                        continue  # follow the hint at once
                elif _never_sent(details.code, details.message):
                    self.remember_leader(shard.shard_id, None)
                elif details.reason not in _NOT_TAKEN_REASONS:
                    if details.code not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.CANCELLED,
                    ):
                        raise
                    # Lost connection, timeout, or a proposal with unknown fate: the command
                    # may have reached the log. Keep trying with the same bytes.
                    outcome_unknown = outcome_unknown or is_update
                    self.remember_leader(shard.shard_id, None)
                else:
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
        return leaders
