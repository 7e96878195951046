"""Coalescing per shard: writes for one shard that arrive while that shard's previous send is in
flight travel together in the next one.

A write arriving at an idle shard is sent at once (no timer), so a lone caller sees no added
delay; under load, each node call (or, standalone, each LMDB write transaction) carries every
write that gathered meanwhile, up to COALESCE_ITEMS_MAX items and COALESCE_BYTES_MAX bytes. This
covers unary calls and the items of batch calls alike, from every caller. Each caller gets back
exactly the answers of its own items, in order.

A request whose deadline passes while it waits is never sent; its caller hears "not applied".
A request that was sent and then outlived by its deadline, or whose send failed unexpectedly,
gets OUTCOME_UNKNOWN for each of its items: it may still apply, and only its own items are
affected.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ledger_cluster import metrics
from ledger_cluster.core.commands import ItemAnswer
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    QueueFullError,
    UnknownOutcomeError,
)
from ledger_cluster.limits import BATCH_ITEMS_MAX

logger = logging.getLogger(__name__)

# What one send carries at most. Items: what one log entry holds (the core refuses more).
# Bytes: well below the node's 16 MiB message limit; the largest batch call a gateway accepts
# (1000 items of at most about 1.2 KiB) is far smaller, so a request is never split.
COALESCE_ITEMS_MAX = BATCH_ITEMS_MAX
COALESCE_BYTES_MAX = 4 * 1024 * 1024
# Items waiting for one shard's next send; beyond it, a new request is refused (SHARD_BUSY).
WAITING_ITEMS_MAX = 100_000
# A caller whose write is in a send in flight waits this long past its own deadline for the
# send's answer, then hears OUTCOME_UNKNOWN. A send lasts until the latest deadline among its
# writes (the node drops each one unproposed when its own time runs out, but answers them all
# at once), so a short deadline sent along with longer ones ends unknown rather than waiting.
ANSWER_GRACE_SECONDS = 0.02

# Sends one shard's coalesced commands (each one core command, never a batch), each with its
# caller's deadline; answers one item per command, in order.
Send = Callable[[list[bytes], list[Deadline]], Awaitable[Sequence[ItemAnswer]]]


@dataclass(slots=True)
class _Request:
    commands: list[bytes]
    deadline: Deadline
    answer: asyncio.Future[list[ItemAnswer]]
    size_bytes: int
    sent: bool = field(default=False)


class ShardCoalescer:
    """One shard's queue of writes and its one send in flight. Lives on the event loop's
    thread."""

    def __init__(self, shard_id: str, send: Send) -> None:
        self.shard_id = shard_id
        self._send = send
        self._waiting: deque[_Request] = deque()
        self._waiting_items = 0
        self._drain_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def waiting_items(self) -> int:
        """Items queued for the next send."""
        return self._waiting_items

    @property
    def sending(self) -> bool:
        """Whether a send is in flight (or about to start)."""
        return self._drain_task is not None

    async def submit(self, commands: list[bytes], deadline: Deadline) -> list[ItemAnswer]:
        """Send `commands` with the next send of this shard; one answer per command, in order.
        Raises QueueFullError or BackendUnavailableError (nothing applied) when it is refused
        outright."""
        if self._closed:
            raise BackendUnavailableError("the gateway is shutting down; nothing applied")
        if self._waiting_items + len(commands) > WAITING_ITEMS_MAX:
            raise QueueFullError(
                f"shard {self.shard_id} already has {self._waiting_items} writes waiting; nothing applied"
            )
        loop = asyncio.get_running_loop()
        request = _Request(commands, deadline, loop.create_future(), sum(map(len, commands)))
        self._waiting.append(request)
        self._waiting_items += len(commands)
        if self._drain_task is None:
            self._drain_task = loop.create_task(self._drain(), name=f"coalescer-{self.shard_id}")
        # One timer instead of a waiter task per call: this is every write's path.
        timer = loop.call_at(deadline.monotonic_seconds, self._expire, request)
        try:
            return await request.answer
        except asyncio.CancelledError:
            # The caller's call was cancelled: a write still queued is skipped by the drain.
            request.answer.cancel()
            raise
        finally:
            timer.cancel()

    def _expire(self, request: _Request) -> None:
        """At the caller's deadline: a write still queued is answered "not applied" (and never
        sent); one in flight gets a moment more, since its send ends at the deadline too."""
        if request.answer.done():
            return
        if not request.sent:
            request.answer.set_exception(
                BackendTimeoutError(
                    f"shard {self.shard_id}: the deadline passed while the write waited; not applied"
                )
            )
            return
        asyncio.get_running_loop().call_later(ANSWER_GRACE_SECONDS, self._give_up, request)

    def _give_up(self, request: _Request) -> None:
        if not request.answer.done():
            request.answer.set_exception(
                UnknownOutcomeError(
                    f"shard {self.shard_id}: no answer before the deadline; the write may still apply"
                )
            )

    def _take(self) -> list[_Request]:
        """The next send's requests: the oldest waiting ones, up to the item and byte bounds.
        Requests whose caller left are dropped, and those whose deadline passed are answered
        "not applied"; neither is ever sent."""
        taken: list[_Request] = []
        items = 0
        size_bytes = 0
        while self._waiting:
            request = self._waiting[0]
            fits = items + len(request.commands) <= COALESCE_ITEMS_MAX
            fits = fits and size_bytes + request.size_bytes <= COALESCE_BYTES_MAX
            if taken and not fits:
                break
            self._waiting.popleft()
            self._waiting_items -= len(request.commands)
            if request.answer.done():
                continue  # its caller left, or its deadline passed: never sent
            if request.deadline.expired():
                self._expire(request)
                continue
            request.sent = True
            taken.append(request)
            items += len(request.commands)
            size_bytes += request.size_bytes
        return taken

    async def _drain(self) -> None:
        try:
            while self._waiting:
                taken = self._take()
                if taken:
                    await self._send_and_answer(taken)
        finally:
            self._drain_task = None

    async def _send_and_answer(self, taken: list[_Request]) -> None:
        commands = [command for request in taken for command in request.commands]
        deadlines = [request.deadline for request in taken for _ in request.commands]
        metrics.COALESCED_ITEMS.observe(len(commands))
        answers: Sequence[ItemAnswer]
        try:
            answers = await self._send(commands, deadlines)
            if len(answers) != len(commands):
                raise UnknownOutcomeError(f"{len(answers)} answers to {len(commands)} writes")
        except asyncio.CancelledError:
            # Shutting down mid-send: the writes may still apply; their callers hear so now.
            unknown = UnknownOutcomeError("the gateway stopped mid-send; the write may still apply")
            self._answer(taken, [unknown] * len(commands))
            raise
        except (BackendUnavailableError, BackendTimeoutError, UnknownOutcomeError) as error:
            answers = [error] * len(commands)  # the send knows what became of all of them
        except Exception as error:
            # Never a whole-call failure: only these requests' items are in doubt, each of them
            # "unknown" (it may have applied), and the other shards' sends are unaffected.
            logger.exception("shard %s: sending %d writes failed", self.shard_id, len(commands))
            unknown = UnknownOutcomeError(f"shard {self.shard_id}: {type(error).__name__}: {error}")
            answers = [unknown] * len(commands)
        self._answer(taken, answers)

    @staticmethod
    def _answer(taken: list[_Request], answers: Sequence[ItemAnswer]) -> None:
        """Each request its own slice of the answers, in order."""
        start = 0
        for request in taken:
            end = start + len(request.commands)
            if not request.answer.done():
                request.answer.set_result(list(answers[start:end]))
            start = end

    async def close(self) -> None:
        """Refuse new writes, fail those still waiting (never sent), and stop the send in
        flight; its callers hear OUTCOME_UNKNOWN."""
        self._closed = True
        while self._waiting:
            request = self._waiting.popleft()
            if not request.answer.done():
                request.answer.set_exception(
                    BackendUnavailableError("the gateway is shutting down; nothing applied")
                )
        self._waiting_items = 0
        task = self._drain_task
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=ANSWER_GRACE_SECONDS)
