"""The client SDK against a real `ledger-standalone` over real gRPC: every public method through
both clients, auto-batching seen by the server, same-id retries across a server restart, and
the reserve helper."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ledger_cluster import config as cluster_config
from ledger_cluster.bench import account_request_in_shard
from ledger_cluster.ids import parse_account_id
from ledger_cluster.sdk import (
    Account,
    AccountNotFoundError,
    AsyncLedgerClient,
    HoldRefusedError,
    InvalidArgumentError,
    LedgerApiError,
    LedgerClient,
    NewTransaction,
    NewTransfer,
    NotPendingError,
    RequestIdReusedError,
    Transaction,
    TransactionNotFoundError,
    TransactionStatus,
    TransferStatus,
)
from tests.processes import (
    POLL_INTERVAL_SECONDS,
    REPO_CONFIG_PATH,
    StandaloneServer,
    rpc_count,
    standalone_server,
    start_standalone,
)

CONCURRENT_CALLERS = 64
# 64 concurrent callers fit in a few batches: one alone, then the rest as they queue.
BATCH_RPCS_MAX = CONCURRENT_CALLERS // 4
SYNC_THREADS = 16
# The first attempts against a stopped server fail within this.
RETRY_SEEN_TIMEOUT_SECONDS = 10.0
UNKNOWN_ACCOUNT_ID = "00000000000000ff"
UNKNOWN_TRANSACTION_ID = "00000000000000ff0000000000000001"

REPO_CONFIG = cluster_config.load(REPO_CONFIG_PATH)

# A client method called by name, awaited whichever client runs it.
Call = Callable[..., Awaitable[Any]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    directory = tmp_path_factory.mktemp("sdk")
    with standalone_server(directory / "data", REPO_CONFIG_PATH, directory / "server.log") as running:
        yield running


def shard_of(account_id: str) -> str:
    return REPO_CONFIG.shard_for_account(parse_account_id(account_id)).shard_id


async def account_beside(call: Call, account_id: str, same_shard: bool) -> Account:
    """A new EUR account on `account_id`'s shard or on another one: an account's id derives from
    its CreateAccount request id, so the request id is drawn for the shard."""
    home = REPO_CONFIG.shard_for_account(parse_account_id(account_id))
    shard = home if same_shard else next(s for s in REPO_CONFIG.shards if s.shard_id != home.shard_id)
    _, request_id = account_request_in_shard(shard.lower_bound, shard.upper_bound)
    account: Account = await call("create_account", "EUR", request_id=request_id)
    assert (shard_of(account.id) == shard_of(account_id)) is same_shard
    return account


def async_caller(client: AsyncLedgerClient) -> Call:
    async def call(name: str, *arguments: Any, **options: Any) -> Any:
        return await getattr(client, name)(*arguments, **options)

    return call


def sync_caller(client: LedgerClient) -> Call:
    async def call(name: str, *arguments: Any, **options: Any) -> Any:
        return await asyncio.to_thread(getattr(client, name), *arguments, **options)

    return call


async def exercise_transfers(call: Call, payer: Account, payee: Account) -> None:
    """Every transfer method between two EUR accounts, on one shard or across two."""
    transfer = await call("create_transfer", payer.id, payee.id, 700, settled=True, description="rent")
    assert (transfer.status, transfer.settled_amount) == (TransferStatus.SETTLED, 700)
    pending_transfer = await call("create_transfer", payer.id, payee.id, 400)
    partial = await call("settle_transfer", pending_transfer.id, 150)
    assert (partial.status, partial.settled_amount) == (TransferStatus.SETTLED, 150)
    to_cancel = await call("create_transfer", payer.id, payee.id, 60)
    assert (await call("cancel_transfer", to_cancel.id)).status is TransferStatus.CANCELLED
    assert (await call("get_transfer", partial.id, consistent=True)).settled_amount == 150
    batch = await call(
        "create_transfers",
        [NewTransfer(payer.id, payee.id, 5, settled=True), NewTransfer(payer.id, payer.id, 5)],
    )
    assert batch[0].status is TransferStatus.SETTLED
    assert isinstance(batch[1], InvalidArgumentError)
    assert batch[1].reason == "SAME_ACCOUNT"
    payee_now = await call("get_account", payee.id, consistent=True)
    assert payee_now.settled_balance == 700 + 150 + 5


async def exercise_every_method(call: Call) -> None:
    """One story through every method of a client, each answer checked."""
    payer = await call("create_account", "EUR", overdraft_limit=100, metadata={"ref": "p"})
    assert (payer.currency, payer.overdraft_limit, dict(payer.metadata)) == ("EUR", 100, {"ref": "p"})
    top_up = await call("create_transaction", payer.id, 10_000, settled=True, description="top-up")
    assert (top_up.status, top_up.settled_amount, top_up.account_id) == (
        TransactionStatus.SETTLED,
        10_000,
        payer.id,
    )
    hold = await call("create_transaction", payer.id, -3_000, timeout_seconds=600)
    assert hold.status is TransactionStatus.PENDING
    assert hold.expires_at > hold.created_at
    partly = await call("settle_transaction", hold.id, -1_000)
    assert (partly.status, partly.settled_amount) == (TransactionStatus.SETTLED, -1_000)
    coffee = await call("create_transaction", payer.id, -300)
    assert (await call("cancel_transaction", coffee.id)).status is TransactionStatus.CANCELLED
    with pytest.raises(NotPendingError, match="TRANSACTION_NOT_PENDING"):
        await call("settle_transaction", coffee.id)
    too_much = await call("create_transaction", payer.id, -1_000_000)
    assert too_much.status is TransactionStatus.INSUFFICIENT_FUNDS
    assert (await call("get_transaction", hold.id, consistent=True)).settled_amount == -1_000

    account = await call("get_account", payer.id, consistent=True)
    assert (account.settled_balance, account.available_balance) == (9_000, 9_000)

    results = await call(
        "create_transactions",
        [NewTransaction(payer.id, -50, settled=True, request_id="fee-1"), NewTransaction(payer.id, 0)],
    )
    assert isinstance(results[0], Transaction)
    assert results[0].amount == -50
    assert isinstance(results[1], InvalidArgumentError)
    assert results[1].reason == "INVALID_AMOUNT"
    pending = await call(
        "create_transactions", [NewTransaction(payer.id, -10), NewTransaction(payer.id, -20)]
    )
    settled = await call("settle_transactions", [pending[0].id, UNKNOWN_TRANSACTION_ID])
    assert settled[0].status is TransactionStatus.SETTLED
    assert isinstance(settled[1], TransactionNotFoundError)
    cancelled = await call("cancel_transactions", [pending[1].id, pending[0].id])
    assert cancelled[0].status is TransactionStatus.CANCELLED
    assert isinstance(cancelled[1], NotPendingError)

    page = await call("list_transactions", payer.id, page_size=2)
    assert len(page.transactions) == 2
    assert page.transactions[0].id == top_up.id
    assert page.next_page_token
    listed = await call("list_transactions", payer.id, page_size=100)
    assert [item.id for item in listed.transactions][:2] == [top_up.id, hold.id]
    assert not listed.next_page_token

    for same_shard in (False, True):
        await exercise_transfers(call, payer, await account_beside(call, payer.id, same_shard))

    with pytest.raises(AccountNotFoundError, match="ACCOUNT_NOT_FOUND") as not_found:
        await call("get_account", UNKNOWN_ACCOUNT_ID)
    assert not_found.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InvalidArgumentError, match="INVALID_ACCOUNT_ID"):
        await call("get_account", "NOT-AN-ID")
    with pytest.raises(RequestIdReusedError, match="REQUEST_ID_REUSED"):
        await call("create_transaction", payer.id, -51, settled=True, request_id="fee-1")


def test_every_method_through_the_async_client(server: StandaloneServer) -> None:
    async def scenario() -> None:
        async with AsyncLedgerClient(server.address) as client:
            await exercise_every_method(async_caller(client))

    asyncio.run(scenario())


def test_every_method_through_the_sync_client(server: StandaloneServer) -> None:
    with LedgerClient(server.address) as client:
        asyncio.run(exercise_every_method(sync_caller(client)))
        pages = list(client.iterate_transactions(client.create_account().id))
        assert pages == []


def test_concurrent_single_creates_travel_as_few_batches(server: StandaloneServer) -> None:
    async def scenario() -> None:
        async with AsyncLedgerClient(server.address) as client:
            account = await client.create_account("EUR")
            unary_before = rpc_count(server, "CreateTransaction")
            batches_before = rpc_count(server, "CreateTransactions")
            amounts = list(range(1, CONCURRENT_CALLERS + 1))
            created = await asyncio.gather(
                *(
                    client.create_transaction(
                        account.id, amount, settled=True, description=f"caller {amount}"
                    )
                    for amount in amounts
                )
            )
            batches = rpc_count(server, "CreateTransactions") - batches_before
            assert rpc_count(server, "CreateTransaction") == unary_before
            assert 1 <= batches <= BATCH_RPCS_MAX
            # Each caller got its own transaction back.
            assert [item.amount for item in created] == amounts
            assert [item.description for item in created] == [f"caller {amount}" for amount in amounts]
            assert len({item.id for item in created}) == CONCURRENT_CALLERS
            listed = [item async for item in client.iterate_transactions(account.id, consistent=True)]
            assert sorted(item.amount for item in listed) == amounts
            assert (await client.get_account(account.id, consistent=True)).settled_balance == sum(amounts)

    asyncio.run(scenario())


def test_sync_calls_from_many_threads_are_batched_too(server: StandaloneServer) -> None:
    with LedgerClient(server.address) as client:
        payer = client.create_account("EUR")
        payee = asyncio.run(account_beside(sync_caller(client), payer.id, same_shard=False))
        client.create_transaction(payer.id, 10_000, settled=True)
        batches_before = rpc_count(server, "CreateTransfers")
        start = threading.Barrier(SYNC_THREADS)
        transfers: list[int] = []

        def transfer(amount: int) -> None:
            start.wait()
            transfers.append(client.create_transfer(payer.id, payee.id, amount, settled=True).amount)

        threads = [threading.Thread(target=transfer, args=(amount,)) for amount in range(1, SYNC_THREADS + 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(transfers) == list(range(1, SYNC_THREADS + 1))
        assert rpc_count(server, "CreateTransfers") - batches_before < SYNC_THREADS
        expected = sum(range(1, SYNC_THREADS + 1))
        assert client.get_account(payee.id, consistent=True).settled_balance == expected


def test_a_repeated_create_with_the_same_request_id_is_applied_once(server: StandaloneServer) -> None:
    with LedgerClient(server.address) as client:
        account = client.create_account("EUR", request_id=None)
        first = client.create_transaction(account.id, 500, settled=True, request_id="order-7")
        # The answer was lost (an OUTCOME_UNKNOWN): the caller sends the same request again.
        again = client.create_transaction(account.id, 500, settled=True, request_id="order-7")
        assert again.id == first.id
        assert client.get_account(account.id, consistent=True).settled_balance == 500
        assert len(client.list_transactions(account.id).transactions) == 1


class RequestIdRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Every CreateTransactions attempt's request ids, as the client sends them."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        if method.endswith("/CreateTransactions"):
            self.request_ids.extend(item.request_id for item in request.items)
        return await continuation(details, request)


def test_retries_across_a_server_restart_use_one_request_id(tmp_path: Path) -> None:
    first = start_standalone(tmp_path / "data", REPO_CONFIG_PATH, tmp_path / "first.log")
    restarted: StandaloneServer | None = None
    try:

        async def scenario() -> None:
            nonlocal restarted
            recorder = RequestIdRecorder()
            async with AsyncLedgerClient(
                first.address, call_timeout_seconds=2.0, retry_deadline_seconds=25.0, interceptors=[recorder]
            ) as client:
                account = await client.create_account("EUR")
                first.process.stop()
                # The call fails while the server is down and goes on retrying until it is back.
                pending = asyncio.create_task(client.create_transaction(account.id, 900, settled=True))
                give_up = time.monotonic() + RETRY_SEEN_TIMEOUT_SECONDS
                while len(recorder.request_ids) < 2 and not pending.done() and time.monotonic() < give_up:
                    await asyncio.sleep(POLL_INTERVAL_SECONDS)
                assert not pending.done(), pending.exception()
                assert len(recorder.request_ids) >= 2
                restarted = await asyncio.to_thread(
                    start_standalone, tmp_path / "data", REPO_CONFIG_PATH, tmp_path / "second.log", first.port
                )
                created = await pending
                assert len(set(recorder.request_ids)) == 1
                assert len(recorder.request_ids) >= 2
                assert (await client.get_account(account.id, consistent=True)).settled_balance == 900
                listed = await client.list_transactions(account.id, consistent=True)
                assert [item.id for item in listed.transactions] == [created.id]

        asyncio.run(scenario())
    finally:
        first.process.stop()
        if restarted is not None:
            restarted.process.stop()


def test_reserve_settles_captures_part_and_cancels_on_error(server: StandaloneServer) -> None:
    async def scenario() -> None:
        async with AsyncLedgerClient(server.address) as client:
            account = await client.create_account("EUR")
            await client.create_transaction(account.id, 1_000, settled=True)
            async with client.reserve(account.id, 300, key="order-1") as hold:
                held = await client.get_account(account.id, consistent=True)
                assert (held.available_balance, held.settled_balance) == (700, 1_000)
            assert hold.result is not None
            assert (hold.result.status, hold.result.settled_amount) == (TransactionStatus.SETTLED, -300)

            async with client.reserve(account.id, 200) as partial:
                partial.capture(50)
            assert partial.result is not None
            assert partial.result.settled_amount == -50

            with pytest.raises(RuntimeError, match="payment provider down"):
                async with client.reserve(account.id, 400) as failed:
                    raise RuntimeError("payment provider down")
            assert failed.result is not None
            assert failed.result.status is TransactionStatus.CANCELLED
            after = await client.get_account(account.id, consistent=True)
            assert (after.available_balance, after.settled_balance) == (650, 650)

            # A retry of the whole operation with the same key finds the settled hold: the
            # block does not run again and nothing is charged twice.
            with pytest.raises(HoldRefusedError, match="SETTLED") as refused:
                async with client.reserve(account.id, 300, key="order-1"):
                    pytest.fail("the block ran again")
            assert refused.value.status == "SETTLED"
            with pytest.raises(HoldRefusedError, match="INSUFFICIENT_FUNDS"):
                async with client.reserve(account.id, 10_000):
                    pytest.fail("the block ran without a hold")
            assert (await client.get_account(account.id, consistent=True)).settled_balance == 650

    asyncio.run(scenario())


def test_sync_reserve_of_a_transfer(server: StandaloneServer) -> None:
    with LedgerClient(server.address) as client:
        payer = client.create_account("EUR")
        payee = asyncio.run(account_beside(sync_caller(client), payer.id, same_shard=False))
        client.create_transaction(payer.id, 1_000, settled=True)
        with client.reserve(payer.id, 400, credit_account_id=payee.id, key="invoice-9") as hold:
            hold.capture(250)
        assert hold.result is not None
        assert (hold.result.status, hold.result.settled_amount) == (TransferStatus.SETTLED, 250)
        with (
            pytest.raises(LedgerApiError, match="TRANSACTION_NOT_FOUND"),
            client.reserve(payer.id, 100, credit_account_id=payee.id) as failed,
        ):
            client.get_transaction(UNKNOWN_TRANSACTION_ID)
        assert failed.result is not None
        assert failed.result.status is TransferStatus.CANCELLED
        assert client.get_account(payee.id, consistent=True).settled_balance == 250
        assert client.get_account(payer.id, consistent=True).available_balance == 750
