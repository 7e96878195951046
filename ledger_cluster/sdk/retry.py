"""When and how long the SDK retries: only statuses after which the identical request is safe
(the same request id for creates; settle and cancel are safe to repeat by their rules), with
exponential backoff and full jitter, within one overall deadline per operation."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ledger_cluster.sdk.errors import LedgerApiError

DEFAULT_CALL_TIMEOUT_SECONDS = 5.0
DEFAULT_RETRY_DEADLINE_SECONDS = 30.0
# docs/api.md suggests starting around 50-100 ms, so a shard that is electing a leader (about
# a second) is asked a handful of times, not hundreds.
DEFAULT_BACKOFF_INITIAL_SECONDS = 0.05
DEFAULT_BACKOFF_MAX_SECONDS = 2.0
BACKOFF_MULTIPLIER = 2.0
# Below this much time left, another attempt could not finish: give up with the last error.
ATTEMPT_SECONDS_MIN = 0.01

Result = TypeVar("Result")


@dataclass(frozen=True)
class RetryPolicy:
    call_timeout_seconds: float = DEFAULT_CALL_TIMEOUT_SECONDS
    retry_deadline_seconds: float = DEFAULT_RETRY_DEADLINE_SECONDS
    backoff_initial_seconds: float = DEFAULT_BACKOFF_INITIAL_SECONDS
    backoff_max_seconds: float = DEFAULT_BACKOFF_MAX_SECONDS

    def backoff_seconds(self, attempt: int) -> float:
        """Full jitter: many clients that failed together do not retry together."""
        ceiling = min(self.backoff_max_seconds, self.backoff_initial_seconds * BACKOFF_MULTIPLIER**attempt)
        return random.uniform(0.0, ceiling)

    async def run(self, attempt: Callable[[float], Awaitable[Result]]) -> Result:
        """Call `attempt(timeout_seconds)` until it returns, raises an error that is not
        retryable, or the overall deadline leaves no room for another attempt."""
        deadline = time.monotonic() + self.retry_deadline_seconds
        attempt_number = 0
        while True:
            remaining_seconds = deadline - time.monotonic()
            try:
                return await attempt(min(self.call_timeout_seconds, remaining_seconds))
            except LedgerApiError as error:
                if not error.retryable:
                    raise
                pause_seconds = self.backoff_seconds(attempt_number)
                if deadline - time.monotonic() - pause_seconds < ATTEMPT_SECONDS_MIN:
                    raise
            attempt_number += 1
            await asyncio.sleep(pause_seconds)
