"""Transaction numbers: time-ordered, so an account's new rows land together in LMDB, with random
low bits; a number that meets an existing one is retried with a new one, unary and batched.
The gateway runs in this process over real gRPC and a real LMDB-backed standalone backend."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.gateway import LedgerService, StandaloneBackend, time_ordered_transaction_number
from ledger_cluster.gateway.service import TRANSACTION_NUMBER_RANDOM_BITS
from ledger_cluster.ids import parse_transaction_id
from tests.inprocess import served

RPC_TIMEOUT_SECONDS = 10.0
NOW_NS = 1_795_000_000_123_456_789  # late 2026
Stub = ledger_pb2_grpc.LedgerServiceStub


def test_a_number_is_the_clock_with_random_low_bits() -> None:
    numbers = [time_ordered_transaction_number(NOW_NS) for _ in range(64)]
    assert {number >> TRANSACTION_NUMBER_RANDOM_BITS for number in numbers} == {
        NOW_NS >> TRANSACTION_NUMBER_RANDOM_BITS
    }
    assert len(set(numbers)) > 60  # 22 random bits: a repeat among 64 draws is very unlikely
    later = NOW_NS + 2**TRANSACTION_NUMBER_RANDOM_BITS
    assert min(time_ordered_transaction_number(later) for _ in range(64)) > max(numbers)


def _scripted(numbers: list[int]) -> Callable[[int], int]:
    """Hands out `numbers` in order, then fails the test if asked for more."""
    remaining = iter(numbers)
    return lambda _now_ns: next(remaining)


@pytest.fixture
def serve_gateway(tmp_path: Path) -> Iterator[Callable[[Callable[[int], int]], Stub]]:
    config = cluster_config.generate(1, 2, 1)
    servers_started = itertools.count()
    with ExitStack() as stack:

        def start(new_transaction_number: Callable[[int], int]) -> Stub:
            data_dir = tmp_path / f"data{next(servers_started)}"
            channel, _, _ = stack.enter_context(
                served(
                    lambda: LedgerService(
                        StandaloneBackend(config, data_dir), new_transaction_number=new_transaction_number
                    )
                )
            )
            return ledger_pb2_grpc.LedgerServiceStub(channel)

        yield start


def _new_account(stub: Stub) -> str:
    request = ledger_pb2.CreateAccountRequest()
    return str(stub.CreateAccount(request, timeout=RPC_TIMEOUT_SECONDS).account.id)


def _number_of(transaction: ledger_pb2.Transaction) -> int:
    return parse_transaction_id(transaction.id).transaction_number


def test_a_unary_create_that_meets_a_taken_number_is_retried(
    serve_gateway: Callable[[Callable[[int], int]], Stub],
) -> None:
    stub = serve_gateway(_scripted([7, 7, 7, 9]))
    account = _new_account(stub)
    first = stub.CreateTransaction(
        ledger_pb2.CreateTransactionRequest(account_id=account, amount=10, settled=True),
        timeout=RPC_TIMEOUT_SECONDS,
    ).transaction
    second = stub.CreateTransaction(
        ledger_pb2.CreateTransactionRequest(account_id=account, amount=5, settled=True),
        timeout=RPC_TIMEOUT_SECONDS,
    ).transaction
    assert (_number_of(first), _number_of(second)) == (7, 9)
    listed = stub.ListTransactions(
        ledger_pb2.ListTransactionsRequest(account_id=account, page_size=10), timeout=RPC_TIMEOUT_SECONDS
    ).transactions
    assert [(entry.id, entry.amount) for entry in listed] == [(first.id, 10), (second.id, 5)]
    balance = stub.GetAccount(ledger_pb2.GetAccountRequest(account_id=account), timeout=RPC_TIMEOUT_SECONDS)
    assert balance.account.settled_balance == 15


def test_a_batch_item_that_meets_a_taken_number_is_retried(
    serve_gateway: Callable[[Callable[[int], int]], Stub],
) -> None:
    # The first item meets a number a unary call took before; the second goes through at once.
    stub = serve_gateway(_scripted([3, 3, 4, 5]))
    account = _new_account(stub)
    earlier = stub.CreateTransaction(
        ledger_pb2.CreateTransactionRequest(account_id=account, amount=10, settled=True),
        timeout=RPC_TIMEOUT_SECONDS,
    ).transaction
    items = [
        ledger_pb2.CreateTransactionRequest(account_id=account, amount=amount, settled=True)
        for amount in (1, 2)
    ]
    results = stub.CreateTransactions(
        ledger_pb2.CreateTransactionsRequest(items=items), timeout=RPC_TIMEOUT_SECONDS
    ).results
    assert [result.WhichOneof("result") for result in results] == ["transaction"] * 2
    assert [_number_of(earlier)] + [_number_of(result.transaction) for result in results] == [3, 5, 4]
    assert [result.transaction.amount for result in results] == [1, 2]
    balance = stub.GetAccount(ledger_pb2.GetAccountRequest(account_id=account), timeout=RPC_TIMEOUT_SECONDS)
    assert balance.account.settled_balance == 13


def test_identical_batch_items_that_draw_the_same_number_are_each_stored(
    serve_gateway: Callable[[Callable[[int], int]], Stub],
) -> None:
    # Identical items of one call share `now`: with one number they would look like a repeat of
    # one write, and the second would be answered without being stored.
    stub = serve_gateway(_scripted([8, 8, 9, 10]))
    account = _new_account(stub)
    item = ledger_pb2.CreateTransactionRequest(account_id=account, amount=4, settled=True)
    results = stub.CreateTransactions(
        ledger_pb2.CreateTransactionsRequest(items=[item, item, item]), timeout=RPC_TIMEOUT_SECONDS
    ).results
    assert [_number_of(result.transaction) for result in results] == [8, 9, 10]
    listed = stub.ListTransactions(
        ledger_pb2.ListTransactionsRequest(account_id=account, page_size=10), timeout=RPC_TIMEOUT_SECONDS
    ).transactions
    assert len(listed) == 3
    balance = stub.GetAccount(ledger_pb2.GetAccountRequest(account_id=account), timeout=RPC_TIMEOUT_SECONDS)
    assert balance.account.settled_balance == 12
