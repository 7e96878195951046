"""The ClusterClient's per-command fates (fast tier): real grpc.aio servers on loopback play
nodes that answer from a script, so each case decides what the client hears at each attempt
and checks what it concludes: answered, never applied, or unknown."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import pytest

from ledger_cluster import config as cluster_config
from ledger_cluster.admission import abort
from ledger_cluster.client import ClusterClient
from ledger_cluster.config import ClusterConfig
from ledger_cluster.core import commands
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import BackendUnavailableError, UnknownOutcomeError
from ledger_cluster.internal.v1 import core_pb2, node_pb2, node_pb2_grpc
from ledger_cluster.node_protocol import not_leader
from ledger_cluster.security import ClientCredentials
from ledger_cluster.status import ApiError
from tests.processes import LOOPBACK_HOST, free_port

LONG_DEADLINE_SECONDS = 10.0
SHORT_DEADLINE_SECONDS = 0.05
TEST_TIMEOUT_SECONDS = 20.0
SHARD_ID = "shard-00"
Result = TypeVar("Result")
Context = grpc.aio.ServicerContext[object, object]
# One scripted answer: given the request, answer it (return) or end the call (raise/abort).
Step = Callable[[node_pb2.UpdateRequest, Context], Coroutine[Any, Any, node_pb2.UpdateResponse]]


def run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT_SECONDS))


def items_of(request: node_pb2.UpdateRequest) -> list[bytes]:
    batch = commands.parse_batch(request.command)
    assert isinstance(batch, commands.Batch), batch
    return list(batch.items)


def answered(request: node_pb2.UpdateRequest, expired: tuple[int, ...] = ()) -> node_pb2.UpdateResponse:
    """Each item's result carries the item's bytes as its message; expired positions stay empty."""
    results = [
        core_pb2.CommandResult() if position in expired else core_pb2.CommandResult(message=item.decode())
        for position, item in enumerate(items_of(request))
    ]
    return node_pb2.UpdateResponse(
        result=core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK, item_results=results),
        expired_items=expired,
    )


def fail(failure: ApiError) -> Step:
    async def step(request: node_pb2.UpdateRequest, context: Context) -> node_pb2.UpdateResponse:
        await abort(context, failure)

    return step


def lost(delay_seconds: float = 0.0) -> Step:
    """A call that ends like a lost connection: UNAVAILABLE with no reason of ours."""

    async def step(request: node_pb2.UpdateRequest, context: Context) -> node_pb2.UpdateResponse:
        await asyncio.sleep(delay_seconds)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        raise AssertionError("abort returned")

    return step


def answer(expired: tuple[int, ...] = ()) -> Step:
    async def step(request: node_pb2.UpdateRequest, context: Context) -> node_pb2.UpdateResponse:
        return answered(request, expired)

    return step


class ScriptedNode(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.requests: list[node_pb2.UpdateRequest] = []

    async def Update(self, request: node_pb2.UpdateRequest, context: Context) -> node_pb2.UpdateResponse:
        self.requests.append(request)
        if len(self.requests) > len(self.steps):
            raise AssertionError(f"unscripted call {len(self.requests)}")
        return await self.steps[len(self.requests) - 1](request, context)


@asynccontextmanager
async def nodes(*scripts: list[Step] | None) -> AsyncIterator[tuple[ClusterConfig, list[ScriptedNode]]]:
    """One scripted node per script (None: an address where nothing listens), all replicas of
    the one shard of a config, in order."""
    generated = cluster_config.generate(len(scripts), 1, len(scripts))
    servers: list[grpc.aio.Server] = []
    scripted: list[ScriptedNode] = []
    addresses = []
    try:
        for script in scripts:
            port = free_port()
            addresses.append(f"{LOOPBACK_HOST}:{port}")
            if script is None:
                continue
            server = grpc.aio.server()
            node = ScriptedNode(script)  # type: ignore[abstract]
            node_pb2_grpc.add_NodeServiceServicer_to_server(node, server)
            server.add_insecure_port(addresses[-1])
            await server.start()
            servers.append(server)
            scripted.append(node)
        config = dataclasses.replace(
            generated,
            nodes=tuple(
                dataclasses.replace(node, grpc_address=address)
                for node, address in zip(generated.nodes, addresses, strict=True)
            ),
        )
        yield config, scripted
    finally:
        for server in servers:
            await server.stop(None)


async def update(config: ClusterConfig, items: list[bytes], deadlines: list[Deadline]) -> list[object]:
    client = ClusterClient(config, ClientCredentials(token=None, tls=None))
    try:
        return list(await client.update(SHARD_ID, items, deadlines))
    finally:
        await client.close()


def test_an_item_an_earlier_attempt_may_have_applied_stays_unknown() -> None:
    async def scenario() -> None:
        async with nodes([lost(), answer(expired=(0,))]) as (config, (node,)):
            deadline = Deadline.after(LONG_DEADLINE_SECONDS)
            first, second = await update(config, [b"a", b"b"], [deadline, deadline])
        # The lost call may have proposed "a"; that the retry found it expired proves nothing.
        assert isinstance(first, UnknownOutcomeError)
        assert isinstance(second, core_pb2.CommandResult) and second.message == "b"
        assert [items_of(request) for request in node.requests] == [[b"a", b"b"], [b"a", b"b"]]

    run(scenario())


def test_answers_reach_their_own_items_when_only_some_are_still_open() -> None:
    async def scenario() -> None:
        # The first call fails after the short deadline has passed; the retry carries the rest.
        async with nodes([lost(delay_seconds=2 * SHORT_DEADLINE_SECONDS), answer()]) as (config, (node,)):
            long = Deadline.after(LONG_DEADLINE_SECONDS)
            short = Deadline.after(SHORT_DEADLINE_SECONDS)
            answers = await update(config, [b"x", b"short", b"y"], [long, short, long])
        assert [items_of(request) for request in node.requests] == [[b"x", b"short", b"y"], [b"x", b"y"]]
        assert [getattr(item, "message", type(item).__name__) for item in answers] == [
            "x",
            "UnknownOutcomeError",
            "y",
        ]

    run(scenario())


def test_each_item_carries_its_own_time_budget() -> None:
    async def scenario() -> None:
        async with nodes([answer()]) as (config, (node,)):
            await update(config, [b"a", b"b"], [Deadline.after(1.0), Deadline.after(0.5)])
        first, second = node.requests[0].item_budgets_us
        assert 0.5e6 < first <= 1e6 and 0.25e6 < second <= 0.5e6 and first > second

    run(scenario())


def test_a_node_nobody_listens_on_means_not_applied() -> None:
    async def scenario() -> None:
        async with nodes(None) as (config, _):
            answers = await update(config, [b"a"], [Deadline.after(0.3)])
        assert len(answers) == 1 and isinstance(answers[0], BackendUnavailableError)
        assert "not connected" in str(answers[0])

    run(scenario())


def test_a_leader_hint_is_followed_at_once() -> None:
    async def scenario() -> None:
        async with nodes([fail(not_leader("not me", "node02"))], [answer()]) as (config, (follower, leader)):
            answers = await update(config, [b"a"], [Deadline.after(LONG_DEADLINE_SECONDS)])
        assert [getattr(item, "message", None) for item in answers] == ["a"]
        assert (len(follower.requests), len(leader.requests)) == (1, 1)

    run(scenario())


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        # Never proposed: a refusal of ours that promises so, then nothing but refusals.
        (ApiError(grpc.StatusCode.UNAVAILABLE, "NO_LEADER", "no leader"), BackendUnavailableError),
        # Proposed, fate unknown.
        (ApiError(grpc.StatusCode.UNAVAILABLE, "OUTCOME_UNKNOWN", "leader changed"), UnknownOutcomeError),
        # A bug on the node: not retried, and the write may have been taken before it failed.
        (ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", "boom"), UnknownOutcomeError),
    ],
    ids=["not-taken", "unknown", "unexpected"],
)
def test_what_a_failed_attempt_means(failure: ApiError, expected: type[Exception]) -> None:
    async def scenario() -> None:
        steps = [fail(failure)] * 100
        async with nodes(steps) as (config, _):
            answers = await update(config, [b"a"], [Deadline.after(0.3)])
        assert len(answers) == 1 and isinstance(answers[0], expected), answers

    run(scenario())
