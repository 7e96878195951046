"""Reserve, call something outside, then capture or release: a pending purchase (or pending
transfer) held while the caller's block runs, settled when it succeeds and cancelled when it
raises. Opening and closing are separate coroutines so the sync client runs the same code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ledger_cluster.sdk.errors import FailedPreconditionError, LedgerApiError
from ledger_cluster.sdk.types import Transaction, TransactionStatus, Transfer

if TYPE_CHECKING:
    from ledger_cluster.sdk.client import AsyncLedgerClient

# A hold that its process abandoned (it crashed inside the block) releases itself after this.
RESERVE_TIMEOUT_SECONDS_DEFAULT = 15 * 60
# Prefixed so a caller's key used for a hold never clashes with the same key used for one of
# its own creates on the same account.
RESERVE_REQUEST_ID_PREFIX = "reserve:"
HOLD_NOT_PENDING_REASON = "HOLD_NOT_PENDING"


class HoldRefusedError(FailedPreconditionError):
    """The hold could not be placed, or (on a retry with the same key) is no longer pending:
    `status` says why (INSUFFICIENT_FUNDS, SETTLED, CANCELLED, EXPIRED). The block did not run."""

    def __init__(self, status: str, item_id: str) -> None:
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            HOLD_NOT_PENDING_REASON,
            f"the hold {item_id} is {status}, not PENDING",
            {"status": status, "id": item_id},
        )
        self.status = status


class Hold:
    """One open hold. `capture(amount)` settles only that much when the block ends; `release()`
    cancels it instead. After the block, `result` is the settled or cancelled item."""

    def __init__(self, item: Transaction | Transfer, amount: int) -> None:
        self.item = item
        self.amount = amount
        self._capture_amount = amount
        self._released = False
        self.result: Transaction | Transfer | None = None

    @property
    def id(self) -> str:
        return self.item.id

    @property
    def capture_amount(self) -> int:
        return self._capture_amount

    def capture(self, amount: int) -> None:
        if not 1 <= amount <= self.amount:
            raise ValueError(f"capture amount {amount} is not within 1..{self.amount}")
        self._capture_amount = amount

    def release(self) -> None:
        self._released = True

    @property
    def released(self) -> bool:
        return self._released


def _status_name(item: Transaction | Transfer) -> str:
    return item.status.name


def _is_pending(item: Transaction | Transfer) -> bool:
    return item.status is TransactionStatus.PENDING


@dataclass(frozen=True)
class HoldRequest:
    account_id: str
    # What is held, > 0: a purchase of -amount, or a transfer of amount to credit_account_id.
    amount: int
    # The caller's own operation id; every retry with it finds the same hold.
    key: str | None
    credit_account_id: str | None
    description: str
    # None: RESERVE_TIMEOUT_SECONDS_DEFAULT.
    timeout_seconds: int | None


async def _create(client: AsyncLedgerClient, request: HoldRequest) -> Transaction | Transfer:
    request_id = None if request.key is None else RESERVE_REQUEST_ID_PREFIX + request.key
    expiry_seconds = (
        RESERVE_TIMEOUT_SECONDS_DEFAULT if request.timeout_seconds is None else request.timeout_seconds
    )
    if request.credit_account_id is None:
        return await client.create_transaction(
            request.account_id,
            -request.amount,
            description=request.description,
            timeout_seconds=expiry_seconds,
            request_id=request_id,
        )
    return await client.create_transfer(
        request.account_id,
        request.credit_account_id,
        request.amount,
        description=request.description,
        timeout_seconds=expiry_seconds,
        request_id=request_id,
    )


async def open_hold(client: AsyncLedgerClient, request: HoldRequest) -> Hold:
    if request.amount <= 0:
        raise ValueError(f"a hold amount must be > 0, not {request.amount}")
    item = await _create(client, request)
    if request.key is not None and _is_pending(item):
        # A repeat create answers the state at creation: only a read tells whether an earlier
        # attempt with this key already settled or cancelled it.
        item = await _current(client, item)
    if not _is_pending(item):
        raise HoldRefusedError(_status_name(item), item.id)
    return Hold(item, request.amount)


async def _current(client: AsyncLedgerClient, item: Transaction | Transfer) -> Transaction | Transfer:
    if isinstance(item, Transfer):
        return await client.get_transfer(item.id, consistent=True)
    return await client.get_transaction(item.id, consistent=True)


async def close_hold(client: AsyncLedgerClient, hold: Hold, error: BaseException | None) -> None:
    """Settle (for the capture amount) after a block that succeeded, cancel after one that raised
    or released. A failed cancel does not hide the block's own error: it is noted on it."""
    if error is None and not hold.released:
        hold.result = await _settle(client, hold)
        return
    try:
        hold.result = await _cancel(client, hold)
    except LedgerApiError as cancel_error:
        if error is None:
            raise
        error.add_note(f"and cancelling the hold {hold.id} failed: {cancel_error}")


async def _settle(client: AsyncLedgerClient, hold: Hold) -> Transaction | Transfer:
    if isinstance(hold.item, Transfer):
        return await client.settle_transfer(hold.id, hold.capture_amount)
    return await client.settle_transaction(hold.id, -hold.capture_amount)


async def _cancel(client: AsyncLedgerClient, hold: Hold) -> Transaction | Transfer:
    if isinstance(hold.item, Transfer):
        return await client.cancel_transfer(hold.id)
    return await client.cancel_transaction(hold.id)


@asynccontextmanager
async def reserve_hold(client: AsyncLedgerClient, request: HoldRequest) -> AsyncIterator[Hold]:
    hold = await open_hold(client, request)
    try:
        yield hold
    except BaseException as error:
        await close_hold(client, hold, error)
        raise
    await close_hold(client, hold, None)
