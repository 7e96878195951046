"""One absolute deadline per call.

A server turns its caller's remaining time into a `Deadline` once, when the call arrives, and
hands that same object down every layer (coalescer, cluster client, node, replica), so no layer
restarts the clock or waits past what the caller allowed. Between processes the deadline
travels the way gRPC carries it, as the time left when a request is sent, and the receiver
turns it back into a `Deadline` of its own clock at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Stop this much before the caller's deadline, so our own answer (UNAVAILABLE, OUTCOME_UNKNOWN)
# reaches the caller instead of its DEADLINE_EXCEEDED.
DEADLINE_MARGIN_FRACTION = 0.1
DEADLINE_MARGIN_SECONDS_MIN = 0.05
# grpc reports "no deadline" as an enormous remaining time; anything above this counts as none.
TIMEOUT_SECONDS_MAX = 3600.0
# A write's remaining time travels to the node in whole microseconds.
MICROSECONDS_PER_SECOND = 1_000_000


@dataclass(frozen=True, slots=True, order=True)
class Deadline:
    """A point on this process's monotonic clock."""

    monotonic_seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + max(seconds, 0.0))

    def remaining_seconds(self) -> float:
        return max(self.monotonic_seconds - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return time.monotonic() >= self.monotonic_seconds

    def earlier(self, seconds: float) -> Deadline:
        """This deadline or `seconds` from now, whichever comes first."""
        return Deadline(min(self.monotonic_seconds, time.monotonic() + seconds))


def work_deadline(time_remaining_seconds: float | None, default_seconds: float) -> Deadline:
    """When a server must have answered, given what its caller allowed (`time_remaining()` of
    a gRPC context, None or huge for "no deadline")."""
    if time_remaining_seconds is None or time_remaining_seconds > TIMEOUT_SECONDS_MAX:
        return Deadline.after(default_seconds)
    margin = max(DEADLINE_MARGIN_SECONDS_MIN, time_remaining_seconds * DEADLINE_MARGIN_FRACTION)
    return Deadline.after(time_remaining_seconds - margin)
