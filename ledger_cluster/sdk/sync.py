"""`LedgerClient`: the blocking face of `AsyncLedgerClient`. One event loop runs in a
background thread and every method runs the async client's coroutine there, so both clients
share one implementation, and calls from many threads are auto-batched together."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

from ledger_cluster.sdk.client import AsyncLedgerClient, TlsRoots
from ledger_cluster.sdk.errors import LedgerApiError
from ledger_cluster.sdk.hold import Hold, HoldRequest, close_hold, open_hold
from ledger_cluster.sdk.retry import DEFAULT_CALL_TIMEOUT_SECONDS, DEFAULT_RETRY_DEADLINE_SECONDS
from ledger_cluster.sdk.types import (
    Account,
    NewTransaction,
    NewTransfer,
    Transaction,
    TransactionPage,
    Transfer,
)
from ledger_cluster.security import ClientCredentials, public_client_from_environment

Result = TypeVar("Result")
LOOP_THREAD_NAME = "ledger-sdk-loop"
# How long close() waits for the loop thread after it has been told to stop.
LOOP_STOP_TIMEOUT_SECONDS = 10.0


class LedgerClient:
    """A blocking client, safe to share between threads. Close it (or use `with`)."""

    def __init__(
        self,
        target: str,
        *,
        tls_root_certificates: TlsRoots | None = None,
        token: str | None = None,
        credentials: ClientCredentials | None = None,
        call_timeout_seconds: float = DEFAULT_CALL_TIMEOUT_SECONDS,
        retry_deadline_seconds: float = DEFAULT_RETRY_DEADLINE_SECONDS,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=LOOP_THREAD_NAME, daemon=True)
        self._thread.start()

        async def build() -> AsyncLedgerClient:
            # grpc's asyncio channel belongs to the loop it is made on.
            return AsyncLedgerClient(
                target,
                tls_root_certificates=tls_root_certificates,
                token=token,
                credentials=credentials,
                call_timeout_seconds=call_timeout_seconds,
                retry_deadline_seconds=retry_deadline_seconds,
            )

        try:
            self._client = self._run(build())
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def from_environment(
        cls,
        target: str,
        call_timeout_seconds: float = DEFAULT_CALL_TIMEOUT_SECONDS,
        retry_deadline_seconds: float = DEFAULT_RETRY_DEADLINE_SECONDS,
    ) -> LedgerClient:
        """As `AsyncLedgerClient.from_environment`: LEDGER_CLIENT_TOKEN and LEDGER_TLS_CA."""
        return cls(
            target,
            credentials=public_client_from_environment(),
            call_timeout_seconds=call_timeout_seconds,
            retry_deadline_seconds=retry_deadline_seconds,
        )

    def _run(self, coroutine: Coroutine[Any, Any, Result]) -> Result:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted (Ctrl-C) while the call runs on the loop: cancel it there, so close()
            # does not stop the loop under a call still pending. A call already done is kept.
            future.cancel()
            raise

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(LOOP_STOP_TIMEOUT_SECONDS)
        self._loop.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def create_account(
        self,
        currency: str = "",
        overdraft_limit: int = 0,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> Account:
        return self._run(self._client.create_account(currency, overdraft_limit, metadata, request_id))

    def get_account(self, account_id: str, consistent: bool = False) -> Account:
        return self._run(self._client.get_account(account_id, consistent))

    def create_transaction(
        self,
        account_id: str,
        amount: int,
        *,
        description: str = "",
        settled: bool = False,
        metadata: Mapping[str, str] | None = None,
        timeout_seconds: int = 0,
        request_id: str | None = None,
    ) -> Transaction:
        return self._run(
            self._client.create_transaction(
                account_id,
                amount,
                description=description,
                settled=settled,
                metadata=metadata,
                timeout_seconds=timeout_seconds,
                request_id=request_id,
            )
        )

    def get_transaction(self, transaction_id: str, consistent: bool = False) -> Transaction:
        return self._run(self._client.get_transaction(transaction_id, consistent))

    def list_transactions(
        self, account_id: str, page_size: int = 0, page_token: str = "", consistent: bool = False
    ) -> TransactionPage:
        return self._run(self._client.list_transactions(account_id, page_size, page_token, consistent))

    def iterate_transactions(
        self, account_id: str, page_size: int = 0, consistent: bool = False
    ) -> Iterator[Transaction]:
        page_token = ""
        while True:
            page = self.list_transactions(account_id, page_size, page_token, consistent)
            yield from page.transactions
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    def settle_transaction(self, transaction_id: str, amount: int = 0) -> Transaction:
        return self._run(self._client.settle_transaction(transaction_id, amount))

    def cancel_transaction(self, transaction_id: str) -> Transaction:
        return self._run(self._client.cancel_transaction(transaction_id))

    def create_transactions(self, items: Sequence[NewTransaction]) -> list[Transaction | LedgerApiError]:
        return self._run(self._client.create_transactions(items))

    def settle_transactions(self, transaction_ids: Sequence[str]) -> list[Transaction | LedgerApiError]:
        return self._run(self._client.settle_transactions(transaction_ids))

    def cancel_transactions(self, transaction_ids: Sequence[str]) -> list[Transaction | LedgerApiError]:
        return self._run(self._client.cancel_transactions(transaction_ids))

    def create_transfer(
        self,
        debit_account_id: str,
        credit_account_id: str,
        amount: int,
        *,
        description: str = "",
        settled: bool = False,
        metadata: Mapping[str, str] | None = None,
        timeout_seconds: int = 0,
        request_id: str | None = None,
    ) -> Transfer:
        return self._run(
            self._client.create_transfer(
                debit_account_id,
                credit_account_id,
                amount,
                description=description,
                settled=settled,
                metadata=metadata,
                timeout_seconds=timeout_seconds,
                request_id=request_id,
            )
        )

    def get_transfer(self, transfer_id: str, consistent: bool = False) -> Transfer:
        return self._run(self._client.get_transfer(transfer_id, consistent))

    def settle_transfer(self, transfer_id: str, amount: int = 0) -> Transfer:
        return self._run(self._client.settle_transfer(transfer_id, amount))

    def cancel_transfer(self, transfer_id: str) -> Transfer:
        return self._run(self._client.cancel_transfer(transfer_id))

    def create_transfers(self, items: Sequence[NewTransfer]) -> list[Transfer | LedgerApiError]:
        return self._run(self._client.create_transfers(items))

    @contextmanager
    def reserve(
        self,
        account_id: str,
        amount: int,
        *,
        key: str | None = None,
        credit_account_id: str | None = None,
        description: str = "",
        timeout_seconds: int | None = None,
    ) -> Iterator[Hold]:
        """The blocking form of `AsyncLedgerClient.reserve`."""
        request = HoldRequest(account_id, amount, key, credit_account_id, description, timeout_seconds)
        hold = self._run(open_hold(self._client, request))
        try:
            yield hold
        except BaseException as error:
            self._run(close_hold(self._client, hold, error))
            raise
        self._run(close_hold(self._client, hold, None))
