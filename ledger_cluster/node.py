"""A node process: hosts the shard replicas its config assigns to it and serves the internal
NodeService. A request for a shard this node does not lead is answered at once with a leader
hint (FAILED_PRECONDITION NOT_LEADER); the ClusterClient follows the hint."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ledger_cluster.api.v1 import node_pb2, node_pb2_grpc
from ledger_cluster.config import ClusterConfig
from ledger_cluster.deadlines import work_budget_seconds
from ledger_cluster.errors import (
    BackendUnavailableError,
    LeadershipTransferDeniedError,
    LeadershipTransferIncompleteError,
    NotLeaderError,
    SnapshotError,
    StorageError,
    UnknownOutcomeError,
)
from ledger_cluster.replica import ReplicaOptions, ShardReplica
from ledger_cluster.status import ApiError, abort, serve
from ledger_cluster.storage import (
    RESTORE_MARKER_FILE_NAME,
    DirectoryLock,
    SnapshotHeader,
    make_private_directory,
)

logger = logging.getLogger(__name__)

Response = TypeVar("Response")

NODE_WORKER_THREADS = 128
NODE_CONCURRENT_RPCS_MAX = 1024
NODE_MESSAGE_BYTES_MAX = 16 * 1024 * 1024
NODE_SHUTDOWN_GRACE_SECONDS = 3.0
DEFAULT_NODE_TIMEOUT_SECONDS = 5.0
NODE_SERVICE_NAME = "ledger_cluster.api.v1.NodeService"
# Snapshot RPC: the largest `data` of one chunk (well below NODE_MESSAGE_BYTES_MAX and gRPC's
# default 4 MiB receive limit), and how many snapshots one node streams at a time (each holds
# a temporary copy of its shard on disk).
SNAPSHOT_CHUNK_BYTES_MAX = 1024 * 1024
SNAPSHOT_STREAMS_MAX = 2
# Where the Snapshot RPC spools its temporary snapshot files, under the node's data directory
# (same file system, mode 0700); emptied when the node starts.
SNAPSHOT_SPOOL_DIRECTORY_NAME = "snapshot-spool"
# Verify RPC: at most this many problem lines in one answer (problem_count says how many).
VERIFY_PROBLEMS_MAX = 100


@dataclass(frozen=True)
class _SpooledSnapshot:
    directory: Path
    path: Path
    header: SnapshotHeader


def _timeout_seconds(context: grpc.ServicerContext) -> float:
    return work_budget_seconds(context, DEFAULT_NODE_TIMEOUT_SECONDS)


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, node_id: str, replicas: dict[str, ShardReplica], snapshot_spool: Path) -> None:
        self._node_id = node_id
        self._replicas = replicas
        self._snapshot_spool = snapshot_spool
        self._snapshot_streams = threading.BoundedSemaphore(SNAPSHOT_STREAMS_MAX)

    def _replica(self, shard_id: str) -> ShardReplica:
        replica = self._replicas.get(shard_id)
        if replica is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                "SHARD_NOT_HOSTED",
                f"node {self._node_id} hosts no replica of shard {shard_id!r}",
                {"node_id": self._node_id},
            )
        return replica

    def Update(
        self, request: node_pb2.UpdateRequest, context: grpc.ServicerContext
    ) -> node_pb2.UpdateResponse:
        def run() -> node_pb2.UpdateResponse:
            replica = self._replica(request.shard_id)
            budget_seconds = _timeout_seconds(context)
            if budget_seconds <= 0 or not context.is_active():
                # Proposing what nobody will wait for only turns it into an unknown outcome.
                raise ApiError(
                    grpc.StatusCode.UNAVAILABLE, "NOT_TAKEN", "too little time left to propose; not applied"
                )
            result = replica.submit(request.command, budget_seconds)
            return node_pb2.UpdateResponse(result=result)

        return _serve(context, run)

    def Read(self, request: node_pb2.ReadRequest, context: grpc.ServicerContext) -> node_pb2.ReadResponse:
        def run() -> node_pb2.ReadResponse:
            replica = self._replica(request.shard_id)
            result = replica.read(request.query, request.consistent, _timeout_seconds(context))
            return node_pb2.ReadResponse(result=result)

        return _serve(context, run)

    def Status(
        self, request: node_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> node_pb2.StatusResponse:
        response = node_pb2.StatusResponse(node_id=self._node_id)
        for shard_id in sorted(self._replicas):
            status = self._replicas[shard_id].status()
            response.replicas.append(
                node_pb2.ReplicaStatus(
                    shard_id=status.shard_id,
                    node_id=status.node_id,
                    is_leader=status.is_leader,
                    leader_node_id=status.leader_node_id,
                    term=status.term,
                    commit_index=status.commit_index,
                    last_applied=status.last_applied,
                    core_applied_index=status.core_applied_index,
                    has_quorum=status.has_quorum,
                    log_entries=status.log_entries,
                )
            )
        return response

    def Digest(
        self, request: node_pb2.DigestRequest, context: grpc.ServicerContext
    ) -> node_pb2.DigestResponse:
        def run() -> node_pb2.DigestResponse:
            applied_index, digest = self._replica(request.shard_id).core.state_digest()
            return node_pb2.DigestResponse(applied_index=applied_index, digest=digest)

        return _serve(context, run)

    def Snapshot(
        self, request: node_pb2.SnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.SnapshotChunk]:
        if not self._snapshot_streams.acquire(blocking=False):
            abort(
                context,
                ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "SNAPSHOT_BUSY",
                    f"node {self._node_id} already streams {SNAPSHOT_STREAMS_MAX} snapshots; retry later",
                ),
            )
        try:
            spooled = _serve(context, lambda: self._spool_snapshot(request.shard_id))
            try:
                yield from self._snapshot_chunks(spooled)
            finally:
                shutil.rmtree(spooled.directory, ignore_errors=True)
        finally:
            self._snapshot_streams.release()

    def _spool_snapshot(self, shard_id: str) -> _SpooledSnapshot:
        """The leader's state, written from one LMDB read transaction (applies go on meanwhile)
        to a private temporary file."""
        replica = self._replica(shard_id)
        status = replica.status()
        if not status.is_leader:
            leader = status.leader_node_id or None
            raise NotLeaderError(
                f"node {self._node_id} does not lead shard {shard_id}"
                + (f"; node {leader} does" if leader else "; no leader is known"),
                leader,
            )
        if not status.has_quorum:
            # A leader cut off from its majority may miss writes a newer leader acknowledged.
            raise NotLeaderError(
                f"node {self._node_id} leads shard {shard_id} without a majority; not a backup source",
                None,
            )
        directory = Path(tempfile.mkdtemp(prefix=f"{shard_id}-", dir=self._snapshot_spool))
        path = directory / "shard.snapshot"
        try:
            header = replica.core.write_snapshot(path)
        except SnapshotError as error:
            shutil.rmtree(directory, ignore_errors=True)
            raise ApiError(
                grpc.StatusCode.INTERNAL,
                "SNAPSHOT_FAILED",
                f"node {self._node_id} could not snapshot shard {shard_id}: {error}",
            ) from error
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        logger.info(
            "shard %s: streaming a snapshot at applied index %d (%d records, %d bytes)",
            shard_id,
            header.applied_index,
            header.record_count,
            path.stat().st_size,
        )
        return _SpooledSnapshot(directory, path, header)

    def _snapshot_chunks(self, spooled: _SpooledSnapshot) -> Iterator[node_pb2.SnapshotChunk]:
        digest = hashlib.sha256()
        offset = 0
        with open(spooled.path, "rb") as file:
            data = file.read(SNAPSHOT_CHUNK_BYTES_MAX)
            while True:
                following = file.read(SNAPSHOT_CHUNK_BYTES_MAX)
                digest.update(data)
                chunk = node_pb2.SnapshotChunk(data=data, offset=offset)
                offset += len(data)
                if not following:
                    header = spooled.header
                    chunk.last = True
                    chunk.sha256 = digest.hexdigest()
                    chunk.total_bytes = offset
                    chunk.applied_index = header.applied_index
                    chunk.record_count = header.record_count
                    chunk.shard_lower_bound = header.shard_lower_bound
                    chunk.shard_upper_bound = header.shard_upper_bound
                    chunk.node_id = self._node_id
                    yield chunk
                    return
                yield chunk
                data = following

    def Verify(
        self, request: node_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> node_pb2.VerifyResponse:
        def run() -> node_pb2.VerifyResponse:
            replica = self._replica(request.shard_id)
            applied_index, digest, problems = replica.core.verify_report()
            return node_pb2.VerifyResponse(
                applied_index=applied_index,
                digest=digest,
                problems=problems[:VERIFY_PROBLEMS_MAX],
                problem_count=len(problems),
                node_id=self._node_id,
                is_leader=replica.is_leader(),
            )

        return _serve(context, run)

    def TransferLeadership(
        self, request: node_pb2.TransferLeadershipRequest, context: grpc.ServicerContext
    ) -> node_pb2.TransferLeadershipResponse:
        def run() -> node_pb2.TransferLeadershipResponse:
            replica = self._replica(request.shard_id)
            target = request.target_node_id or None
            hosts = {member.node_id for member in replica.shard.replicas}
            if target is not None and (target not in hosts or target == self._node_id):
                raise ApiError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "INVALID_TRANSFER_TARGET",
                    f"{target!r} is not another replica of shard {request.shard_id}"
                    f" (its replicas: {', '.join(sorted(hosts))})",
                )
            leader = replica.transfer_leadership(target, _timeout_seconds(context))
            return node_pb2.TransferLeadershipResponse(
                leader_node_id=leader, previous_leader_node_id=self._node_id
            )

        return _serve(context, run)


def _node_error(error: Exception) -> ApiError | None:
    """What a replica's "not taken" and "unknown outcome" errors mean on the wire."""
    if isinstance(error, NotLeaderError):
        leader = error.leader_node_id or ""
        return ApiError(
            grpc.StatusCode.FAILED_PRECONDITION if leader else grpc.StatusCode.UNAVAILABLE,
            "NOT_LEADER" if leader else "NO_LEADER",
            str(error),
            {"leader_node_id": leader},
        )
    if isinstance(error, BackendUnavailableError):
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", str(error))
    if isinstance(error, UnknownOutcomeError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, "OUTCOME_UNKNOWN", str(error))
    if isinstance(error, LeadershipTransferDeniedError):
        return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "TRANSFER_DENIED", str(error))
    if isinstance(error, LeadershipTransferIncompleteError):
        return ApiError(grpc.StatusCode.UNAVAILABLE, "TRANSFER_INCOMPLETE", str(error))
    return None


def _serve(context: grpc.ServicerContext, handler: Callable[[], Response]) -> Response:
    return serve(context, handler, _node_error)


class NodeServer:
    """The replicas of one node plus the gRPC server in front of them."""

    def __init__(self, config: ClusterConfig, node_id: str, data_dir: Path, options: ReplicaOptions) -> None:
        self.node = config.node(node_id)
        self._lock = DirectoryLock(data_dir)
        if (data_dir / RESTORE_MARKER_FILE_NAME).exists():
            self._lock.release()
            raise StorageError(
                f"{data_dir} holds an unfinished `ledger-dev restore`; some shards may be missing."
                " Remove the node data directories and run the restore again"
            )
        self.replicas: dict[str, ShardReplica] = {}
        snapshot_spool = data_dir / SNAPSHOT_SPOOL_DIRECTORY_NAME
        try:
            # Left over by a process that died while streaming; nobody else uses it (the lock).
            shutil.rmtree(snapshot_spool, ignore_errors=True)
            make_private_directory(snapshot_spool)
            for shard in config.shards:
                if any(replica.node_id == node_id for replica in shard.replicas):
                    self.replicas[shard.shard_id] = ShardReplica(config, shard, node_id, data_dir, options)
            for replica in self.replicas.values():
                replica.wait_bound()
        except BaseException:
            self._close_replicas()
            raise
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=NODE_WORKER_THREADS, thread_name_prefix="node-rpc"),
            maximum_concurrent_rpcs=NODE_CONCURRENT_RPCS_MAX,
            options=[
                ("grpc.max_receive_message_length", NODE_MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", NODE_MESSAGE_BYTES_MAX),
                ("grpc.so_reuseport", 0),
            ],
        )
        node_pb2_grpc.add_NodeServiceServicer_to_server(
            NodeServicer(node_id, self.replicas, snapshot_spool), self._server
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        try:
            self.port = self._server.add_insecure_port(self.node.grpc_address)
        except RuntimeError as error:
            self._close_replicas()
            raise OSError(f"cannot listen on {self.node.grpc_address}: {error}") from error

    def start(self) -> None:
        self._server.start()
        for service in ("", NODE_SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "node %s serving NodeService on %s with %d replicas (pid %d)",
            self.node.node_id,
            self.node.grpc_address,
            len(self.replicas),
            os.getpid(),
        )

    def stop(self) -> None:
        for service in ("", NODE_SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(NODE_SHUTDOWN_GRACE_SECONDS).wait()
        self._close_replicas()

    def _close_replicas(self) -> None:
        for replica in self.replicas.values():
            replica.close()
        self.replicas.clear()
        self._lock.release()
