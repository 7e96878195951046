"""Auto-batching: single creates issued concurrently in one process travel together as one
batch RPC. A call with nothing in flight goes at once (a batch of one); calls that arrive while
a batch is in flight wait for it and then leave together, so batches grow with the load and
never add latency to a lone caller.

An item's timeout runs from its submission: time spent waiting for the batch in flight counts
against it, and an item whose time is up before its batch leaves is never sent (a retryable
DEADLINE_EXCEEDED, so its caller's retry policy decides). So one attempt never outlasts the
timeout it was given, however long the batch before it took."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import grpc

from ledger_cluster.limits import BATCH_ITEMS_MAX
from ledger_cluster.sdk.errors import DeadlineExceededError, LedgerApiError, ResourceExhaustedError

# Items waiting for the next batch; beyond it a call fails fast (retryably) instead of letting
# a stalled server grow this process's memory without bound.
QUEUE_ITEMS_MAX = 100_000
# One batch at a time: the next one fills while the previous one is applied.
BATCHES_IN_FLIGHT_MAX = 1
QUEUE_FULL_REASON = "CLIENT_QUEUE_FULL"
# An item whose timeout ran out while it waited for a batch: never sent, so never applied.
EXPIRED_IN_QUEUE_REASON = "CLIENT_DEADLINE_BEFORE_SEND"

Item = TypeVar("Item")
Result = TypeVar("Result")
# An item waiting for a batch: the item, its deadline (time.monotonic()), its caller's future.
Waiting = tuple[Item, float, "asyncio.Future[Result]"]
# A batch RPC answers each item with its result or its own error.
SendBatch = Callable[[list[Item], float], Awaitable[Sequence[Result | LedgerApiError]]]


class AutoBatcher(Generic[Item, Result]):
    def __init__(
        self,
        send_batch: SendBatch[Item, Result],
        batch_items_max: int = BATCH_ITEMS_MAX,
        queue_items_max: int = QUEUE_ITEMS_MAX,
    ) -> None:
        self._send_batch = send_batch
        self._batch_items_max = batch_items_max
        self._queue_items_max = queue_items_max
        self._waiting: deque[Waiting[Item, Result]] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item, timeout_seconds: float) -> Result:
        """This item's own result, or its own error raised."""
        if len(self._waiting) >= self._queue_items_max:
            raise ResourceExhaustedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                QUEUE_FULL_REASON,
                f"{self._queue_items_max} items already wait for a batch in this client",
            )
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, time.monotonic() + timeout_seconds, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._waiting and len(self._in_flight) < BATCHES_IN_FLIGHT_MAX:
            batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self._batch_items_max))]
            task = asyncio.create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._start_batches()

    @staticmethod
    def _still_wanted(batch: list[Waiting[Item, Result]], now: float) -> list[Waiting[Item, Result]]:
        """The items worth sending: an item whose time is up fails unsent, and one whose caller
        has gone (cancelled) is not sent at all."""
        for _, deadline, future in batch:
            if deadline <= now and not future.done():
                future.set_exception(
                    DeadlineExceededError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        EXPIRED_IN_QUEUE_REASON,
                        "the call's timeout ran out while it waited for the batch before it; not sent",
                    )
                )
        return [entry for entry in batch if not entry[2].done()]

    async def _send(self, batch: list[Waiting[Item, Result]]) -> None:
        now = time.monotonic()
        batch = self._still_wanted(batch, now)
        if not batch:
            return
        # The batch may take as long as its most patient member has left.
        timeout_seconds = max(deadline for _, deadline, _ in batch) - now
        try:
            outcomes: Sequence[Result | LedgerApiError] = await self._send_batch(
                [item for item, _, _ in batch], timeout_seconds
            )
        except LedgerApiError as error:
            outcomes = [error] * len(batch)
        except BaseException as error:
            for _, _, future in batch:
                if future.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(error)
            raise
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled; the item was still sent
                continue
            if isinstance(outcome, LedgerApiError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def close(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
