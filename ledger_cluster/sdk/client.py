"""`AsyncLedgerClient`: every LedgerService method as a typed coroutine, with generated request
ids, safe retries and auto-batched single creates."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.sdk.batching import AutoBatcher
from ledger_cluster.sdk.errors import LedgerApiError, from_item_error, from_rpc_error
from ledger_cluster.sdk.hold import Hold, HoldRequest, reserve_hold
from ledger_cluster.sdk.retry import (
    DEFAULT_CALL_TIMEOUT_SECONDS,
    DEFAULT_RETRY_DEADLINE_SECONDS,
    RetryPolicy,
)
from ledger_cluster.sdk.types import (
    Account,
    NewTransaction,
    NewTransfer,
    Transaction,
    TransactionPage,
    Transfer,
)
from ledger_cluster.security import (
    ClientCredentials,
    TlsIdentity,
    public_client_from_environment,
)

Response = TypeVar("Response")
TlsRoots = bytes | str | Path


def new_request_id() -> str:
    """32 hex characters, well within REQUEST_ID_BYTES_MAX; random, so two callers never
    collide and a retry reuses the one it was given."""
    return uuid.uuid4().hex


def _credentials(tls_root_certificates: TlsRoots | None, token: str | None) -> ClientCredentials:
    if tls_root_certificates is None:
        return ClientCredentials(token=token, tls=None)
    roots = (
        tls_root_certificates
        if isinstance(tls_root_certificates, bytes)
        else Path(tls_root_certificates).read_bytes()
    )
    # An identity of roots only: no client certificate.
    return ClientCredentials(token=token, tls=TlsIdentity(b"", b"", roots))


def _transaction_request(item: NewTransaction) -> ledger_pb2.CreateTransactionRequest:
    return ledger_pb2.CreateTransactionRequest(
        account_id=item.account_id,
        amount=item.amount,
        description=item.description,
        settled=item.settled,
        metadata=dict(item.metadata),
        timeout_seconds=item.timeout_seconds,
        request_id=item.request_id if item.request_id is not None else new_request_id(),
    )


def _transfer_request(item: NewTransfer) -> ledger_pb2.CreateTransferRequest:
    return ledger_pb2.CreateTransferRequest(
        debit_account_id=item.debit_account_id,
        credit_account_id=item.credit_account_id,
        amount=item.amount,
        description=item.description,
        settled=item.settled,
        metadata=dict(item.metadata),
        timeout_seconds=item.timeout_seconds,
        request_id=item.request_id if item.request_id is not None else new_request_id(),
    )


def _transaction_outcome(result: ledger_pb2.TransactionResult) -> Transaction | LedgerApiError:
    if result.WhichOneof("result") == "error":
        return from_item_error(result.error)
    return Transaction.from_message(result.transaction)


def _transfer_outcome(result: ledger_pb2.TransferResult) -> Transfer | LedgerApiError:
    if result.WhichOneof("result") == "error":
        return from_item_error(result.error)
    return Transfer.from_message(result.transfer)


class AsyncLedgerClient:
    """A client of one gateway or standalone server. Use it from one event loop, and close it
    (or use `async with`)."""

    def __init__(
        self,
        target: str,
        *,
        tls_root_certificates: TlsRoots | None = None,
        token: str | None = None,
        credentials: ClientCredentials | None = None,
        call_timeout_seconds: float = DEFAULT_CALL_TIMEOUT_SECONDS,
        retry_deadline_seconds: float = DEFAULT_RETRY_DEADLINE_SECONDS,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        chosen = credentials if credentials is not None else _credentials(tls_root_certificates, token)
        # The token goes with each call: an asyncio interceptor costs a task per call.
        self._metadata = chosen.metadata
        # Extra interceptors: tracing; tests count RPCs with one.
        self._channel = chosen.without_interceptors().aio_channel(target, interceptors=interceptors)
        self._stub = ledger_pb2_grpc.LedgerServiceStub(self._channel)
        self.retry_policy = RetryPolicy(
            call_timeout_seconds=call_timeout_seconds, retry_deadline_seconds=retry_deadline_seconds
        )
        self._transactions: AutoBatcher[ledger_pb2.CreateTransactionRequest, Transaction] = AutoBatcher(
            self._send_transactions
        )
        self._transfers: AutoBatcher[ledger_pb2.CreateTransferRequest, Transfer] = AutoBatcher(
            self._send_transfers
        )

    @classmethod
    def from_environment(
        cls,
        target: str,
        call_timeout_seconds: float = DEFAULT_CALL_TIMEOUT_SECONDS,
        retry_deadline_seconds: float = DEFAULT_RETRY_DEADLINE_SECONDS,
    ) -> AsyncLedgerClient:
        """Token and TLS roots from LEDGER_CLIENT_TOKEN and LEDGER_TLS_CA (and the client
        certificate variables), as the dev CLI reads them."""
        return cls(
            target,
            credentials=public_client_from_environment(),
            call_timeout_seconds=call_timeout_seconds,
            retry_deadline_seconds=retry_deadline_seconds,
        )

    async def close(self) -> None:
        await self._transactions.close()
        await self._transfers.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    # -- plumbing ------------------------------------------------------------------------------

    async def _call(
        self, method: Callable[..., Awaitable[Response]], request: object, timeout_seconds: float
    ) -> Response:
        try:
            return await method(request, timeout=timeout_seconds, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def _retried(self, method: Callable[..., Awaitable[Response]], request: object) -> Response:
        async def attempt(timeout_seconds: float) -> Response:
            return await self._call(method, request, timeout_seconds)

        return await self.retry_policy.run(attempt)

    async def _send_transactions(
        self, items: list[ledger_pb2.CreateTransactionRequest], timeout_seconds: float
    ) -> list[Transaction | LedgerApiError]:
        request = ledger_pb2.CreateTransactionsRequest(items=items)
        response = await self._call(self._stub.CreateTransactions, request, timeout_seconds)
        return [_transaction_outcome(result) for result in response.results]

    async def _send_transfers(
        self, items: list[ledger_pb2.CreateTransferRequest], timeout_seconds: float
    ) -> list[Transfer | LedgerApiError]:
        request = ledger_pb2.CreateTransfersRequest(items=items)
        response = await self._call(self._stub.CreateTransfers, request, timeout_seconds)
        return [_transfer_outcome(result) for result in response.results]

    # -- accounts ------------------------------------------------------------------------------

    async def create_account(
        self,
        currency: str = "",
        overdraft_limit: int = 0,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> Account:
        request = ledger_pb2.CreateAccountRequest(
            currency=currency,
            overdraft_limit=overdraft_limit,
            metadata=dict(metadata or {}),
            request_id=request_id if request_id is not None else new_request_id(),
        )
        response = await self._retried(self._stub.CreateAccount, request)
        return Account.from_message(response.account)

    async def get_account(self, account_id: str, consistent: bool = False) -> Account:
        request = ledger_pb2.GetAccountRequest(account_id=account_id, consistent=consistent)
        response = await self._retried(self._stub.GetAccount, request)
        return Account.from_message(response.account)

    # -- transactions --------------------------------------------------------------------------

    async def create_transaction(
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
        """Auto-batched with concurrent calls; every retry sends the same request id."""
        item = NewTransaction(
            account_id, amount, description, settled, dict(metadata or {}), timeout_seconds, request_id
        )
        request = _transaction_request(item)
        return await self.retry_policy.run(lambda timeout: self._transactions.submit(request, timeout))

    async def get_transaction(self, transaction_id: str, consistent: bool = False) -> Transaction:
        request = ledger_pb2.GetTransactionRequest(transaction_id=transaction_id, consistent=consistent)
        response = await self._retried(self._stub.GetTransaction, request)
        return Transaction.from_message(response.transaction)

    async def list_transactions(
        self, account_id: str, page_size: int = 0, page_token: str = "", consistent: bool = False
    ) -> TransactionPage:
        request = ledger_pb2.ListTransactionsRequest(
            account_id=account_id, page_size=page_size, page_token=page_token, consistent=consistent
        )
        response = await self._retried(self._stub.ListTransactions, request)
        return TransactionPage.from_message(response)

    async def iterate_transactions(
        self, account_id: str, page_size: int = 0, consistent: bool = False
    ) -> AsyncIterator[Transaction]:
        """Every transaction of the account, page after page."""
        page_token = ""
        while True:
            page = await self.list_transactions(account_id, page_size, page_token, consistent)
            for transaction in page.transactions:
                yield transaction
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def settle_transaction(self, transaction_id: str, amount: int = 0) -> Transaction:
        """`amount` 0 settles it all; otherwise a partial settle (same sign as the amount)."""
        request = ledger_pb2.SettleTransactionRequest(transaction_id=transaction_id, amount=amount)
        response = await self._retried(self._stub.SettleTransaction, request)
        return Transaction.from_message(response.transaction)

    async def cancel_transaction(self, transaction_id: str) -> Transaction:
        request = ledger_pb2.CancelTransactionRequest(transaction_id=transaction_id)
        response = await self._retried(self._stub.CancelTransaction, request)
        return Transaction.from_message(response.transaction)

    async def create_transactions(
        self, items: Sequence[NewTransaction]
    ) -> list[Transaction | LedgerApiError]:
        """One batch call; each item gets its result or its own error, in order. A failure of
        the whole call is retried (each item keeps its request id) and then raised."""
        requests = [_transaction_request(item) for item in items]
        return await self.retry_policy.run(lambda timeout: self._send_transactions(requests, timeout))

    async def settle_transactions(self, transaction_ids: Sequence[str]) -> list[Transaction | LedgerApiError]:
        request = ledger_pb2.SettleTransactionsRequest(transaction_ids=transaction_ids)
        response = await self._retried(self._stub.SettleTransactions, request)
        return [_transaction_outcome(result) for result in response.results]

    async def cancel_transactions(self, transaction_ids: Sequence[str]) -> list[Transaction | LedgerApiError]:
        request = ledger_pb2.CancelTransactionsRequest(transaction_ids=transaction_ids)
        response = await self._retried(self._stub.CancelTransactions, request)
        return [_transaction_outcome(result) for result in response.results]

    # -- transfers -----------------------------------------------------------------------------

    async def create_transfer(
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
        """Auto-batched with concurrent calls; every retry sends the same request id."""
        item = NewTransfer(
            debit_account_id,
            credit_account_id,
            amount,
            description,
            settled,
            dict(metadata or {}),
            timeout_seconds,
            request_id,
        )
        request = _transfer_request(item)
        return await self.retry_policy.run(lambda timeout: self._transfers.submit(request, timeout))

    async def get_transfer(self, transfer_id: str, consistent: bool = False) -> Transfer:
        request = ledger_pb2.GetTransferRequest(transfer_id=transfer_id, consistent=consistent)
        response = await self._retried(self._stub.GetTransfer, request)
        return Transfer.from_message(response.transfer)

    async def settle_transfer(self, transfer_id: str, amount: int = 0) -> Transfer:
        request = ledger_pb2.SettleTransferRequest(transfer_id=transfer_id, amount=amount)
        response = await self._retried(self._stub.SettleTransfer, request)
        return Transfer.from_message(response.transfer)

    async def cancel_transfer(self, transfer_id: str) -> Transfer:
        request = ledger_pb2.CancelTransferRequest(transfer_id=transfer_id)
        response = await self._retried(self._stub.CancelTransfer, request)
        return Transfer.from_message(response.transfer)

    async def create_transfers(self, items: Sequence[NewTransfer]) -> list[Transfer | LedgerApiError]:
        requests = [_transfer_request(item) for item in items]
        return await self.retry_policy.run(lambda timeout: self._send_transfers(requests, timeout))

    # -- reserve, then capture or release ------------------------------------------------------

    def reserve(
        self,
        account_id: str,
        amount: int,
        *,
        key: str | None = None,
        credit_account_id: str | None = None,
        description: str = "",
        timeout_seconds: int | None = None,
    ) -> AbstractAsyncContextManager[Hold]:
        """`async with client.reserve(account, 500, key="order-42") as hold:` holds `amount`
        (a pending purchase, or a pending transfer to `credit_account_id`), settles it when the
        block ends normally (`hold.capture(n)` settles part of it) and cancels it when the block
        raises. The same `key` on a retry finds the same hold, never a second one."""
        request = HoldRequest(account_id, amount, key, credit_account_id, description, timeout_seconds)
        return reserve_hold(self, request)
