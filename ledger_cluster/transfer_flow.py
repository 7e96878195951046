"""Finishing cross-shard transfers (docs/transfers.md): the steps after the debit shard D
stored a debit leg that owes its credit shard C work, taken by the gateway on the call's path
and by the driver on D's leader for everything left unfinished.

Every step is an idempotent core command built from stored state, so the gateway and any
number of drivers may take the same step at once: C's log decides the credit leg, D's log
decides the transfer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ledger_cluster.core import AccountsCore, commands, tables
from ledger_cluster.core.commands import ItemAnswer
from ledger_cluster.core.records import (
    CREDIT_OWED,
    EXPIRED,
    RESOLVE_OWED,
    TransactionRecord,
    decode_account,
    decode_metadata,
    decode_transaction,
)
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import LedgerError
from ledger_cluster.internal.v1 import core_pb2

logger = logging.getLogger(__name__)

# How often a driver looks for unfinished transfers and due deadlines on the shards it leads.
DRIVE_PERIOD_SECONDS = 0.5
# Rounds between two reads of the unfinished transfers (expiries are looked for every round).
DRIVE_WORK_EVERY_ROUNDS = 2
# A transfer this young is left to the gateway that is finishing it on the call's path (under
# load its finish may queue for a second or more; a shorter grace doubles the work).
DRIVE_GRACE_SECONDS = 3.0
# Unfinished transfers read per page, and pages read per shard per round (the rest wait for the
# next round).
TRANSFER_WORK_PAGE_MAX = 500
TRANSFER_WORK_PAGES_MAX = 20
DRIVE_CALL_TIMEOUT_SECONDS = 5.0
# An answer of C that means it will never store this credit leg: D reverses the debit.
REFUSALS = frozenset(
    {
        core_pb2.OUTCOME_CREDIT_ACCOUNT_NOT_FOUND,
        core_pb2.OUTCOME_ACCOUNT_NOT_FOUND,
        core_pb2.OUTCOME_CURRENCY_MISMATCH,
        core_pb2.OUTCOME_TRANSACTION_ID_COLLISION,
        core_pb2.OUTCOME_INVALID_COMMAND,
    }
)


class ShardApi(Protocol):
    def shard_id(self, account_id: int) -> str: ...

    async def update(self, shard_id: str, items: list[bytes], deadline: Deadline) -> list[ItemAnswer]: ...

    async def read_shard(
        self, shard_id: str, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult: ...


class TransferStepError(LedgerError):
    """A step's outcome is unknown or it was not taken (no leader, timeout): the transfer stays
    listed on D, and a driver takes the step again."""


@dataclass(slots=True)
class Unfinished:
    """A debit leg that owes its credit shard work, with what the credit leg is built from."""

    debit_leg: TransactionRecord
    metadata: bytes
    currency: str


@dataclass(slots=True)
class Step:
    """What C answered for one unfinished transfer: its credit leg, or the refusal."""

    unfinished: Unfinished
    credit_leg: bytes = b""
    refusal: core_pb2.Outcome.ValueType = core_pb2.OUTCOME_UNSPECIFIED


def commands_for_credit_shard(unfinished: Unfinished, now: int) -> list[bytes]:
    """In order: the credit leg if it is owed, then the leg's resolution if the debit leg is
    final (C applies them in this order, in one entry when they travel together)."""
    leg = unfinished.debit_leg
    items = []
    if leg.flags & CREDIT_OWED:
        metadata = decode_metadata(unfinished.metadata) if unfinished.metadata else ()
        items.append(commands.credit_leg_of(leg, metadata, unfinished.currency, now))
    if leg.flags & RESOLVE_OWED:  # set only on a final debit leg
        items.append(commands.resolve_leg_of(leg, now))
    return items


def _step_of(unfinished: Unfinished, answers: Sequence[ItemAnswer]) -> Step:
    step = Step(unfinished)
    for answer in answers:
        if isinstance(answer, LedgerError):
            raise TransferStepError(f"credit shard: {answer}")
        if answer.outcome == core_pb2.OUTCOME_OK:
            step.credit_leg = answer.transaction
        elif answer.outcome in REFUSALS and unfinished.debit_leg.flags & CREDIT_OWED:
            step.refusal = answer.outcome
            return step
        else:
            outcome = core_pb2.Outcome.Name(answer.outcome)
            raise TransferStepError(f"credit shard answered {outcome}: {answer.message}")
    return step


async def update_by_shard(
    api: ShardApi, requests: Sequence[tuple[str, list[bytes]]], deadline: Deadline
) -> list[list[ItemAnswer]]:
    """Each request's commands sent to its shard, all of one shard's in one update; the answers
    of each request, in order (a whole update that fails answers each of its commands so)."""
    by_shard: dict[str, list[int]] = {}
    for index, (shard_id, _) in enumerate(requests):
        by_shard.setdefault(shard_id, []).append(index)
    answers: list[list[ItemAnswer]] = [[] for _ in requests]

    async def send(shard_id: str, indexes: list[int]) -> None:
        flat = [command for index in indexes for command in requests[index][1]]
        sent: Sequence[ItemAnswer]
        try:
            sent = await api.update(shard_id, flat, deadline)
        except LedgerError as error:
            sent = [error] * len(flat)
        position = 0
        for index in indexes:
            count = len(requests[index][1])
            answers[index] = list(sent[position : position + count])
            position += count

    await asyncio.gather(*(send(shard_id, indexes) for shard_id, indexes in by_shard.items()))
    return answers


async def take_credit_steps(
    api: ShardApi, unfinished: Sequence[Unfinished], now: int, deadline: Deadline
) -> list[Step | TransferStepError]:
    """C's part of each transfer, one update per credit shard for all of them."""
    requests = [
        (api.shard_id(item.debit_leg.counterparty_account_id), commands_for_credit_shard(item, now))
        for item in unfinished
    ]
    results: list[Step | TransferStepError] = []
    for item, answers in zip(unfinished, await update_by_shard(api, requests, deadline), strict=True):
        try:
            results.append(_step_of(item, answers))
        except TransferStepError as error:
            results.append(error)
    return results


def finish_command(step: Step, now: int) -> bytes:
    leg = step.unfinished.debit_leg
    return commands.finish_transfer(
        leg.account_id, leg.transaction_number, step.credit_leg, step.refusal, now
    )


async def finish_on_debit_shard(
    api: ShardApi, steps: Sequence[Step], now: int, deadline: Deadline
) -> list[ItemAnswer]:
    """D records C's answers: one update per debit shard; answers in the order of `steps`."""
    requests = [
        (api.shard_id(step.unfinished.debit_leg.account_id), [finish_command(step, now)]) for step in steps
    ]
    return [answers[0] for answers in await update_by_shard(api, requests, deadline)]


# -- the driver --------------------------------------------------------------------------------


class LocalShard:
    """A shard whose core is in this process, as the driver sees it: it acts on the shard only
    while `is_leader` says this process leads it."""

    def __init__(self, shard_id: str, core: AccountsCore, is_leader: Callable[[], bool]) -> None:
        self.shard_id = shard_id
        self.is_leader = is_leader
        self.read = core.read
        self.earliest_deadline = core.earliest_deadline


class TransferDriver:
    """On each shard this process leads, every DRIVE_PERIOD_SECONDS: propose ExpireDue once the
    earliest deadline has passed by this clock (the entry carries the time, so every replica
    expires the same transactions), and finish the transfers that owe work and that the
    gateway has not finished within DRIVE_GRACE_SECONDS."""

    def __init__(
        self,
        api: ShardApi,
        shards: Callable[[], Sequence[LocalShard]],
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._api = api
        self._shards = shards
        self._clock_ns = clock_ns
        self._task: asyncio.Task[None] | None = None
        self._rounds = -1  # the first round reads the unfinished transfers too

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="transfer-driver")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.drive_once()
            except Exception:  # the driver must outlive any one bad round
                logger.exception("transfer driver round failed")
            await asyncio.sleep(DRIVE_PERIOD_SECONDS)

    async def drive_once(self) -> int:
        """One round over the shards led here; returns how many transfers it finished. Every
        round proposes due expiries; every DRIVE_WORK_EVERY_ROUNDS-th also reads the
        unfinished transfers (they wait DRIVE_GRACE_SECONDS for their gateway anyway)."""
        finished = 0
        self._rounds += 1
        reads_work = self._rounds % DRIVE_WORK_EVERY_ROUNDS == 0
        for shard in self._shards():
            if not shard.is_leader():
                continue
            await self._expire(shard)
            if reads_work:
                finished += await self._finish_unfinished(shard)
        return finished

    async def _expire(self, shard: LocalShard) -> None:
        now = self._clock_ns()
        deadline = shard.earliest_deadline()
        if deadline is None or deadline > now:
            return
        answers = await self._api.update(shard.shard_id, [commands.expire_due(now)], _deadline())
        if isinstance(answers[0], LedgerError):
            logger.info("shard %s: expiry not proposed: %s", shard.shard_id, answers[0])

    async def _finish_unfinished(self, shard: LocalShard) -> int:
        """The transfers past their grace, a page at a time (under load most listed ones are
        young: their gateway is finishing them), at most TRANSFER_WORK_PAGES_MAX pages."""
        finished = 0
        after_key = b""
        for _ in range(TRANSFER_WORK_PAGES_MAX):
            query = core_pb2.ReadQuery(
                transfer_work=core_pb2.TransferWorkQuery(limit=TRANSFER_WORK_PAGE_MAX, after_key=after_key)
            )
            # On the loop: one LMDB read view, shorter than a thread hop (mostly an empty table).
            work = shard.read(query)
            finished += await self._finish_page(shard, work)
            if len(work.transactions) < TRANSFER_WORK_PAGE_MAX:
                break
            last = decode_transaction(work.transactions[-1])
            after_key = tables.transaction_key(last.account_id, last.transaction_number)
        return finished

    async def _finish_page(self, shard: LocalShard, work: core_pb2.ReadResult) -> int:
        now = self._clock_ns()
        grace_ns = int(DRIVE_GRACE_SECONDS * 1e9)
        unfinished = []
        currencies: dict[int, str] = {}
        for data, metadata in zip(work.transactions, work.metadatas, strict=True):
            leg = decode_transaction(data)
            # An expiry owes its credit shard work that no gateway is doing: no grace for it.
            young = now - leg.updated_at < grace_ns and now - leg.created_at < grace_ns
            if young and leg.status != EXPIRED:
                continue
            if leg.account_id not in currencies:
                currencies[leg.account_id] = await self._currency_of(shard, leg.account_id)
            unfinished.append(Unfinished(leg, metadata, currencies[leg.account_id]))
        if not unfinished:
            return 0
        deadline = _deadline()
        results = await take_credit_steps(self._api, unfinished, now, deadline)
        steps = [result for result in results if isinstance(result, Step)]
        for result in results:
            if isinstance(result, TransferStepError):
                logger.info("shard %s: a transfer stays unfinished: %s", shard.shard_id, result)
        answers = await finish_on_debit_shard(self._api, steps, now, deadline)
        return sum(1 for answer in answers if not isinstance(answer, LedgerError))

    async def _currency_of(self, shard: LocalShard, account_id: int) -> str:
        query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id))
        result = shard.read(query)  # one small read: on the loop, like the work listing
        return decode_account(result.account).currency if result.outcome == core_pb2.OUTCOME_OK else ""


def _deadline() -> Deadline:
    return Deadline.after(DRIVE_CALL_TIMEOUT_SECONDS)
