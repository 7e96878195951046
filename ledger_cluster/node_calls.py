"""One node's Update calls from a gateway, coalesced across shards: an update to an idle node is
sent at once as a plain Update; updates that arrive while a call to that node is in flight go
together in its next UpdateMany call, each answered on its own. A node leading several shards
then pays one gRPC call's cost for all of their writes instead of one per shard.

Each update keeps its own deadline: one still waiting when its deadline passes is never sent and
hears NOT_PROPOSED (not taken); one sent whose answer is late hears DEADLINE_EXCEEDED with no
reason, exactly as a timed-out call of its own would (it may have been taken).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
from google.rpc import status_pb2

from ledger_cluster.deadlines import MICROSECONDS_PER_SECOND, Deadline
from ledger_cluster.internal.v1 import node_pb2, node_pb2_grpc
from ledger_cluster.limits import NODE_MESSAGE_BYTES_MAX
from ledger_cluster.node_protocol import UPDATE_MANY_UPDATES_MAX, NodeReason
from ledger_cluster.security import Metadata
from ledger_cluster.status import ErrorDetails, error_details, status_details

logger = logging.getLogger(__name__)

# What one call carries at most: the node's update count limit, and half its message limit
# (one update alone is never refused by this bound: it is always sent, on its own).
NODE_CALL_UPDATES_MAX = UPDATE_MANY_UPDATES_MAX
NODE_CALL_BYTES_MAX = NODE_MESSAGE_BYTES_MAX // 2
# A call in flight for longer than this (a normal one takes a Raft round and an fsync, a few
# milliseconds) no longer holds back what waits: another call starts, up to the limit.
NODE_CALL_STALL_SECONDS = 0.05
NODE_CALLS_IN_FLIGHT_MAX = 4
# Updates waiting for a node's next call; beyond it, QUEUE_FULL (not taken). A gateway has at
# most one update per shard in flight, so this is only reached by a bug.
NODE_CALL_WAITING_MAX = 10_000

Outcome = node_pb2.UpdateResponse | ErrorDetails


@dataclass(slots=True)
class _Pending:
    request: node_pb2.UpdateRequest
    deadline: Deadline
    answer: asyncio.Future[Outcome]
    size_bytes: int
    created_seconds: float = field(default_factory=time.monotonic)
    sent: bool = field(default=False)


class NodeCalls:
    """Lives on the event loop's thread."""

    def __init__(self, node_id: str, stub: node_pb2_grpc.NodeServiceAsyncStub, metadata: Metadata) -> None:
        self._node_id = node_id
        self._stub = stub
        # The cluster's credentials, sent with every call.
        self._metadata = metadata
        self._waiting: deque[_Pending] = deque()
        self._drain_task: asyncio.Task[None] | None = None
        # Set when an update arrives, so a drain waiting on stalled calls looks again.
        self._arrived = asyncio.Event()
        self._update_many_served = True

    async def update(self, request: node_pb2.UpdateRequest, deadline: Deadline) -> Outcome:
        """The node's answer to `request`: its response, or the status it failed with."""
        if len(self._waiting) >= NODE_CALL_WAITING_MAX:
            return ErrorDetails(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{NODE_CALL_WAITING_MAX} updates already wait for node {self._node_id}",
                NodeReason.QUEUE_FULL,
                {},
            )
        loop = asyncio.get_running_loop()
        pending = _Pending(request, deadline, loop.create_future(), request.ByteSize())
        self._waiting.append(pending)
        self._arrived.set()
        if self._drain_task is None:
            self._drain_task = loop.create_task(self._drain(), name=f"node-calls-{self._node_id}")
        try:
            return await asyncio.wait_for(asyncio.shield(pending.answer), deadline.remaining_seconds())
        except TimeoutError:
            return self._late(pending)
        except asyncio.CancelledError:
            pending.answer.cancel()  # never sent if it still waits
            raise

    def _late(self, pending: _Pending) -> Outcome:
        if pending.answer.done() and not pending.answer.cancelled():
            return pending.answer.result()
        if not pending.sent:
            pending.answer.cancel()  # the drain skips it: never sent
            return ErrorDetails(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline passed while the update waited for node {self._node_id}; not sent",
                NodeReason.NOT_PROPOSED,
                {},
            )
        return ErrorDetails(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer before the deadline", "", {})

    def _take(self) -> list[_Pending]:
        taken: list[_Pending] = []
        size_bytes = 0
        while self._waiting:
            pending = self._waiting[0]
            fits = (
                len(taken) < NODE_CALL_UPDATES_MAX and size_bytes + pending.size_bytes <= NODE_CALL_BYTES_MAX
            )
            if taken and not fits:
                break
            self._waiting.popleft()
            if pending.answer.done():
                continue  # its caller left or timed out while it waited: never sent
            pending.sent = True
            taken.append(pending)
            size_bytes += pending.size_bytes
        return taken

    async def _drain(self) -> None:
        """Send what waits whenever no call is in flight, or when every call in flight has
        taken longer than NODE_CALL_STALL_SECONDS (a shard that cannot commit must not hold up
        the node's other shards), up to NODE_CALLS_IN_FLIGHT_MAX calls."""
        in_flight: dict[asyncio.Future[object], float] = {}
        try:
            while self._waiting or in_flight:
                until = _until_another_call(in_flight)
                if self._waiting and until is not None and until <= 0:
                    taken = self._take()
                    if taken:
                        in_flight[asyncio.ensure_future(self._call(taken))] = time.monotonic()
                    continue
                self._arrived.clear()
                arrival: asyncio.Future[object] = asyncio.ensure_future(self._arrived.wait())
                timeout = until if until is not None and until > 0 else None
                watched: list[asyncio.Future[object]] = [*in_flight, arrival]
                done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                arrival.cancel()
                for call in list(in_flight):
                    if call in done:
                        del in_flight[call]
        finally:
            for call in in_flight:
                call.cancel()
            self._drain_task = None

    async def _call(self, taken: list[_Pending]) -> None:
        for pending in taken:
            _spend_waiting_time(pending)
        timeout_seconds = max(pending.deadline.remaining_seconds() for pending in taken)
        try:
            if len(taken) == 1 or not self._update_many_served:
                await asyncio.gather(*(self._call_one(pending, timeout_seconds) for pending in taken))
            else:
                await self._call_many(taken, timeout_seconds)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED and len(taken) > 1:
                # A node of an older release (a rolling upgrade): none of them was taken.
                logger.warning(
                    "node %s does not serve UpdateMany; sending its updates one by one", self._node_id
                )
                self._update_many_served = False
                await asyncio.gather(*(self._call_one(pending, timeout_seconds) for pending in taken))
                return
            details = error_details(error)
            for pending in taken:
                _answer(pending, details)
        except asyncio.CancelledError:
            for pending in taken:
                pending.answer.cancel()
            raise
        missing = ErrorDetails(
            grpc.StatusCode.INTERNAL, f"node {self._node_id} left an update unanswered", "", {}
        )
        for pending in taken:
            _answer(pending, missing)

    async def _call_one(self, pending: _Pending, timeout_seconds: float) -> None:
        try:
            _answer(
                pending,
                await self._stub.Update(pending.request, timeout=timeout_seconds, metadata=self._metadata),
            )
        except grpc.aio.AioRpcError as error:
            _answer(pending, error_details(error))

    async def _call_many(self, taken: list[_Pending], timeout_seconds: float) -> None:
        """One UpdateMany: each update answered as soon as its answer streams in."""
        request = node_pb2.UpdateManyRequest(updates=[pending.request for pending in taken])
        async for answers in self._stub.UpdateMany(request, timeout=timeout_seconds, metadata=self._metadata):
            for outcome in answers.outcomes:
                if outcome.index < len(taken):
                    _answer(taken[outcome.index], _outcome(outcome))


def _until_another_call(in_flight: dict[asyncio.Future[object], float]) -> float | None:
    """Seconds until another call may start (0: now; None: only when one finishes)."""
    if not in_flight:
        return 0.0
    if len(in_flight) >= NODE_CALLS_IN_FLIGHT_MAX:
        return None
    return max(in_flight.values()) + NODE_CALL_STALL_SECONDS - time.monotonic()


def _spend_waiting_time(pending: _Pending) -> None:
    """Item budgets were set when the update was made; the time it waited here is gone from
    each, so the node never proposes an item whose caller has stopped waiting."""
    waited_us = int((time.monotonic() - pending.created_seconds) * MICROSECONDS_PER_SECOND)
    if waited_us > 0 and pending.request.item_budgets_us:
        budgets = [max(budget - waited_us, 0) for budget in pending.request.item_budgets_us]
        del pending.request.item_budgets_us[:]
        pending.request.item_budgets_us.extend(budgets)


def _answer(pending: _Pending, outcome: Outcome) -> None:
    """The first answer counts; a caller that left has nobody to hear it."""
    if not pending.answer.done():
        pending.answer.set_result(outcome)


def _outcome(outcome: node_pb2.UpdateOutcome) -> Outcome:
    if outcome.HasField("response"):
        return outcome.response
    return status_details(status_pb2.Status.FromString(outcome.status))
