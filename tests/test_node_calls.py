"""Coalescing a gateway's calls to one node across shards (fast tier): a real grpc.aio server on
loopback plays the node, holding its first call until the test lets go, so the updates that
arrive meanwhile must travel together in one UpdateMany and each get its own outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from ledger_cluster.deadlines import Deadline
from ledger_cluster.internal.v1 import core_pb2, node_pb2, node_pb2_grpc
from ledger_cluster.node_calls import NodeCalls
from ledger_cluster.node_protocol import LEADER_HINT_METADATA_KEY, NodeReason, not_leader
from ledger_cluster.status import ErrorDetails
from tests.processes import LOOPBACK_HOST, free_port

LONG_DEADLINE_SECONDS = 10.0
# Well inside NODE_CALL_STALL_SECONDS: an update this short-lived waits behind the held call.
SHORT_DEADLINE_SECONDS = 0.01
HELD_SHARD = "shard-00"
TEST_TIMEOUT_SECONDS = 20.0
Context = grpc.aio.ServicerContext[object, object]


def answer_of(request: node_pb2.UpdateRequest) -> node_pb2.UpdateResponse:
    return node_pb2.UpdateResponse(
        result=core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK, message=request.shard_id)
    )


class HeldNode(node_pb2_grpc.NodeServiceServicer):
    """Answers Update once released; answers UpdateMany at once, refusing shards it does not
    lead with NOT_LEADER."""

    def __init__(self, led_shards: set[str]) -> None:
        self.led_shards = led_shards
        self.release = asyncio.Event()
        self.calls: list[tuple[str, list[str]]] = []

    async def Update(self, request: node_pb2.UpdateRequest, context: Context) -> node_pb2.UpdateResponse:
        self.calls.append(("Update", [request.shard_id]))
        if request.shard_id == HELD_SHARD:
            await self.release.wait()
        return answer_of(request)

    async def UpdateMany(
        self, request: node_pb2.UpdateManyRequest, context: Context
    ) -> AsyncIterator[node_pb2.UpdateManyAnswers]:
        """The refusals first, then the answers, each in its own message, last first."""
        self.calls.append(("UpdateMany", [update.shard_id for update in request.updates]))
        for index, update in enumerate(request.updates):
            if update.shard_id not in self.led_shards:
                refusal = not_leader(f"not the leader of {update.shard_id}", "node02")
                status = refusal.to_google_status().SerializeToString()
                yield node_pb2.UpdateManyAnswers(
                    outcomes=[node_pb2.UpdateOutcome(index=index, status=status)]
                )
        for index, update in reversed(list(enumerate(request.updates))):
            if update.shard_id in self.led_shards:
                outcome = node_pb2.UpdateOutcome(index=index, response=answer_of(update))
                yield node_pb2.UpdateManyAnswers(outcomes=[outcome])


@asynccontextmanager
async def node_calls(node: node_pb2_grpc.NodeServiceServicer) -> AsyncIterator[NodeCalls]:
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServiceServicer_to_server(node, server)
    address = f"{LOOPBACK_HOST}:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    channel = grpc.aio.insecure_channel(address)
    try:
        yield NodeCalls("node01", node_pb2_grpc.NodeServiceStub(channel), ())
    finally:
        await channel.close()
        await server.stop(None)


def update(shard_id: str) -> node_pb2.UpdateRequest:
    return node_pb2.UpdateRequest(shard_id=shard_id, command=b"")


async def wait_for_calls(node: HeldNode, count: int) -> None:
    while len(node.calls) < count:
        await asyncio.sleep(0.001)


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT_SECONDS))


def test_updates_that_arrive_during_a_call_go_together_and_each_gets_its_own_outcome() -> None:
    async def scenario() -> None:
        node = HeldNode(led_shards={"shard-00", "shard-01", "shard-02"})  # type: ignore[abstract]
        async with node_calls(node) as calls:
            deadline = Deadline.after(LONG_DEADLINE_SECONDS)
            first = asyncio.create_task(calls.update(update("shard-00"), deadline))
            await wait_for_calls(node, 1)
            others = [
                asyncio.create_task(calls.update(update(shard), deadline))
                for shard in ("shard-01", "shard-02", "shard-03")
            ]
            node.release.set()
            outcomes = await asyncio.gather(first, *others)
        assert node.calls == [("Update", ["shard-00"]), ("UpdateMany", ["shard-01", "shard-02", "shard-03"])]
        answered = [outcome for outcome in outcomes[:3] if isinstance(outcome, node_pb2.UpdateResponse)]
        messages = [outcome.result.message for outcome in answered]
        assert messages == ["shard-00", "shard-01", "shard-02"]
        refused = outcomes[3]
        assert isinstance(refused, ErrorDetails)
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.reason == NodeReason.NOT_LEADER
        assert refused.metadata[LEADER_HINT_METADATA_KEY] == "node02"

    run(scenario())


def test_an_update_whose_deadline_passes_while_it_waits_is_never_sent() -> None:
    async def scenario() -> None:
        node = HeldNode(led_shards={"shard-00", "shard-01"})  # type: ignore[abstract]
        async with node_calls(node) as calls:
            first = asyncio.create_task(
                calls.update(update("shard-00"), Deadline.after(LONG_DEADLINE_SECONDS))
            )
            await wait_for_calls(node, 1)
            late = await calls.update(update("shard-01"), Deadline.after(SHORT_DEADLINE_SECONDS))
            node.release.set()
            await first
        assert isinstance(late, ErrorDetails)
        assert late.reason == NodeReason.NOT_PROPOSED, "not sent, so certainly not taken"
        assert node.calls == [("Update", ["shard-00"])]

    run(scenario())


def test_a_call_that_stalls_does_not_hold_up_the_nodes_other_shards() -> None:
    async def scenario() -> None:
        node = HeldNode(led_shards={"shard-00", "shard-01"})  # type: ignore[abstract]
        async with node_calls(node) as calls:
            deadline = Deadline.after(LONG_DEADLINE_SECONDS)
            held = asyncio.create_task(calls.update(update(HELD_SHARD), deadline))
            await wait_for_calls(node, 1)
            started = time.monotonic()
            other = await calls.update(update("shard-01"), deadline)
            waited_seconds = time.monotonic() - started
            assert not held.done(), "the first call is still held"
            node.release.set()
            await held
        assert isinstance(other, node_pb2.UpdateResponse) and other.result.message == "shard-01"
        assert waited_seconds < LONG_DEADLINE_SECONDS / 2
        assert node.calls == [("Update", [HELD_SHARD]), ("Update", ["shard-01"])]

    run(scenario())


class OlderNode(node_pb2_grpc.NodeServiceServicer):
    """A node of a release without UpdateMany (a rolling upgrade): Update only."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.shards: list[str] = []

    async def Update(self, request: node_pb2.UpdateRequest, context: Context) -> node_pb2.UpdateResponse:
        self.shards.append(request.shard_id)
        if request.shard_id == HELD_SHARD:
            await self.release.wait()
        return answer_of(request)


def test_a_node_without_update_many_gets_each_update_on_its_own() -> None:
    async def scenario() -> None:
        node = OlderNode()  # type: ignore[abstract]
        async with node_calls(node) as calls:
            deadline = Deadline.after(LONG_DEADLINE_SECONDS)
            held = asyncio.create_task(calls.update(update(HELD_SHARD), deadline))
            while not node.shards:
                await asyncio.sleep(0.001)
            others = [
                asyncio.create_task(calls.update(update(shard), deadline))
                for shard in ("shard-01", "shard-02")
            ]
            node.release.set()
            outcomes = await asyncio.gather(held, *others)
        assert [
            outcome.result.message for outcome in outcomes if isinstance(outcome, node_pb2.UpdateResponse)
        ] == [
            HELD_SHARD,
            "shard-01",
            "shard-02",
        ]
        assert sorted(node.shards) == [HELD_SHARD, "shard-01", "shard-02"]

    run(scenario())
