"""How long a server may work on a request, given the caller's deadline."""

from __future__ import annotations

import grpc

# Stop this much before the caller's deadline, so our own answer (UNAVAILABLE, OUTCOME_UNKNOWN)
# reaches the caller instead of its DEADLINE_EXCEEDED.
DEADLINE_MARGIN_FRACTION = 0.1
DEADLINE_MARGIN_SECONDS_MIN = 0.05
# grpc reports "no deadline" as an enormous remaining time; anything above this counts as none.
TIMEOUT_SECONDS_MAX = 3600.0


def work_budget_seconds(context: grpc.ServicerContext, default_seconds: float) -> float:
    remaining = context.time_remaining()
    if remaining is None or remaining > TIMEOUT_SECONDS_MAX:
        return default_seconds
    margin = max(DEADLINE_MARGIN_SECONDS_MIN, remaining * DEADLINE_MARGIN_FRACTION)
    return max(remaining - margin, 0.0)
