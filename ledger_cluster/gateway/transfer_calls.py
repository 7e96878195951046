"""The transfer methods of the public service (docs/transfers.md): the debit shard first, then,
for a transfer across shards, the credit shard on the call's path, and the finish on the debit
shard after the reply. A call that cannot finish leaves the transfer listed on its debit shard,
whose driver finishes it; a retry with the same request_id returns its end."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core import commands
from ledger_cluster.core.commands import ItemAnswer
from ledger_cluster.core.records import (
    CANCELLED,
    DEBIT_LEG,
    OWED_WORK,
    TransactionRecord,
    decode_account,
    decode_transaction,
)
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import LedgerError
from ledger_cluster.gateway import views
from ledger_cluster.gateway.outcomes import (
    OUTCOME_UNKNOWN_REASON,
    backend_error,
    transfer_item_error,
    transfer_outcome_error,
)
from ledger_cluster.gateway.validation import (
    account_id_of,
    check_create_transfer,
    check_transfer_settle_amount,
    metadata_of,
    transfer_id_of,
)
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.status import ApiError
from ledger_cluster.transfer_flow import (
    ShardApi,
    Step,
    TransferStepError,
    Unfinished,
    finish_on_debit_shard,
    take_credit_steps,
    update_by_shard,
)

logger = logging.getLogger(__name__)

# Credit accounts whose currency this gateway has read. An account's currency never changes and
# an account is never deleted, so an entry never goes stale; the bound keeps memory flat.
CURRENCY_CACHE_MAX = 100_000
# Finishes sent after the reply, at once; beyond it the reply waits for its finish.
FINISH_TIMEOUT_SECONDS = 5.0
# Finishes of answered transfers wait this long, or until this many wait, to be sent together.
FINISH_DELAY_SECONDS = 0.05
FINISHES_UNSENT_MAX = 1000
ID_ATTEMPTS_MAX = 4


def _outcome_unknown(message: str, debit_leg: TransactionRecord | None = None) -> ApiError:
    """The transfer may be under way: the cluster finishes it. When its debit leg is known, the
    error names the transfer, so a caller without a request_id can read its end."""
    metadata = {}
    if debit_leg is not None:
        metadata["transfer_id"] = views.transfer_id_of(debit_leg)
        message = f"{message} (transfer {metadata['transfer_id']})"
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        OUTCOME_UNKNOWN_REASON,
        f"{message}; the cluster finishes the transfer by itself: retry with the same request_id"
        " (or read it with GetTransfer) to learn its end",
        metadata,
    )


@dataclass(slots=True)
class _Pending:
    """One CreateTransfer of a call, on its way: `end` is set once its answer is known."""

    request: ledger_pb2.CreateTransferRequest
    debit_account_id: int
    credit_account_id: int
    currency: str = ""
    debit_leg: TransactionRecord | None = None
    metadata: bytes = b""
    end: ledger_pb2.Transfer | ApiError | None = None


class TransferCalls:
    def __init__(
        self,
        backend: ShardApi,
        clock_ns: Callable[[], int],
        new_transaction_number: Callable[[int], int],
    ) -> None:
        self._backend = backend
        self._clock_ns = clock_ns
        self._new_number = new_transaction_number
        self._currencies: OrderedDict[int, str] = OrderedDict()
        self._finishing: set[asyncio.Task[list[ItemAnswer]]] = set()
        self._unsent_finishes: list[Step] = []
        self._finish_timer: asyncio.TimerHandle | None = None

    # -- reads --

    async def _credit_currency(self, account_id: int, deadline: Deadline) -> str:
        """The credit account's currency; NOT_FOUND (side credit) when it does not exist."""
        known = self._currencies.get(account_id)
        if known is not None:
            return known
        query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id))
        shard_id = self._backend.shard_id(account_id)
        try:
            result = await self._backend.read_shard(shard_id, query, False, deadline)
            if result.outcome == core_pb2.OUTCOME_ACCOUNT_NOT_FOUND:
                # A leader elected a moment ago may not have applied the account's creation yet:
                # only a read through the log may say it does not exist.
                result = await self._backend.read_shard(shard_id, query, True, deadline)
        except LedgerError as error:
            raise backend_error(error) from None
        if result.outcome == core_pb2.OUTCOME_ACCOUNT_NOT_FOUND:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "credit account not found", {"side": "credit"}
            )
        refusal = transfer_outcome_error(result.outcome, result.message)
        if refusal is not None:
            raise refusal
        currency = decode_account(result.account).currency
        self._currencies[account_id] = currency
        if len(self._currencies) > CURRENCY_CACHE_MAX:
            self._currencies.popitem(last=False)
        return currency

    async def get(self, transfer_id: str, consistent: bool, deadline: Deadline) -> ledger_pb2.Transfer:
        wanted = transfer_id_of(transfer_id)
        query = core_pb2.ReadQuery(
            get_transaction=core_pb2.GetTransactionQuery(
                account_id=wanted.account_id, transaction_number=wanted.transaction_number
            )
        )
        try:
            result = await self._backend.read_shard(
                self._backend.shard_id(wanted.account_id), query, consistent, deadline
            )
        except LedgerError as error:
            raise backend_error(error) from None
        refusal = transfer_outcome_error(result.outcome, result.message, transfer_id=transfer_id)
        if refusal is not None:
            raise refusal
        leg = decode_transaction(result.transaction)
        if not leg.flags & DEBIT_LEG:
            raise ApiError(grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND", "no transfer has this id")
        return views.transfer_message(leg, result.metadata)

    # -- writes --

    async def create(
        self, request: ledger_pb2.CreateTransferRequest, deadline: Deadline
    ) -> ledger_pb2.Transfer:
        (end,) = await self._create([request], deadline)
        if isinstance(end, ApiError):
            raise end
        return end

    async def create_many(
        self, requests: Sequence[ledger_pb2.CreateTransferRequest], deadline: Deadline
    ) -> list[ledger_pb2.TransferResult]:
        return [
            transfer_item_error(end) if isinstance(end, ApiError) else ledger_pb2.TransferResult(transfer=end)
            for end in await self._create(requests, deadline)
        ]

    async def _create(
        self, requests: Sequence[ledger_pb2.CreateTransferRequest], deadline: Deadline
    ) -> list[ledger_pb2.Transfer | ApiError]:
        now = self._clock_ns()
        pending = []
        for request in requests:
            item = _Pending(request, 0, 0)
            try:
                item.debit_account_id = account_id_of(request.debit_account_id)
                item.credit_account_id = account_id_of(request.credit_account_id)
                check_create_transfer(request, item.debit_account_id, item.credit_account_id)
            except ApiError as error:
                item.end = error
            pending.append(item)
        await self._read_currencies([item for item in pending if item.end is None], deadline)
        await self._debit([item for item in pending if item.end is None], now, deadline)
        owing = [item for item in pending if item.end is None]
        await self._complete(owing, deadline)
        return [item.end if item.end is not None else _outcome_unknown("not answered") for item in pending]

    async def _read_currencies(self, pending: list[_Pending], deadline: Deadline) -> None:
        """Cross-shard items need the credit account's currency before the debit (the credit side
        can then never refuse for a static reason). Same-shard items are checked by the core.
        Known currencies are taken from the cache here: a task per item costs more than the item."""
        missing: dict[int, list[_Pending]] = {}
        for item in pending:
            if self._backend.shard_id(item.debit_account_id) == self._backend.shard_id(
                item.credit_account_id
            ):
                continue
            known = self._currencies.get(item.credit_account_id)
            if known is None:
                missing.setdefault(item.credit_account_id, []).append(item)
            else:
                item.currency = known

        async def read(account_id: int, items: list[_Pending]) -> None:
            try:
                currency = await self._credit_currency(account_id, deadline)
            except ApiError as error:
                for item in items:
                    item.end = error
                return
            for item in items:
                item.currency = currency

        if missing:
            await asyncio.gather(*(read(account_id, items) for account_id, items in missing.items()))

    async def _debit(self, pending: list[_Pending], now: int, deadline: Deadline) -> None:
        """Each debit shard's items in one update; items whose number was taken draw again.
        Sets each item's end, or leaves its debit leg for `_complete` when work is owed."""
        waiting = pending
        for _ in range(ID_ATTEMPTS_MAX):
            if not waiting:
                return
            requests = [
                (self._backend.shard_id(item.debit_account_id), [self._debit_command(item, now)])
                for item in waiting
            ]
            collided = []
            for item, (answer,) in zip(
                waiting, await update_by_shard(self._backend, requests, deadline), strict=True
            ):
                if isinstance(answer, LedgerError):
                    item.end = backend_error(answer)
                elif answer.outcome == core_pb2.OUTCOME_TRANSACTION_ID_COLLISION:
                    collided.append(item)
                else:
                    self._take_debit_answer(item, answer)
            waiting = collided
        for item in waiting:
            item.end = ApiError(grpc.StatusCode.ABORTED, "ID_COLLISION", "no free transfer id")

    @staticmethod
    def _take_debit_answer(item: _Pending, answer: core_pb2.CommandResult) -> None:
        if answer.outcome != core_pb2.OUTCOME_OK:
            item.end = transfer_outcome_error(answer.outcome, answer.message)
            return
        leg = decode_transaction(answer.transaction)
        if leg.flags & OWED_WORK:
            item.debit_leg, item.metadata = leg, answer.metadata
        else:
            item.end = views.transfer_message(leg, answer.metadata)

    def _debit_command(self, item: _Pending, now: int) -> bytes:
        request = item.request
        return commands.create_transfer(
            debit_account_id=item.debit_account_id,
            transfer_number=self._new_number(now),
            credit_account_id=item.credit_account_id,
            amount=request.amount,
            description=request.description,
            settled=request.settled,
            request_id=request.request_id,
            now=now,
            currency=item.currency,
            metadata=metadata_of(request.metadata),
            timeout_seconds=request.timeout_seconds,
        )

    async def _complete(self, owing: list[_Pending], deadline: Deadline) -> None:
        if not owing:
            return
        unfinished = []
        for item in owing:
            assert item.debit_leg is not None  # set for every item without an end
            unfinished.append(Unfinished(item.debit_leg, item.metadata, item.currency))
        ends = await self.finish(unfinished, deadline)
        for item, end in zip(owing, ends, strict=True):
            item.end = end

    async def finish(
        self, unfinished: list[Unfinished], deadline: Deadline
    ) -> list[ledger_pb2.Transfer | ApiError]:
        """The credit shard's part of each transfer, then D's finish: after the reply for
        transfers C took, before it for those C refused (their debit is reversed first)."""
        now = self._clock_ns()
        steps = await take_credit_steps(self._backend, unfinished, now, deadline)
        ends: list[ledger_pb2.Transfer | ApiError] = []
        taken: list[Step] = []
        refused: list[tuple[int, Step]] = []
        for index, step in enumerate(steps):
            if isinstance(step, TransferStepError):
                ends.append(
                    _outcome_unknown(f"the credit shard did not answer ({step})", unfinished[index].debit_leg)
                )
                continue
            credit = decode_transaction(step.credit_leg) if step.credit_leg else None
            if step.refusal or (credit is not None and credit.initial_status == CANCELLED):
                refused.append((index, step))
                ends.append(_outcome_unknown("refused"))  # replaced below
                continue
            taken.append(step)
            assert credit is not None
            ends.append(
                views.transfer_message(
                    step.unfinished.debit_leg, step.unfinished.metadata, credit.transaction_number
                )
            )
        if refused:
            await self._reverse(refused, ends, now, deadline)
        if taken:
            self._finish_later(taken)
        return ends

    async def _reverse(
        self,
        refused: list[tuple[int, Step]],
        ends: list[ledger_pb2.Transfer | ApiError],
        now: int,
        deadline: Deadline,
    ) -> None:
        try:
            answers = await finish_on_debit_shard(self._backend, [step for _, step in refused], now, deadline)
        except LedgerError as error:
            answers = [error] * len(refused)
        for (index, step), answer in zip(refused, answers, strict=True):
            if isinstance(answer, LedgerError) or answer.outcome != core_pb2.OUTCOME_OK:
                ends[index] = _outcome_unknown(
                    "the credit shard refused the credit; its reversal is under way",
                    step.unfinished.debit_leg,
                )
                continue
            if step.refusal:
                ends[index] = transfer_outcome_error(
                    step.refusal, "the credit shard refused the credit leg"
                ) or _outcome_unknown("refused")
            else:
                ends[index] = ApiError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "BALANCE_OVERFLOW",
                    "the credit account's balance would exceed int64",
                )

    def _finish_later(self, steps: list[Step]) -> None:
        """Finishes wait up to FINISH_DELAY_SECONDS to travel with others: they answer nobody,
        and each one sent alone is a log entry on three replicas that the next calls queue
        behind."""
        self._unsent_finishes.extend(steps)
        if len(self._unsent_finishes) >= FINISHES_UNSENT_MAX:
            self._send_finishes()
        elif self._finish_timer is None:
            self._finish_timer = asyncio.get_running_loop().call_later(
                FINISH_DELAY_SECONDS, self._send_finishes
            )

    def _send_finishes(self) -> None:
        if self._finish_timer is not None:
            self._finish_timer.cancel()
            self._finish_timer = None
        steps, self._unsent_finishes = self._unsent_finishes, []
        # One call of CreateTransfers may add up to BATCH_ITEMS_MAX at once to an almost full
        # list: sent whole, a debit shard's part could pass the items one command may hold.
        for start in range(0, len(steps), FINISHES_UNSENT_MAX):
            task = asyncio.get_running_loop().create_task(
                finish_on_debit_shard(
                    self._backend,
                    steps[start : start + FINISHES_UNSENT_MAX],
                    self._clock_ns(),
                    Deadline.after(FINISH_TIMEOUT_SECONDS),
                )
            )
            self._finishing.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[list[ItemAnswer]]) -> None:
        self._finishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.info("a transfer finish failed; the driver takes it: %s", task.exception())

    async def resolve(
        self, transfer_id: str, settle: bool, amount: int, deadline: Deadline
    ) -> ledger_pb2.Transfer:
        wanted = transfer_id_of(transfer_id)
        if settle:
            check_transfer_settle_amount(amount)
        command = commands.resolve_transfer(
            wanted.account_id, wanted.transaction_number, settle, amount, self._clock_ns()
        )
        try:
            (answer,) = await self._backend.update(
                self._backend.shard_id(wanted.account_id), [command], deadline
            )
        except LedgerError as error:
            raise backend_error(error) from None
        if isinstance(answer, LedgerError):
            raise backend_error(answer)
        refusal = transfer_outcome_error(answer.outcome, answer.message, transfer_id=transfer_id)
        if refusal is not None:
            raise refusal
        leg = decode_transaction(answer.transaction)
        if not leg.flags & OWED_WORK:
            return views.transfer_message(leg, answer.metadata)
        currency = await self._credit_currency(leg.counterparty_account_id, deadline)
        (end,) = await self.finish([Unfinished(leg, answer.metadata, currency)], deadline)
        if isinstance(end, ApiError):
            raise end
        return end

    async def close(self) -> None:
        self._send_finishes()
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=FINISH_TIMEOUT_SECONDS)
