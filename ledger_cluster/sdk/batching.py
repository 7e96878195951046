"""Auto-batching: single creates issued concurrently in one process travel together as one
batch RPC. A call with nothing in flight goes at once (a batch of one); calls that arrive while
a batch is in flight wait for it and then leave together, so batches grow with the load and
never add latency to a lone caller."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import grpc

from ledger_cluster.limits import BATCH_ITEMS_MAX
from ledger_cluster.sdk.errors import LedgerApiError, ResourceExhaustedError

# Items waiting for the next batch; beyond it a call fails fast (retryably) instead of letting
# a stalled server grow this process's memory without bound.
QUEUE_ITEMS_MAX = 100_000
# One batch at a time: the next one fills while the previous one is applied.
BATCHES_IN_FLIGHT_MAX = 1
QUEUE_FULL_REASON = "CLIENT_QUEUE_FULL"

Item = TypeVar("Item")
Result = TypeVar("Result")
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
        self._waiting: deque[tuple[Item, float, asyncio.Future[Result]]] = deque()
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
        self._waiting.append((item, timeout_seconds, future))
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

    async def _send(self, batch: list[tuple[Item, float, asyncio.Future[Result]]]) -> None:
        # The batch may take as long as its most patient member allows.
        timeout_seconds = max(timeout for _, timeout, _ in batch)
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
