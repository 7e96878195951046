"""Group commit on a shard's leader: one proposal in flight at a time; writes that arrive
meanwhile wait, and when it completes they are proposed together as one batch entry (one Raft
round, one LMDB write transaction, one fsync pair on every replica). A write arriving while
nothing is in flight is proposed at once, so low load sees no added delay.

A batch entry's items are independent: each keeps its own ids, `now` and idempotency, and gets
its own result. A command that is itself a batch (a gateway's coalesced writes, or a batch
RPC's items for this shard) adds its items, and gets back their results as its own batch
answer; an entry holds at most BATCH_ITEMS_MAX items.

Every write carries its caller's deadline (each item of a batch its own, when the gateway sent
budgets). Whatever is still waiting when its deadline passes is never proposed: its caller
hears "not proposed, not applied". This module knows nothing of PySyncObj: the replica hands it
a `propose` function and turns Raft's answers into results or errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ledger_cluster import metrics
from ledger_cluster.core import commands, rules
from ledger_cluster.deadlines import MICROSECONDS_PER_SECOND, Deadline
from ledger_cluster.errors import (
    BackendTimeoutError,
    LedgerError,
    QueueFullError,
    UnknownOutcomeError,
)
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import BATCH_ITEMS_MAX

logger = logging.getLogger(__name__)

# Writes waiting for the proposal in flight to finish; beyond it, QUEUE_FULL.
GROUP_COMMIT_WAITING_MAX = 10_000
# Proposals of one shard in flight at once (Raft pipelines them); writes beyond wait and are
# proposed together when one completes. Measured: grouping beats pipelining when each Raft
# entry costs milliseconds of CPU.
GROUP_COMMIT_IN_FLIGHT_MAX = 1


@dataclass(frozen=True)
class Answer:
    """A write's answer: the core's result and, for a batch, the positions of the items that
    were never proposed because their deadline passed first (their item_results entries are
    empty placeholders)."""

    result: core_pb2.CommandResult
    expired_items: tuple[int, ...] = ()


OnAnswer = Callable[[Answer | LedgerError], None]


@dataclass(eq=False)
class Waiter:
    command: bytes
    is_batch: bool
    # What this write adds to a group's entry: the command itself, or a batch command's items.
    # None for a batch the core refuses whole: it is proposed alone, exactly as sent.
    items: list[bytes] | None
    deadline: Deadline
    # Each batch item's own deadline (None: every item has `deadline`).
    item_deadlines: list[Deadline] | None
    on_answer: OnAnswer
    # Positions of `items` in the proposed entry, set when it is proposed.
    proposed: list[int] = field(default_factory=list)
    answered: bool = False
    # Set (under the group commit's lock) when the waiter is taken for a proposal, or when its
    # caller gives up before that; a withdrawn waiter is skipped, never proposed.
    taken: bool = False
    withdrawn: bool = False

    def settle(self, answer: Answer | LedgerError) -> None:
        if not self.answered:
            self.answered = True
            self.on_answer(answer)

    def live_positions(self) -> list[int]:
        """The items whose deadline has not passed."""
        if self.items is None:
            return [] if self.deadline.expired() else [0]
        if self.item_deadlines is None:
            return [] if self.deadline.expired() else list(range(len(self.items)))
        now = time.monotonic()
        return [
            position
            for position, deadline in enumerate(self.item_deadlines)
            if deadline.monotonic_seconds > now
        ]

    def entry_items(self) -> list[bytes]:
        if self.items is None:
            return [self.command]
        return [self.items[position] for position in self.proposed]


def _items_of(command: bytes) -> tuple[bool, list[bytes] | None]:
    """Whether `command` is a batch, and what it adds to an entry: itself, a batch's items, or
    None for a batch that is proposed alone (one the core refuses whole, undecodable or too
    large, or an empty one, which has no item to add)."""
    batch = commands.parse_batch(command)
    if batch is None:
        return False, [command]
    if isinstance(batch, commands.Undecodable) or not batch.items:
        return True, None
    if rules.batch_size_problem(len(batch.items)) is not None:
        return True, None
    return True, list(batch.items)


def new_waiter(
    command: bytes, deadline: Deadline, item_budgets_us: Sequence[int], on_answer: OnAnswer
) -> Waiter:
    """A batch command's items can join other writes' items in one entry: the core applies
    them one by one, each answered on its own, exactly as inside their own batch. A batch the
    core refuses whole (too large, undecodable) stays alone, refused exactly as sent.
    Raises ValueError when budgets are given for anything but each item of a batch."""
    is_batch, items = _items_of(command)
    item_deadlines = None
    if item_budgets_us:
        if not is_batch or items is None or len(item_budgets_us) != len(items):
            raise ValueError("item_budgets_us needs one budget per item of a batch command")
        received = time.monotonic()
        item_deadlines = [
            Deadline(min(received + budget / MICROSECONDS_PER_SECOND, deadline.monotonic_seconds))
            for budget in item_budgets_us
        ]
    return Waiter(command, is_batch, items, deadline, item_deadlines, on_answer)


def _expired_positions(waiter: Waiter) -> tuple[int, ...]:
    """The positions of a batch's items that were never proposed."""
    proposed = set(waiter.proposed)
    return tuple(position for position in range(len(waiter.items or ())) if position not in proposed)


def _own_answer(waiter: Waiter, answer: core_pb2.CommandResult, start: int) -> Answer:
    """A joined write's own answer: its items' slice of the entry's results, each at its
    position, and the positions never proposed."""
    if not waiter.is_batch:
        return Answer(answer.item_results[start])
    own = core_pb2.CommandResult(outcome=answer.outcome, log_index=answer.log_index)
    results = iter(answer.item_results[start : start + len(waiter.proposed)])
    expired = _expired_positions(waiter)
    never_proposed = set(expired)
    for position in range(len(waiter.items or ())):
        own.item_results.append(core_pb2.CommandResult() if position in never_proposed else next(results))
    return Answer(own, expired)


class GroupCommit:
    def __init__(
        self,
        shard_id: str,
        propose: Callable[[bytes, Callable[[Any, int], None]], None],
        translate: Callable[[Any, int], core_pb2.CommandResult | LedgerError],
    ) -> None:
        self._shard_id = shard_id
        self._propose = propose
        self._translate = translate
        self._lock = threading.Lock()
        self._waiting: deque[Waiter] = deque()
        # Proposals whose answer is awaited, by proposal number. Raft may never answer one (a
        # snapshot installed past its index, a leadership lost), so `fail_in_flight` can end
        # them; an answer arriving after that finds its number gone and changes nothing.
        self._in_flight: dict[int, tuple[list[Waiter], bool]] = {}
        self._proposals_made = 0
        self._held = False

    @contextmanager
    def held(self) -> Iterator[None]:
        """Propose nothing new inside the block (writes wait, as if a proposal were in flight):
        a leadership transfer needs the target to stay caught up with the leader's log."""
        with self._lock:
            self._held = True
        try:
            yield
        finally:
            with self._lock:
                self._held = False
                self._propose_next()

    def submit(
        self, command: bytes, deadline: Deadline, item_budgets_us: Sequence[int], on_answer: OnAnswer
    ) -> Waiter:
        """Queue a write; `on_answer` is called once, from the thread that learns the answer
        (the shard's applier or the node's Raft loop, or this one). Raises QueueFullError (nothing queued) and
        ValueError (budgets that do not match the command)."""
        waiter = new_waiter(command, deadline, item_budgets_us, on_answer)
        with self._lock:
            if len(self._waiting) >= GROUP_COMMIT_WAITING_MAX:
                raise QueueFullError(
                    f"shard {self._shard_id}: {GROUP_COMMIT_WAITING_MAX} writes already wait"
                )
            self._waiting.append(waiter)
            self._propose_next()
        return waiter

    def withdraw(self, waiter: Waiter) -> LedgerError:
        """For a caller that stops waiting: the error to report. A write still waiting is
        withdrawn (skipped when its turn comes), so it is certainly never proposed; one already
        proposed may still commit."""
        with self._lock:
            # Marked rather than removed: a scan of a long queue per withdrawal would stall the
            # caller's event loop exactly when many deadlines pass at once.
            if not waiter.taken:
                waiter.withdrawn = True
                return BackendTimeoutError(
                    f"shard {self._shard_id}: not proposed before the deadline; not applied"
                )
        return UnknownOutcomeError(
            f"shard {self._shard_id}: no answer before the deadline; it may still commit"
        )

    def has_proposal_in_flight(self) -> bool:
        """Whether an entry this replica proposed may be applying now. Every entry whose
        callback waits was proposed with the count raised, and the count drops only in that
        callback, after the apply: when it is zero, nobody waits for the entry being applied
        (a follower's case), so the core can skip building answers. Read without the lock:
        the raise happens before the proposal, so it can only be stale toward building answers
        that nobody reads."""
        return bool(self._in_flight)

    def fail_in_flight(self, reason: str) -> None:
        """Answer every proposal in flight as of unknown outcome and free their slots, for when
        Raft will not answer them: after a snapshot install skipped their indices, or after this
        replica stopped leading (the entry may still commit under the next leader)."""
        with self._lock:
            ended = list(self._in_flight.values())
            self._in_flight.clear()
        for group, _whole in ended:
            for waiter in group:
                waiter.settle(UnknownOutcomeError(f"shard {self._shard_id}: {reason}; it may still commit"))
        if ended:
            metrics.GROUP_COMMIT_FAILED_IN_FLIGHT.inc(len(ended))
            with self._lock:
                self._propose_next()

    def _propose_next(self) -> None:
        """With the lock held: while a proposal slot is free, propose what waits."""
        while self._waiting and not self._held and len(self._in_flight) < GROUP_COMMIT_IN_FLIGHT_MAX:
            group = self._take_group()
            if group:
                self._propose_group(group)

    def _take_group(self) -> list[Waiter]:
        """The oldest waiting writes that fit one entry. A write whose deadline passed (every
        item of it, for a batch) is answered at once and never proposed."""
        group: list[Waiter] = []
        item_count = 0
        while self._waiting:
            waiter = self._waiting[0]
            if waiter.withdrawn:
                self._waiting.popleft()
                continue
            live = waiter.live_positions()
            if not live:
                self._waiting.popleft()
                waiter.withdrawn = True
                self._settle_expired(waiter)
                continue
            alone = waiter.items is None or (group and group[0].items is None)
            if group and (alone or item_count + len(live) > BATCH_ITEMS_MAX):
                break
            self._waiting.popleft()
            waiter.proposed = live
            waiter.taken = True
            group.append(waiter)
            item_count += len(live)
            if waiter.items is None:
                break
        return group

    def _settle_expired(self, waiter: Waiter) -> None:
        if waiter.is_batch and waiter.items is not None:
            count = len(waiter.items)
            result = core_pb2.CommandResult(
                outcome=core_pb2.OUTCOME_OK,
                item_results=[core_pb2.CommandResult() for _ in range(count)],
            )
            waiter.settle(Answer(result, tuple(range(count))))
            return
        waiter.settle(
            BackendTimeoutError(f"shard {self._shard_id}: not proposed before the deadline; not applied")
        )

    def _propose_group(self, group: list[Waiter]) -> None:
        only = group[0]
        whole = len(group) == 1 and (
            not only.is_batch or only.items is None or len(only.proposed) == len(only.items)
        )
        if whole:
            entry = only.command  # exactly as sent
        else:
            entry = commands.batch([item for waiter in group for item in waiter.entry_items()])
        metrics.GROUP_COMMIT_ITEMS.observe(sum(len(waiter.entry_items()) for waiter in group))
        self._proposals_made += 1
        number = self._proposals_made
        self._in_flight[number] = (group, whole)
        self._propose(entry, lambda result, error: self._on_answer(number, result, error))

    def _on_answer(self, number: int, result: Any, error: int) -> None:
        """On the applier or the Raft loop: hand every waiter its own answer, then propose what gathered
        meanwhile. A proposal already ended by `fail_in_flight` is left as it was answered."""
        with self._lock:
            proposal = self._in_flight.pop(number, None)
        if proposal is None:
            return
        group, whole = proposal
        try:
            answer = self._translate(result, error)
        except Exception as failure:  # never raise into PySyncObj's apply loop
            logger.exception("could not read the answer to a proposal")
            answer = UnknownOutcomeError(f"unreadable answer: {failure}")
        try:
            if whole:
                group[0].settle(Answer(answer) if isinstance(answer, core_pb2.CommandResult) else answer)
            else:
                self._settle_group(group, answer)
        finally:
            with self._lock:
                self._propose_next()

    @staticmethod
    def _settle_group(group: list[Waiter], answer: core_pb2.CommandResult | LedgerError) -> None:
        """Each waiter its own items' results; an error or refusal of the whole entry is each
        one's."""
        item_count = sum(len(waiter.entry_items()) for waiter in group)
        if isinstance(answer, core_pb2.CommandResult) and answer.outcome == core_pb2.OUTCOME_OK:
            if len(answer.item_results) == item_count:
                start = 0
                for waiter in group:
                    waiter.settle(_own_answer(waiter, answer, start))
                    start += len(waiter.proposed)
                return
            answer = UnknownOutcomeError("applied, but the answer lacks its items' results")
        for waiter in group:
            if isinstance(answer, LedgerError):
                waiter.settle(answer)
            else:
                waiter.settle(Answer(answer, _expired_positions(waiter)))
