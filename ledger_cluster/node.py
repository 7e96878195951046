"""A node process: hosts the shard replicas its config assigns to it and serves the internal
NodeService on asyncio (`grpc.aio`), with no thread per call. A request for a shard this node
does not lead is answered at once with a leader hint (FAILED_PRECONDITION NOT_LEADER); the
ClusterClient follows the hint. Every error's reason is defined in `node_protocol`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ledger_cluster.admission import CallGate, abort
from ledger_cluster.client import ClusterClient
from ledger_cluster.config import ClusterConfig
from ledger_cluster.core import commands
from ledger_cluster.core.commands import ItemAnswer
from ledger_cluster.core.verification import TransferSummary
from ledger_cluster.deadlines import Deadline, work_deadline
from ledger_cluster.errors import BackendTimeoutError, NotLeaderError, SnapshotError, StorageError
from ledger_cluster.internal.v1 import core_pb2, node_pb2, node_pb2_grpc
from ledger_cluster.limits import (
    BATCH_ITEMS_MAX,
    COMMAND_BYTES_MAX,
    ITEM_COMMAND_BYTES_MAX,
    NODE_MESSAGE_BYTES_MAX,
)
from ledger_cluster.metrics import MetricsServer, ShardFigures, serve_metrics
from ledger_cluster.node_protocol import (
    NODE_ID_METADATA_KEY,
    UPDATE_MANY_UPDATES_MAX,
    NodeReason,
    node_error,
)
from ledger_cluster.replica import NodeRaft, ReplicaOptions, ShardReplica
from ledger_cluster.security import ClientCredentials, InternalCredentials
from ledger_cluster.status import ApiError
from ledger_cluster.storage import (
    RESTORE_MARKER_FILE_NAME,
    DirectoryLock,
    SnapshotHeader,
    make_private_directory,
)
from ledger_cluster.text import echo
from ledger_cluster.transfer_flow import LocalShard, TransferDriver

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

# NodeService calls served at once; beyond it, RESOURCE_EXHAUSTED TOO_MANY_REQUESTS (the
# client backs off and retries: nothing was taken). Health checks are not counted.
NODE_CALLS_IN_FLIGHT_MAX = 1024
NODE_SHUTDOWN_GRACE_SECONDS = 3.0
DEFAULT_NODE_TIMEOUT_SECONDS = 5.0
NODE_SERVICE_NAME = "ledger_cluster.internal.v1.NodeService"
# Snapshot RPC: the largest `data` of one chunk (well below NODE_MESSAGE_BYTES_MAX and gRPC's
# default 4 MiB receive limit), and how many snapshots one node streams at a time (each holds
# a temporary copy of its shard on disk).
SNAPSHOT_CHUNK_BYTES_MAX = 1024 * 1024
SNAPSHOT_STREAMS_MAX = 2
# Where the Snapshot RPC spools its temporary snapshot files, under the node's data directory
# (same file system, mode 0700); emptied when the node starts.
SNAPSHOT_SPOOL_DIRECTORY_NAME = "snapshot-spool"
# UpdateMany: answers ready together share a stream message up to this size.
UPDATE_MANY_ANSWER_BYTES_MAX = NODE_MESSAGE_BYTES_MAX // 4
# Verify RPC: at most this many problem lines in one answer (problem_count says how many).
VERIFY_PROBLEMS_MAX = 100


@dataclass(frozen=True)
class _SpooledSnapshot:
    directory: Path
    path: Path
    header: SnapshotHeader


def _deadline(context: grpc.aio.ServicerContext[object, object]) -> Deadline:
    return work_deadline(context.time_remaining(), DEFAULT_NODE_TIMEOUT_SECONDS)


async def _in_thread(deadline: Deadline, function: Callable[..., Result], *arguments: object) -> Result:
    """`function` on a worker thread, so the event loop serves other calls meanwhile; waited for
    until the call's deadline (the thread cannot be stopped, but nobody waits past it)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(function, *arguments), deadline.remaining_seconds())
    except TimeoutError:
        raise ApiError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            NodeReason.DEADLINE_EXCEEDED,
            "the call's deadline passed first",
        ) from None


def _within_message_limit(outcomes: list[node_pb2.UpdateOutcome]) -> Iterator[list[node_pb2.UpdateOutcome]]:
    """Outcomes ready together, in messages of at most UPDATE_MANY_ANSWER_BYTES_MAX each (a
    larger outcome alone), so a stream message never nears the gRPC limit."""
    message: list[node_pb2.UpdateOutcome] = []
    message_bytes = 0
    for outcome in outcomes:
        size_bytes = outcome.ByteSize()
        if message and message_bytes + size_bytes > UPDATE_MANY_ANSWER_BYTES_MAX:
            yield message
            message, message_bytes = [], 0
        message.append(outcome)
        message_bytes += size_bytes
    if message:
        yield message


def oversize_problem(command: bytes) -> str | None:
    """Why no gateway could have built `command` (longer in all, more items, or a longer item
    than any legal one), or None. Such a command never reaches the log, so a caller with the
    cluster token still cannot fill a shard's journal with oversized entries."""
    if len(command) > COMMAND_BYTES_MAX:
        return f"a command of {len(command)} bytes; at most {COMMAND_BYTES_MAX}"
    batch = commands.parse_batch(command)
    if isinstance(batch, commands.Batch):
        if len(batch.items) > BATCH_ITEMS_MAX:
            return f"{len(batch.items)} items in one command; at most {BATCH_ITEMS_MAX}"
        longest = max((len(item) for item in batch.items), default=0)
        if longest > ITEM_COMMAND_BYTES_MAX:
            return f"an item of {longest} bytes; at most {ITEM_COMMAND_BYTES_MAX}"
    elif batch is None and len(command) > ITEM_COMMAND_BYTES_MAX:
        return f"a command of {len(command)} bytes; at most {ITEM_COMMAND_BYTES_MAX} outside a batch"
    return None


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, node_id: str, replicas: dict[str, ShardReplica], snapshot_spool: Path) -> None:
        self._node_id = node_id
        self._replicas = replicas
        self._snapshot_spool = snapshot_spool
        self._snapshot_streams = 0
        self._gate = CallGate("NodeService", NODE_CALLS_IN_FLIGHT_MAX, node_error)

    def _replica(self, shard_id: str) -> ShardReplica:
        replica = self._replicas.get(shard_id)
        if replica is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                NodeReason.SHARD_NOT_HOSTED,
                f"node {self._node_id} hosts no replica of shard {echo(shard_id)}",
                {NODE_ID_METADATA_KEY: self._node_id},
            )
        return replica

    async def Update(
        self, request: node_pb2.UpdateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.UpdateResponse:
        return await self._gate.run("Update", context, lambda: self._update(request, context))

    async def _update(
        self, request: node_pb2.UpdateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.UpdateResponse:
        replica = self._replica(request.shard_id)
        problem = oversize_problem(request.command)
        if problem is not None:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, NodeReason.COMMAND_TOO_LARGE, problem)
        deadline = _deadline(context)
        if deadline.expired():
            # Proposing what nobody will wait for only turns it into an unknown outcome.
            raise BackendTimeoutError("too little time left to propose; not applied")
        try:
            answer = await replica.submit_async(request.command, deadline, request.item_budgets_us)
        except ValueError as error:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT, NodeReason.INVALID_ITEM_BUDGETS, str(error)
            ) from None
        return node_pb2.UpdateResponse(result=answer.result, expired_items=answer.expired_items)

    async def UpdateMany(
        self, request: node_pb2.UpdateManyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[node_pb2.UpdateManyAnswers]:
        async for answers in self._gate.stream(
            "UpdateMany", context, lambda: self._update_many(request, context)
        ):
            yield answers

    async def _update_many(
        self, request: node_pb2.UpdateManyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[node_pb2.UpdateManyAnswers]:
        if len(request.updates) > UPDATE_MANY_UPDATES_MAX:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                NodeReason.TOO_MANY_UPDATES,
                f"{len(request.updates)} updates in one call; at most {UPDATE_MANY_UPDATES_MAX}",
            )
        pending = {
            asyncio.ensure_future(self._update_outcome(index, update, context))
            for index, update in enumerate(request.updates)
        }
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for outcomes in _within_message_limit([task.result() for task in done]):
                    yield node_pb2.UpdateManyAnswers(outcomes=outcomes)
        finally:
            for task in pending:
                task.cancel()  # the call went away: what is not yet proposed never will be

    async def _update_outcome(
        self, index: int, request: node_pb2.UpdateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.UpdateOutcome:
        """One update of an UpdateMany, answered as Update would answer it alone."""
        try:
            response = await self._update(request, context)
        except Exception as error:
            failure = self._gate.failure(error)
            return node_pb2.UpdateOutcome(index=index, status=failure.to_google_status().SerializeToString())
        return node_pb2.UpdateOutcome(index=index, response=response)

    async def Read(
        self, request: node_pb2.ReadRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.ReadResponse:
        async def run() -> node_pb2.ReadResponse:
            replica = self._replica(request.shard_id)
            result = await replica.read(request.query, request.consistent, _deadline(context))
            return node_pb2.ReadResponse(result=result)

        return await self._gate.run("Read", context, run)

    async def Status(
        self, request: node_pb2.StatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.StatusResponse:
        async def run() -> node_pb2.StatusResponse:
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

        # The gateways' leader polls: a node saturated with writes must still say who leads.
        return await self._gate.run("Status", context, run, capped=False)

    async def Digest(
        self, request: node_pb2.DigestRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.DigestResponse:
        async def run() -> node_pb2.DigestResponse:
            replica = self._replica(request.shard_id)
            # A scan of the whole shard.
            applied_index, digest = await _in_thread(_deadline(context), replica.core.state_digest)
            return node_pb2.DigestResponse(applied_index=applied_index, digest=digest)

        return await self._gate.run("Digest", context, run)

    async def Verify(
        self, request: node_pb2.VerifyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> node_pb2.VerifyResponse:
        async def run() -> node_pb2.VerifyResponse:
            replica = self._replica(request.shard_id)
            applied_index, digest, problems, transfers = await _in_thread(
                _deadline(context), replica.core.verify_report
            )
            return node_pb2.VerifyResponse(
                applied_index=applied_index,
                digest=digest,
                problems=problems[:VERIFY_PROBLEMS_MAX],
                problem_count=len(problems),
                node_id=self._node_id,
                is_leader=replica.is_leader(),
                transfers=transfer_summary_message(transfers),
            )

        return await self._gate.run("Verify", context, run)

    async def TransferLeadership(
        self,
        request: node_pb2.TransferLeadershipRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> node_pb2.TransferLeadershipResponse:
        async def run() -> node_pb2.TransferLeadershipResponse:
            replica = self._replica(request.shard_id)
            target = request.target_node_id or None
            hosts = {member.node_id for member in replica.shard.replicas}
            if target is not None and (target not in hosts or target == self._node_id):
                raise ApiError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    NodeReason.INVALID_TRANSFER_TARGET,
                    f"{echo(target)} is not another replica of shard {request.shard_id}"
                    f" (its replicas: {', '.join(sorted(hosts))})",
                )
            # It polls and sleeps until another replica leads: a thread, not the event loop.
            deadline = _deadline(context)
            leader = await _in_thread(
                deadline, replica.transfer_leadership, target, deadline.remaining_seconds()
            )
            return node_pb2.TransferLeadershipResponse(
                leader_node_id=leader, previous_leader_node_id=self._node_id
            )

        return await self._gate.run("TransferLeadership", context, run)

    async def Snapshot(
        self, request: node_pb2.SnapshotRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[node_pb2.SnapshotChunk]:
        if self._snapshot_streams >= SNAPSHOT_STREAMS_MAX:
            await abort(
                context,
                ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    NodeReason.SNAPSHOT_BUSY,
                    f"node {self._node_id} already streams {SNAPSHOT_STREAMS_MAX} snapshots; retry later",
                ),
            )
        self._snapshot_streams += 1
        spooling: asyncio.Task[_SpooledSnapshot] | None = None
        try:
            deadline = _deadline(context)
            replica = await self._gate.run(
                "Snapshot", context, lambda: self._snapshot_source(request.shard_id)
            )
            spooling = asyncio.ensure_future(asyncio.to_thread(self._write_spool, replica, request.shard_id))
            await asyncio.wait({spooling}, timeout=deadline.remaining_seconds())
            try:
                if not spooling.done():
                    raise ApiError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        NodeReason.DEADLINE_EXCEEDED,
                        "the snapshot was not written before the call's deadline",
                    )
                chunks = _chunk_reader(spooling.result(), self._node_id)
                while (chunk := await _in_thread(deadline, next, chunks, None)) is not None:
                    yield chunk
            except ApiError as failure:
                await abort(context, failure)
        finally:
            if spooling is None or spooling.done():
                self._release_spool(spooling)
            else:
                # Its thread cannot be stopped: the slot stays taken, and the copy on disk stays,
                # until it finishes; then both go.
                spooling.add_done_callback(self._release_spool)

    def _release_spool(self, spooling: asyncio.Task[_SpooledSnapshot] | None) -> None:
        if spooling is not None and not spooling.cancelled() and spooling.exception() is None:
            shutil.rmtree(spooling.result().directory, ignore_errors=True)
        self._snapshot_streams -= 1

    async def _snapshot_source(self, shard_id: str) -> ShardReplica:
        """This node's replica of the shard, if it leads it with a majority in reach."""
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
        return replica

    def _write_spool(self, replica: ShardReplica, shard_id: str) -> _SpooledSnapshot:
        """On a worker thread: the leader's state, written from one LMDB read transaction
        (applies go on meanwhile) to a private temporary file."""
        directory = Path(tempfile.mkdtemp(prefix=f"{shard_id}-", dir=self._snapshot_spool))
        path = directory / "shard.snapshot"
        try:
            header = replica.core.write_snapshot(path)
        except SnapshotError as error:
            shutil.rmtree(directory, ignore_errors=True)
            raise ApiError(
                grpc.StatusCode.INTERNAL,
                NodeReason.SNAPSHOT_FAILED,
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


def _chunk_reader(spooled: _SpooledSnapshot, node_id: str) -> Iterator[node_pb2.SnapshotChunk]:
    """The spooled file as chunks; the last one carries the stream's sha256 and header."""
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
                chunk.node_id = node_id
                yield chunk
                return
            yield chunk
            data = following


def transfer_summary_message(summary: TransferSummary) -> node_pb2.TransferSummary:
    return node_pb2.TransferSummary(
        debit_legs_hash=summary.debit_legs_hash.to_bytes(16, "big"),
        credit_legs_hash=summary.credit_legs_hash.to_bytes(16, "big"),
        debit_legs=summary.debit_legs,
        credit_legs=summary.credit_legs,
        unfinished=summary.unfinished,
        currencies=[
            node_pb2.CurrencyFlow(currency=currency, settled=str(flow.settled), pending=str(flow.pending))
            for currency, flow in sorted((summary.currencies or {}).items())
        ],
    )


class _ClusterShards:
    """The ShardApi of a node's transfer driver: every shard through its leader."""

    def __init__(self, config: ClusterConfig, credentials: ClientCredentials) -> None:
        self._config = config
        self.client = ClusterClient(config, credentials)

    def shard_id(self, account_id: int) -> str:
        return self._config.shard_for_account(account_id).shard_id

    async def update(self, shard_id: str, items: list[bytes], deadline: Deadline) -> list[ItemAnswer]:
        return list(await self.client.update(shard_id, items, [deadline] * len(items)))

    async def read_shard(
        self, shard_id: str, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult:
        return await self.client.read(shard_id, query, consistent, deadline)


class NodeServer:
    """The replicas of one node plus the gRPC server and the metrics endpoint in front of them.
    Build it, then `start()` and `stop()` it on the event loop that serves it."""

    def __init__(
        self,
        config: ClusterConfig,
        node_id: str,
        data_dir: Path,
        options: ReplicaOptions,
        credentials: InternalCredentials,
    ) -> None:
        self.node = config.node(node_id)
        self._credentials = credentials
        # Before anything is opened: a node that may not serve must not touch its data.
        credentials.check_listen_address(self.node.grpc_address)
        self._lock = DirectoryLock(data_dir)
        if (data_dir / RESTORE_MARKER_FILE_NAME).exists():
            self._lock.release()
            raise StorageError(
                f"{data_dir} holds an unfinished `ledger-dev restore`; some shards may be missing."
                " Remove the node data directories and run the restore again"
            )
        self.replicas: dict[str, ShardReplica] = {}
        self._snapshot_spool = data_dir / SNAPSHOT_SPOOL_DIRECTORY_NAME
        self._raft: NodeRaft | None = None
        try:
            # Left over by a process that died while streaming; nobody else uses it (the lock).
            shutil.rmtree(self._snapshot_spool, ignore_errors=True)
            make_private_directory(self._snapshot_spool)
            self._raft = NodeRaft(config, node_id, options)  # binds the Raft address
            for shard in config.shards:
                if any(replica.node_id == node_id for replica in shard.replicas):
                    self.replicas[shard.shard_id] = ShardReplica(
                        config, shard, node_id, data_dir, options, raft=self._raft
                    )
            self._raft.start()
        except BaseException:
            self._close_replicas()
            raise
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._metrics: MetricsServer | None = None
        self.port = 0
        self._config = config
        self._shards_api: _ClusterShards | None = None
        self._driver: TransferDriver | None = None

    def _leading_replicas(self) -> list[LocalShard]:
        return [
            LocalShard(shard_id, replica.core, replica.is_leader)
            for shard_id, replica in sorted(self.replicas.items())
        ]

    def _shard_figures(self) -> list[ShardFigures]:
        figures = []
        for shard_id, replica in sorted(self.replicas.items()):
            status = replica.status()
            used_bytes, map_bytes = replica.core.storage_bytes()
            figures.append(
                ShardFigures(
                    shard_id=shard_id,
                    applied_index=status.core_applied_index,
                    lmdb_used_bytes=used_bytes,
                    lmdb_map_bytes=map_bytes,
                    term=status.term,
                    commit_index=status.commit_index,
                    is_leader=status.is_leader,
                )
            )
        return figures

    async def start(self) -> None:
        """Listen on the node's address (and metrics address, when the config names one);
        raises OSError when one is taken."""
        server_credentials = self._credentials.server()
        server = grpc.aio.server(
            interceptors=server_credentials.interceptors(),
            options=[
                ("grpc.max_receive_message_length", NODE_MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", NODE_MESSAGE_BYTES_MAX),
                # Fail loudly when the port is taken instead of sharing it with another server.
                ("grpc.so_reuseport", 0),
            ],
        )
        node_pb2_grpc.add_NodeServiceServicer_to_server(
            NodeServicer(self.node.node_id, self.replicas, self._snapshot_spool), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = server_credentials.add_port(server, self.node.grpc_address)
        if self.node.metrics_address is not None:
            host, _, port = self.node.metrics_address.rpartition(":")
            self._metrics = serve_metrics(host, int(port), "node", self.node.node_id, self._shard_figures)
        await server.start()
        self._server = server
        for service in ("", NODE_SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        # Expiry and unfinished transfers of the shards this node leads.
        self._shards_api = _ClusterShards(self._config, self._credentials.client())
        self._driver = TransferDriver(self._shards_api, self._leading_replicas)
        self._driver.start()
        logger.info(
            "node %s serving NodeService on %s with %d replicas (pid %d)",
            self.node.node_id,
            self.node.grpc_address,
            len(self.replicas),
            os.getpid(),
        )

    async def stop(self) -> None:
        if self._driver is not None:
            await self._driver.stop()
        if self._shards_api is not None:
            await self._shards_api.client.close()
        for service in ("", NODE_SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._raft is not None:
            # Peers take over this node's shards before it goes: writes pause for an election's
            # worth of a TimeoutNow instead of an election timeout.
            await asyncio.to_thread(self._raft.hand_off_leaderships)
        if self._server is not None:
            await self._server.stop(NODE_SHUTDOWN_GRACE_SECONDS)
        if self._metrics is not None:
            self._metrics.close()
        # Joins the Raft loop and every replica's applier: off the event loop.
        await asyncio.to_thread(self._close_replicas)

    def _close_replicas(self) -> None:
        if self._raft is not None:
            self._raft.stop()  # nothing ticks the groups from here on
        for replica in self.replicas.values():
            replica.close()
        self.replicas.clear()
        self._lock.release()
