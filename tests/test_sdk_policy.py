"""The SDK's fast tier: error classification, the retry policy and the batcher's bounds, with
no server (the behaviour against a real server is in tests/test_sdk.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.errors import LedgerError
from ledger_cluster.sdk import (
    AccountNotFoundError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LedgerApiError,
    NotPendingError,
    OutcomeUnknownError,
    RetryPolicy,
    UnavailableError,
)
from ledger_cluster.sdk.batching import EXPIRED_IN_QUEUE_REASON, QUEUE_FULL_REASON, AutoBatcher
from ledger_cluster.sdk.errors import ResourceExhaustedError, api_error, from_item_error

FAST_POLICY = RetryPolicy(call_timeout_seconds=1.0, retry_deadline_seconds=2.0, backoff_initial_seconds=0.001)


def test_errors_are_classed_by_reason_then_by_code() -> None:
    not_found = api_error(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no", {"account_id": "ab"})
    assert isinstance(not_found, AccountNotFoundError)
    assert isinstance(not_found, LedgerError)
    assert not_found.metadata == {"account_id": "ab"}
    assert isinstance(api_error(grpc.StatusCode.UNAVAILABLE, "OUTCOME_UNKNOWN", ""), OutcomeUnknownError)
    shard_down = api_error(grpc.StatusCode.UNAVAILABLE, "SHARD_UNAVAILABLE", "")
    assert type(shard_down) is UnavailableError
    assert shard_down.retryable
    assert type(api_error(grpc.StatusCode.UNKNOWN, "", "")) is InternalError
    item = from_item_error(ledger_pb2.ItemError(code="FAILED_PRECONDITION", reason="TRANSFER_NOT_PENDING"))
    assert isinstance(item, NotPendingError)
    assert item.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not item.retryable
    assert str(not_found) == "NOT_FOUND ACCOUNT_NOT_FOUND: no"
    refused = api_error(grpc.StatusCode.UNAVAILABLE, "", "connection refused")
    assert str(refused) == "UNAVAILABLE: connection refused"


def test_a_refusal_is_never_retried() -> None:
    attempts: list[float] = []

    async def attempt(timeout_seconds: float) -> str:
        attempts.append(timeout_seconds)
        raise api_error(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "zero")

    with pytest.raises(InvalidArgumentError, match="INVALID_AMOUNT"):
        asyncio.run(FAST_POLICY.run(attempt))
    assert len(attempts) == 1


def test_an_unknown_outcome_is_retried_until_it_succeeds() -> None:
    attempts: list[float] = []

    async def attempt(timeout_seconds: float) -> str:
        attempts.append(timeout_seconds)
        if len(attempts) < 3:
            raise api_error(grpc.StatusCode.UNAVAILABLE, "OUTCOME_UNKNOWN", "leader lost")
        return "applied"

    assert asyncio.run(FAST_POLICY.run(attempt)) == "applied"
    assert len(attempts) == 3
    assert all(0 < timeout <= FAST_POLICY.call_timeout_seconds for timeout in attempts)


def test_retries_stop_at_the_overall_deadline() -> None:
    policy = RetryPolicy(call_timeout_seconds=1.0, retry_deadline_seconds=0.2, backoff_initial_seconds=0.01)
    attempts: list[float] = []

    async def attempt(timeout_seconds: float) -> str:
        attempts.append(timeout_seconds)
        raise api_error(grpc.StatusCode.UNAVAILABLE, "SHARD_UNAVAILABLE", "no leader")

    with pytest.raises(UnavailableError, match="SHARD_UNAVAILABLE"):
        asyncio.run(policy.run(attempt))
    assert len(attempts) >= 2
    # Each attempt was given no more than what remained of the overall deadline.
    assert max(attempts) <= policy.retry_deadline_seconds


def test_the_batch_queue_is_bounded_and_each_caller_gets_its_own_outcome() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        batches: list[list[int]] = []

        async def send_batch(items: list[int], timeout_seconds: float) -> list[int | LedgerApiError]:
            batches.append(items)
            await release.wait()
            return [
                api_error(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "") if item == 0 else item * 10
                for item in items
            ]

        batcher: AutoBatcher[int, int] = AutoBatcher(send_batch, batch_items_max=2, queue_items_max=3)
        callers = [asyncio.create_task(batcher.submit(item, 1.0)) for item in (1, 2, 0, 4)]
        await asyncio.sleep(0)  # every caller has queued or been sent
        with pytest.raises(ResourceExhaustedError, match=QUEUE_FULL_REASON):
            await batcher.submit(5, 1.0)
        release.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert outcomes[:2] == [10, 20]
        assert isinstance(outcomes[2], InvalidArgumentError)
        assert outcomes[3] == 40
        # The first call left alone; the rest waited for it and left in batches of at most 2.
        assert batches == [[1], [2, 0], [4]]

    asyncio.run(scenario())


def test_time_spent_waiting_for_a_batch_counts_against_an_items_timeout() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        sent: list[tuple[list[int], float]] = []

        async def send_batch(items: list[int], timeout_seconds: float) -> list[int | LedgerApiError]:
            sent.append((items, timeout_seconds))
            await release.wait()
            return [item * 10 for item in items]

        batcher: AutoBatcher[int, int] = AutoBatcher(send_batch)
        first = asyncio.create_task(batcher.submit(1, 60.0))
        await asyncio.sleep(0)  # the first call is in flight; the next two wait for it
        impatient = asyncio.create_task(batcher.submit(2, 0.05))
        patient = asyncio.create_task(batcher.submit(3, 60.0))
        await asyncio.sleep(0.2)  # past the impatient call's timeout, while it still waits
        release.set()
        assert await first == 10
        assert await patient == 30
        with pytest.raises(DeadlineExceededError, match=EXPIRED_IN_QUEUE_REASON) as expired:
            await impatient
        assert expired.value.retryable
        # The expired item was never sent, and the batch it was in left with what its one
        # remaining item had left of its 60 s.
        assert [items for items, _ in sent] == [[1], [3]]
        assert sent[1][1] < 60.0 - 0.2

    asyncio.run(scenario())
