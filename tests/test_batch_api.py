"""The batch RPCs (CreateTransactions, SettleTransactions, CancelTransactions) against a real
ledger-standalone process: one result per item in request order, items independent, each with
its own request_id semantics, and whole-call refusals that change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.limits import BATCH_ITEMS_MAX
from ledger_cluster.status import error_details
from tests.processes import StandaloneServer, standalone_server, write_generated_config

RPC_TIMEOUT_SECONDS = 10.0
Stub = ledger_pb2_grpc.LedgerServiceStub
PENDING = ledger_pb2.TRANSACTION_STATUS_PENDING
SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
CANCELLED = ledger_pb2.TRANSACTION_STATUS_CANCELLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    base = tmp_path_factory.mktemp("batch")
    config = write_generated_config(base / "cluster_config.json", 3, 4, 3)
    with standalone_server(base / "data", config, base / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: StandaloneServer) -> Iterator[Stub]:
    with grpc.insecure_channel(server.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


def new_account(stub: Stub) -> str:
    return str(stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account.id)


def item(
    account_id: str, amount: int, settled: bool = True, request_id: str = ""
) -> ledger_pb2.CreateTransactionRequest:
    return ledger_pb2.CreateTransactionRequest(
        account_id=account_id,
        amount=amount,
        settled=settled,
        request_id=request_id,
        description=f"batch {amount}",
    )


def create(
    stub: Stub, items: list[ledger_pb2.CreateTransactionRequest]
) -> list[ledger_pb2.TransactionResult]:
    request = ledger_pb2.CreateTransactionsRequest(items=items)
    return list(stub.CreateTransactions(request, timeout=RPC_TIMEOUT_SECONDS).results)


def balances(stub: Stub, account_id: str) -> tuple[int, int]:
    account = stub.GetAccount(
        ledger_pb2.GetAccountRequest(account_id=account_id), timeout=RPC_TIMEOUT_SECONDS
    ).account
    return account.available_balance, account.settled_balance


def errors(results: list[ledger_pb2.TransactionResult]) -> list[str]:
    return [f"{r.error.code}/{r.error.reason}" if r.HasField("error") else "ok" for r in results]


def test_items_are_independent_and_answered_in_order(stub: Stub) -> None:
    first, second = new_account(stub), new_account(stub)
    missing = "00000000000000ff"
    results = create(
        stub,
        [
            item(first, 500),
            item(second, 300),
            item(first, 0),  # invalid amount: this item alone fails
            item(first, -200),
            item(missing, 10),  # unknown account
            item("not-an-id", 10),
            item(second, -400),  # more than the account holds
            item(first, 50, settled=False),
        ],
    )
    assert errors(results) == [
        "ok",
        "ok",
        "INVALID_ARGUMENT/INVALID_AMOUNT",
        "ok",
        "NOT_FOUND/ACCOUNT_NOT_FOUND",
        "INVALID_ARGUMENT/INVALID_ACCOUNT_ID",
        "ok",
        "ok",
    ]
    statuses = [r.transaction.status for r in results if r.HasField("transaction")]
    assert statuses == [SETTLED, SETTLED, SETTLED, INSUFFICIENT_FUNDS, PENDING]
    assert [r.transaction.account_id for r in results if r.HasField("transaction")] == [
        first,
        second,
        first,
        second,
        first,
    ]
    assert balances(stub, first) == (300, 300)
    assert balances(stub, second) == (300, 300)
    # Each created transaction is readable on its own, exactly as the batch answered it.
    for result in results:
        if result.HasField("transaction"):
            request = ledger_pb2.GetTransactionRequest(transaction_id=result.transaction.id)
            assert stub.GetTransaction(request, timeout=RPC_TIMEOUT_SECONDS).transaction == result.transaction


def test_request_ids_work_per_item_inside_and_across_batches(stub: Stub) -> None:
    account_id = new_account(stub)
    unary = stub.CreateTransaction(
        item(account_id, 100, request_id="unary"), timeout=RPC_TIMEOUT_SECONDS
    ).transaction
    results = create(
        stub,
        [
            item(account_id, 100, request_id="unary"),  # the unary call's repeat
            item(account_id, 70, request_id="twice"),
            item(account_id, 70, request_id="twice"),  # a repeat inside the same batch
            item(account_id, 71, request_id="twice"),  # same request_id, other payload
        ],
    )
    assert errors(results) == ["ok", "ok", "ok", "ALREADY_EXISTS/REQUEST_ID_REUSED"]
    assert results[0].transaction.id == unary.id
    assert results[1].transaction.id == results[2].transaction.id
    repeat = create(stub, [item(account_id, 70, request_id="twice")])
    assert repeat[0].transaction.id == results[1].transaction.id
    assert balances(stub, account_id) == (170, 170)


def test_settle_and_cancel_batches(stub: Stub) -> None:
    account_id = new_account(stub)
    created = create(
        stub,
        [
            item(account_id, 1000),
            item(account_id, -100, settled=False),
            item(account_id, -200, settled=False),
        ],
    )
    ids = [result.transaction.id for result in created]
    settle = ledger_pb2.SettleTransactionsRequest(transaction_ids=[ids[1], ids[1], "bad", ids[0]])
    settled = list(stub.SettleTransactions(settle, timeout=RPC_TIMEOUT_SECONDS).results)
    # Settling a settled one returns it unchanged (a retry is safe), also within one batch.
    assert errors(settled) == ["ok", "ok", "INVALID_ARGUMENT/INVALID_TRANSACTION_ID", "ok"]
    assert settled[1].transaction.status == SETTLED
    cancel = ledger_pb2.CancelTransactionsRequest(transaction_ids=[ids[2], ids[1]])
    cancelled = list(stub.CancelTransactions(cancel, timeout=RPC_TIMEOUT_SECONDS).results)
    assert errors(cancelled) == ["ok", "FAILED_PRECONDITION/TRANSACTION_NOT_PENDING"]
    assert cancelled[0].transaction.status == CANCELLED
    assert balances(stub, account_id) == (900, 900)


def test_an_oversized_batch_is_refused_whole_and_an_empty_one_answers_nothing(stub: Stub) -> None:
    account_id = new_account(stub)
    with pytest.raises(grpc.RpcError) as refused:
        create(stub, [item(account_id, 1)] * (BATCH_ITEMS_MAX + 1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(refused.value).reason == "BATCH_TOO_LARGE"
    assert balances(stub, account_id) == (0, 0)
    assert create(stub, []) == []
    full = create(stub, [item(account_id, 1) for _ in range(BATCH_ITEMS_MAX)])
    assert errors(full) == ["ok"] * BATCH_ITEMS_MAX
    assert len({result.transaction.id for result in full}) == BATCH_ITEMS_MAX
    assert balances(stub, account_id) == (BATCH_ITEMS_MAX, BATCH_ITEMS_MAX)


def test_batch_over_every_shard_of_a_restarted_server(tmp_path: Path) -> None:
    """Items for accounts on every shard in one call; all of it survives a restart."""
    config = write_generated_config(tmp_path / "cluster_config.json", 3, 4, 3)
    with (
        standalone_server(tmp_path / "data", config, tmp_path / "first.log") as first,
        grpc.insecure_channel(first.address) as channel,
    ):
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        accounts = [new_account(stub) for _ in range(24)]
        results = create(stub, [item(account_id, 10 + n) for n, account_id in enumerate(accounts)])
        assert errors(results) == ["ok"] * len(accounts)
    with (
        standalone_server(tmp_path / "data", config, tmp_path / "second.log") as second,
        grpc.insecure_channel(second.address) as channel,
    ):
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        assert [balances(stub, account_id)[1] for account_id in accounts] == [10 + n for n in range(24)]
