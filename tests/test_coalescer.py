"""Per-shard coalescing in the gateway (fast tier): a send function the test controls stands in
for the node call, so each case decides exactly what is in flight when a caller arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from ledger_cluster.core.commands import ItemAnswer
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    QueueFullError,
    UnknownOutcomeError,
)
from ledger_cluster.gateway import coalescer
from ledger_cluster.gateway.coalescer import ShardCoalescer
from ledger_cluster.internal.v1 import core_pb2

LONG_DEADLINE_SECONDS = 30.0
SHORT_DEADLINE_SECONDS = 0.05
WAIT_TIMEOUT_SECONDS = 5.0
Result = TypeVar("Result")


def run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    return asyncio.run(asyncio.wait_for(coroutine, WAIT_TIMEOUT_SECONDS))


def ok(message: str) -> core_pb2.CommandResult:
    return core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK, message=message)


@dataclass
class Sends:
    """Records every send; each one waits until the test releases it, then answers each
    command with `answer_of(command)`."""

    calls: list[list[bytes]] = field(default_factory=list)
    released: list[asyncio.Event] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    failure: Exception | None = None

    @staticmethod
    def answer_of(command: bytes) -> ItemAnswer:
        text = command.decode()
        if text.startswith("not-pending"):
            return core_pb2.CommandResult(outcome=core_pb2.OUTCOME_TRANSACTION_NOT_PENDING, message=text)
        if text.startswith("lost"):
            return UnknownOutcomeError(text)
        return ok(text)

    async def send(self, commands: list[bytes], deadlines: list[Deadline]) -> Sequence[ItemAnswer]:
        assert len(commands) == len(deadlines)
        self.calls.append(list(commands))
        gate = asyncio.Event()
        self.released.append(gate)
        self.started.set()
        await gate.wait()
        if self.failure is not None:
            raise self.failure
        return [self.answer_of(command) for command in commands]

    async def wait_for_calls(self, count: int) -> None:
        while len(self.calls) < count:
            self.started.clear()
            await self.started.wait()

    def release(self, index: int) -> None:
        self.released[index].set()


def messages(answers: Sequence[ItemAnswer]) -> list[str]:
    return [
        answer.message if isinstance(answer, core_pb2.CommandResult) else type(answer).__name__
        for answer in answers
    ]


def test_an_idle_shard_sends_at_once() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        caller = asyncio.create_task(shard.submit([b"a"], Deadline.after(LONG_DEADLINE_SECONDS)))
        await sends.wait_for_calls(1)
        assert sends.calls == [[b"a"]]
        sends.release(0)
        assert messages(await caller) == ["a"]
        assert not shard.sending

    run(scenario())


def test_concurrent_callers_join_the_next_send_and_each_gets_only_its_own_answers() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        deadline = Deadline.after(LONG_DEADLINE_SECONDS)
        first = asyncio.create_task(shard.submit([b"first"], deadline))
        await sends.wait_for_calls(1)
        # While the first send is in flight, three callers arrive: a unary write, a batch
        # call's three items with a domain refusal among them, and a write whose outcome the
        # send cannot tell.
        unary = asyncio.create_task(shard.submit([b"unary"], deadline))
        batch = asyncio.create_task(shard.submit([b"batch-1", b"not-pending-2", b"batch-3"], deadline))
        lost = asyncio.create_task(shard.submit([b"lost-1"], deadline))
        while shard.waiting_items < 5:
            await asyncio.sleep(0)
        assert len(sends.calls) == 1, "nothing is sent while the shard's send is in flight"
        sends.release(0)
        await sends.wait_for_calls(2)
        assert sends.calls[1] == [b"unary", b"batch-1", b"not-pending-2", b"batch-3", b"lost-1"]
        sends.release(1)
        assert messages(await first) == ["first"]
        assert messages(await unary) == ["unary"]
        batch_answers = await batch
        assert messages(batch_answers) == ["batch-1", "not-pending-2", "batch-3"]
        assert isinstance(batch_answers[1], core_pb2.CommandResult)
        assert batch_answers[1].outcome == core_pb2.OUTCOME_TRANSACTION_NOT_PENDING
        assert messages(await lost) == ["UnknownOutcomeError"]

    run(scenario())


def test_a_write_whose_deadline_passes_while_queued_is_never_sent() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        first = asyncio.create_task(shard.submit([b"first"], Deadline.after(LONG_DEADLINE_SECONDS)))
        await sends.wait_for_calls(1)
        short = Deadline.after(SHORT_DEADLINE_SECONDS)
        late = asyncio.create_task(shard.submit([b"late"], short))
        following = asyncio.create_task(shard.submit([b"following"], Deadline.after(LONG_DEADLINE_SECONDS)))
        while not short.expired():
            await asyncio.sleep(SHORT_DEADLINE_SECONDS / 5)
        sends.release(0)
        await sends.wait_for_calls(2)
        sends.release(1)
        assert messages(await first) == ["first"]
        with pytest.raises(BackendTimeoutError, match="not applied"):
            await late
        assert messages(await following) == ["following"]
        assert [b"late"] not in sends.calls and all(b"late" not in call for call in sends.calls)

    run(scenario())


def test_a_caller_that_times_out_before_its_turn_is_told_not_applied_and_skipped() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        first = asyncio.create_task(shard.submit([b"first"], Deadline.after(LONG_DEADLINE_SECONDS)))
        await sends.wait_for_calls(1)
        # Its deadline passes while the first send still holds the shard.
        with pytest.raises(BackendTimeoutError, match="not applied"):
            await shard.submit([b"gone"], Deadline.after(SHORT_DEADLINE_SECONDS))
        sends.release(0)
        assert messages(await first) == ["first"]
        assert sends.calls == [[b"first"]]

    run(scenario())


def test_a_caller_whose_send_outlives_its_deadline_hears_unknown() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        with pytest.raises(UnknownOutcomeError, match="may still apply"):
            await shard.submit([b"slow"], Deadline.after(SHORT_DEADLINE_SECONDS))
        assert sends.calls == [[b"slow"]]
        sends.release(0)

    run(scenario())


def test_a_send_that_fails_unexpectedly_makes_only_its_own_items_unknown() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        deadline = Deadline.after(LONG_DEADLINE_SECONDS)
        first = asyncio.create_task(shard.submit([b"first", b"second"], deadline))
        await sends.wait_for_calls(1)
        sends.failure = RuntimeError("a bug in the send")
        sends.release(0)
        assert messages(await first) == ["UnknownOutcomeError", "UnknownOutcomeError"]
        sends.failure = None
        later = asyncio.create_task(shard.submit([b"later"], deadline))
        await sends.wait_for_calls(2)
        sends.release(1)
        assert messages(await later) == ["later"]

    run(scenario())


def test_a_send_that_knows_nothing_applied_says_so_for_each_item() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        caller = asyncio.create_task(shard.submit([b"a", b"b"], Deadline.after(LONG_DEADLINE_SECONDS)))
        await sends.wait_for_calls(1)
        sends.failure = BackendUnavailableError("no leader")
        sends.release(0)
        assert messages(await caller) == ["BackendUnavailableError", "BackendUnavailableError"]

    run(scenario())


def test_a_send_carries_at_most_the_item_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coalescer, "COALESCE_ITEMS_MAX", 4)

    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        deadline = Deadline.after(LONG_DEADLINE_SECONDS)
        callers = [asyncio.create_task(shard.submit([b"x"], deadline))]
        await sends.wait_for_calls(1)
        callers += [asyncio.create_task(shard.submit([b"x"] * size, deadline)) for size in (2, 2, 1, 3)]
        while shard.waiting_items < 8:
            await asyncio.sleep(0)
        for index in range(3):
            sends.release(index)
            if index < 2:
                await sends.wait_for_calls(index + 2)
        # Whole requests only: [1], then 2+2 (4), then 1+3 (4).
        assert [len(call) for call in sends.calls] == [1, 4, 4]
        assert [len(await caller) for caller in callers] == [1, 2, 2, 1, 3]

    run(scenario())


def test_a_send_carries_at_most_the_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coalescer, "COALESCE_BYTES_MAX", 10)

    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        deadline = Deadline.after(LONG_DEADLINE_SECONDS)
        first = asyncio.create_task(shard.submit([b"0"], deadline))
        await sends.wait_for_calls(1)
        big = [asyncio.create_task(shard.submit([b"123456"], deadline)) for _ in range(3)]
        while shard.waiting_items < 3:
            await asyncio.sleep(0)
        for index in range(3):
            sends.release(index)
            await sends.wait_for_calls(index + 2)
        sends.release(3)
        assert [len(call) for call in sends.calls] == [1, 1, 1, 1]
        await first
        assert [messages(await caller) for caller in big] == [["123456"]] * 3

    run(scenario())


def test_a_full_queue_refuses_a_new_write_outright(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coalescer, "WAITING_ITEMS_MAX", 3)

    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        deadline = Deadline.after(LONG_DEADLINE_SECONDS)
        first = asyncio.create_task(shard.submit([b"a", b"b", b"c"], deadline))
        await sends.wait_for_calls(1)
        queued = asyncio.create_task(shard.submit([b"d", b"e", b"f"], deadline))
        while shard.waiting_items < 3:
            await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="nothing applied"):
            await shard.submit([b"g"], deadline)
        sends.release(0)
        await sends.wait_for_calls(2)
        sends.release(1)
        assert len(await first) == len(await queued) == 3

    run(scenario())


def test_closing_fails_waiting_writes_as_not_applied_and_those_in_flight_as_unknown() -> None:
    async def scenario() -> None:
        sends = Sends()
        shard = ShardCoalescer("shard-00", sends.send)
        deadline = Deadline.after(LONG_DEADLINE_SECONDS)
        in_flight = asyncio.create_task(shard.submit([b"in-flight"], deadline))
        await sends.wait_for_calls(1)
        waiting = asyncio.create_task(shard.submit([b"waiting"], deadline))
        while shard.waiting_items < 1:
            await asyncio.sleep(0)
        await shard.close()
        with pytest.raises(BackendUnavailableError, match="nothing applied"):
            await waiting
        with pytest.raises(BackendUnavailableError, match="nothing applied"):
            await shard.submit([b"after"], deadline)
        assert messages(await in_flight) == ["UnknownOutcomeError"]
        assert sends.calls == [[b"in-flight"]]

    run(scenario())
