"""Group commit on a shard leader (fast tier): a `propose` the test controls stands in for the
Raft group, so each case decides which entry is in flight when a write arrives and when its
answer comes back. The real group commit under PySyncObj is covered by the cluster tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ledger_cluster.core import commands
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import BackendTimeoutError, LedgerError, UnknownOutcomeError
from ledger_cluster.group_commit import Answer, GroupCommit
from ledger_cluster.internal.v1 import core_pb2

LONG_DEADLINE_SECONDS = 30.0
SHORT_DEADLINE_SECONDS = 0.02
SUCCESS = 0
MICROSECONDS_PER_SECOND = 1_000_000


def write(number: int) -> bytes:
    return commands.create_transaction(
        account_id=1,
        transaction_number=number,
        amount=1,
        description="",
        settled=True,
        request_id="",
        now=number,
    )


def number_of(command: bytes) -> int:
    parsed = commands.parse(command)
    assert isinstance(parsed, commands.CreateTransaction), parsed
    return parsed.transaction_number


def batch_items(entry: bytes) -> tuple[bytes, ...] | None:
    """The items of a batch entry; None for an entry of one command."""
    batch = commands.parse_batch(entry)
    assert not isinstance(batch, commands.Undecodable), batch
    return None if batch is None else batch.items


@dataclass
class Raft:
    """Proposed entries, answered by the test: each item's result carries its number."""

    entries: list[bytes] = field(default_factory=list)
    callbacks: list[Callable[[Any, int], None]] = field(default_factory=list)

    def propose(self, entry: bytes, on_answer: Callable[[Any, int], None]) -> None:
        self.entries.append(entry)
        self.callbacks.append(on_answer)

    def items(self, index: int) -> list[int]:
        items = batch_items(self.entries[index])
        return [number_of(self.entries[index])] if items is None else [number_of(item) for item in items]

    def apply(self, index: int) -> None:
        items = batch_items(self.entries[index])
        if items is not None:
            result = core_pb2.CommandResult(
                outcome=core_pb2.OUTCOME_OK,
                item_results=[
                    core_pb2.CommandResult(outcome=core_pb2.OUTCOME_OK, message=str(number_of(item)))
                    for item in items
                ],
            )
        else:
            result = core_pb2.CommandResult(
                outcome=core_pb2.OUTCOME_OK, message=str(number_of(self.entries[index]))
            )
        self.callbacks[index](result, SUCCESS)


def translate(result: Any, error: int) -> core_pb2.CommandResult | LedgerError:
    return result if error == SUCCESS else UnknownOutcomeError(f"reason {error}")


class Answers:
    def __init__(self) -> None:
        self.received: list[Answer | LedgerError] = []

    def __call__(self, answer: Answer | LedgerError) -> None:
        self.received.append(answer)

    def only(self) -> Answer | LedgerError:
        assert len(self.received) == 1, self.received
        return self.received[0]


def wait_until_expired(deadline: Deadline) -> None:
    while not deadline.expired():
        time.sleep(SHORT_DEADLINE_SECONDS / 4)


def test_an_idle_shard_proposes_at_once_exactly_as_sent() -> None:
    raft = Raft()
    group = GroupCommit("shard-00", raft.propose, translate)
    answers = Answers()
    group.submit(write(1), Deadline.after(LONG_DEADLINE_SECONDS), (), answers)
    assert raft.entries == [write(1)]
    raft.apply(0)
    answer = answers.only()
    assert isinstance(answer, Answer) and answer.result.message == "1"


def test_a_write_whose_deadline_passes_while_waiting_is_never_proposed() -> None:
    raft = Raft()
    group = GroupCommit("shard-00", raft.propose, translate)
    first, late, following = Answers(), Answers(), Answers()
    group.submit(write(1), Deadline.after(LONG_DEADLINE_SECONDS), (), first)
    short = Deadline.after(SHORT_DEADLINE_SECONDS)
    group.submit(write(2), short, (), late)
    group.submit(write(3), Deadline.after(LONG_DEADLINE_SECONDS), (), following)
    wait_until_expired(short)
    raft.apply(0)  # the slot frees: what waits is proposed, but not the expired write
    assert raft.items(1) == [3]
    late_answer = late.only()
    assert isinstance(late_answer, BackendTimeoutError)
    assert "not applied" in str(late_answer)
    raft.apply(1)
    answer = following.only()
    assert isinstance(answer, Answer) and answer.result.message == "3"


def test_a_batch_proposes_only_its_items_with_time_left() -> None:
    raft = Raft()
    group = GroupCommit("shard-00", raft.propose, translate)
    first, batch = Answers(), Answers()
    group.submit(write(1), Deadline.after(LONG_DEADLINE_SECONDS), (), first)
    long_us = int(LONG_DEADLINE_SECONDS * MICROSECONDS_PER_SECOND)
    short_us = int(SHORT_DEADLINE_SECONDS * MICROSECONDS_PER_SECOND)
    group.submit(
        commands.batch([write(10), write(11), write(12)]),
        Deadline.after(LONG_DEADLINE_SECONDS),
        [long_us, short_us, long_us],
        batch,
    )
    wait_until_expired(Deadline.after(SHORT_DEADLINE_SECONDS))
    raft.apply(0)
    assert raft.items(1) == [10, 12]
    raft.apply(1)
    answer = batch.only()
    assert isinstance(answer, Answer)
    assert answer.expired_items == (1,)
    assert [result.message for result in answer.result.item_results] == ["10", "", "12"]


def test_writes_that_wait_together_share_one_entry_and_each_gets_its_own_results() -> None:
    raft = Raft()
    group = GroupCommit("shard-00", raft.propose, translate)
    first, single, batch = Answers(), Answers(), Answers()
    deadline = Deadline.after(LONG_DEADLINE_SECONDS)
    group.submit(write(1), deadline, (), first)
    group.submit(write(2), deadline, (), single)
    group.submit(commands.batch([write(3), write(4)]), deadline, (), batch)
    raft.apply(0)
    assert raft.items(1) == [2, 3, 4]
    raft.apply(1)
    single_answer, batch_answer = single.only(), batch.only()
    assert isinstance(single_answer, Answer) and single_answer.result.message == "2"
    assert isinstance(batch_answer, Answer)
    assert [result.message for result in batch_answer.result.item_results] == ["3", "4"]
    assert batch_answer.expired_items == ()


def test_a_caller_that_gives_up_learns_whether_its_write_was_proposed() -> None:
    raft = Raft()
    group = GroupCommit("shard-00", raft.propose, translate)
    deadline = Deadline.after(LONG_DEADLINE_SECONDS)
    proposed = group.submit(write(1), deadline, (), Answers())
    waiting = group.submit(write(2), deadline, (), Answers())
    assert isinstance(group.withdraw(waiting), BackendTimeoutError)
    assert isinstance(group.withdraw(proposed), UnknownOutcomeError)
    raft.apply(0)
    assert len(raft.entries) == 1, "a withdrawn write is never proposed"


def test_budgets_must_match_a_batch() -> None:
    group = GroupCommit("shard-00", Raft().propose, translate)
    deadline = Deadline.after(LONG_DEADLINE_SECONDS)
    with pytest.raises(ValueError, match="one budget per item"):
        group.submit(write(1), deadline, [1000], Answers())
    with pytest.raises(ValueError, match="one budget per item"):
        group.submit(commands.batch([write(1), write(2)]), deadline, [1000], Answers())


def test_a_proposal_raft_will_not_answer_is_failed_and_frees_the_slot() -> None:
    """The wedge: a snapshot install skips the in-flight entry's index (or the leader steps
    down), so PySyncObj never calls its callback; the replica fails it instead."""
    raft = Raft()
    group = GroupCommit("shard-00", raft.propose, translate)
    stranded, waiting = Answers(), Answers()
    deadline = Deadline.after(LONG_DEADLINE_SECONDS)
    group.submit(write(1), deadline, (), stranded)
    group.submit(write(2), deadline, (), waiting)
    assert len(raft.entries) == 1 and group.has_proposal_in_flight()
    group.fail_in_flight("a snapshot replaced the log")
    failed = stranded.only()
    assert isinstance(failed, UnknownOutcomeError) and "snapshot" in str(failed)
    assert raft.items(1) == [2], "the freed slot proposes what waited"
    raft.apply(1)
    answer = waiting.only()
    assert isinstance(answer, Answer) and answer.result.message == "2"
    raft.apply(0)  # a late answer to the failed proposal changes nothing
    assert stranded.only() is failed
    assert not group.has_proposal_in_flight()
