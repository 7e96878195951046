"""The asyncio front door end to end: a LedgerServer in this process over real gRPC, with a
real LMDB-backed standalone backend. A test holds a shard's LMDB writer to decide exactly which
writes are in flight and which wait, then checks coalescing, deadlines, admission and the
answers to malformed input through the public API."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.gateway import LedgerService, StandaloneBackend
from ledger_cluster.status import error_details
from ledger_cluster.storage import WriteTransaction
from ledger_cluster.text import ECHOED_INPUT_CHARACTERS_MAX, escaped
from tests.inprocess import served

RPC_TIMEOUT_SECONDS = 10.0
HOLD_TIMEOUT_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.01
POLL_TIMEOUT_SECONDS = 10.0
SHARD_ID = "shard-00"
# Below the server's 4 MiB message limit: the id itself must be what is refused.
HUGE_INPUT_CHARACTERS = 3 * 1024 * 1024
# An error that echoes at most 64 characters of input stays well under this.
SHORT_ERROR_MESSAGE_CHARACTERS_MAX = 300
Stub = ledger_pb2_grpc.LedgerServiceStub


def poll_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_INTERVAL_SECONDS)


@contextmanager
def writer_held(backend: StandaloneBackend) -> Iterator[None]:
    """Hold the shard's LMDB writer (a write transaction that waits, then commits nothing), so the
    shard's next apply blocks until the block ends. It reaches into the core's storage: the
    only way to stall a real LMDB writer at a chosen moment from inside this process."""
    holding = threading.Event()
    release = threading.Event()

    def hold(transaction: WriteTransaction) -> None:
        holding.set()
        release.wait(HOLD_TIMEOUT_SECONDS)

    storage = backend.core(SHARD_ID)._storage
    holder = threading.Thread(target=storage.write, args=(hold,))
    holder.start()
    try:
        assert holding.wait(HOLD_TIMEOUT_SECONDS)
        yield
    finally:
        release.set()
        holder.join(HOLD_TIMEOUT_SECONDS)


@pytest.fixture
def backend(tmp_path: Path) -> StandaloneBackend:
    # One shard, so every account shares the queue under test. Closed by the server's stop.
    return StandaloneBackend(cluster_config.generate(1, 1, 1), tmp_path / "data")


@pytest.fixture
def channel(backend: StandaloneBackend) -> Iterator[grpc.Channel]:
    with served(lambda: LedgerService(backend)) as (served_channel, _, _):
        yield served_channel


def applied_index(backend: StandaloneBackend) -> int:
    return backend.core(SHARD_ID).applied_index()


def new_account(stub: Stub, balance: int) -> str:
    account = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account
    stub.CreateTransaction(
        ledger_pb2.CreateTransactionRequest(account_id=account.id, amount=balance, settled=True),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    return str(account.id)


def outcome(call: Callable[[], Any]) -> Any:
    """The call's response, or (status code, ErrorInfo reason) of its failure."""
    try:
        return call()
    except grpc.RpcError as error:
        details = error_details(error)
        return (details.code, details.reason)


def test_concurrent_callers_share_one_write_and_each_gets_its_own_answer(
    backend: StandaloneBackend, channel: grpc.Channel
) -> None:
    stub = Stub(channel)
    account = new_account(stub, 100)
    settled = stub.CreateTransaction(
        ledger_pb2.CreateTransactionRequest(account_id=account, amount=-1, settled=True),
        timeout=RPC_TIMEOUT_SECONDS,
    ).transaction
    stub.CreateTransaction(
        ledger_pb2.CreateTransactionRequest(account_id=account, amount=5, request_id="taken"),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    unknown_account = "00000000000000ff"

    def create(amount: int, request_id: str = "") -> Callable[[], Any]:
        request = ledger_pb2.CreateTransactionRequest(
            account_id=account, amount=amount, settled=True, request_id=request_id
        )
        return lambda: stub.CreateTransaction(request, timeout=RPC_TIMEOUT_SECONDS).transaction

    calls: dict[str, Callable[[], Any]] = {
        "overdraft": create(-1000),
        "not pending": lambda: stub.CancelTransaction(
            ledger_pb2.CancelTransactionRequest(transaction_id=settled.id), timeout=RPC_TIMEOUT_SECONDS
        ),
        "reused": create(6, "taken"),
        "batch": lambda: (
            stub.CreateTransactions(
                ledger_pb2.CreateTransactionsRequest(
                    items=[
                        ledger_pb2.CreateTransactionRequest(account_id=account, amount=2, settled=True),
                        ledger_pb2.CreateTransactionRequest(
                            account_id=unknown_account, amount=1, settled=True
                        ),
                        ledger_pb2.CreateTransactionRequest(account_id=account, amount=3, settled=True),
                    ]
                ),
                timeout=RPC_TIMEOUT_SECONDS,
            ).results
        ),
    }
    coalescer = backend.coalescer(SHARD_ID)
    with futures.ThreadPoolExecutor(max_workers=len(calls) + 1) as pool:
        with writer_held(backend):
            first = pool.submit(create(1))
            poll_until(
                lambda: coalescer.sending and coalescer.waiting_items == 0, "the first write in flight"
            )
            before = applied_index(backend)
            answers = {name: pool.submit(outcome, call) for name, call in calls.items()}
            poll_until(lambda: coalescer.waiting_items == 6, "every other write queued behind it")
        results = {name: answer.result(RPC_TIMEOUT_SECONDS) for name, answer in answers.items()}
        assert first.result(RPC_TIMEOUT_SECONDS).amount == 1
    # The first write, then one LMDB write transaction for the six that waited.
    assert applied_index(backend) == before + 2
    assert results["overdraft"].status == ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS
    assert results["not pending"] == (grpc.StatusCode.FAILED_PRECONDITION, "TRANSACTION_NOT_PENDING")
    assert results["reused"] == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    batch = results["batch"]
    assert [batch[0].transaction.amount, batch[2].transaction.amount] == [2, 3]
    assert (batch[1].error.code, batch[1].error.reason) == ("NOT_FOUND", "ACCOUNT_NOT_FOUND")
    balances = stub.GetAccount(ledger_pb2.GetAccountRequest(account_id=account), timeout=RPC_TIMEOUT_SECONDS)
    assert balances.account.settled_balance == 100 - 1 + 1 + 2 + 3


def test_a_call_whose_deadline_passes_while_queued_is_never_applied(
    backend: StandaloneBackend, channel: grpc.Channel
) -> None:
    stub = Stub(channel)
    account = new_account(stub, 100)
    coalescer = backend.coalescer(SHARD_ID)
    late = ledger_pb2.CreateTransactionRequest(account_id=account, amount=7, settled=True, request_id="late")
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        with writer_held(backend):
            first = pool.submit(
                stub.CreateTransaction,
                ledger_pb2.CreateTransactionRequest(account_id=account, amount=1, settled=True),
                timeout=RPC_TIMEOUT_SECONDS,
            )
            poll_until(
                lambda: coalescer.sending and coalescer.waiting_items == 0, "the first write in flight"
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateTransaction(late, timeout=0.3)
            # The gateway answered at its own deadline (before the caller's): not applied.
            details = error_details(caught.value)
            assert (details.code, details.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
            assert "not applied" in details.message
        first.result(RPC_TIMEOUT_SECONDS)
    listed = stub.ListTransactions(
        ledger_pb2.ListTransactionsRequest(account_id=account, consistent=True), timeout=RPC_TIMEOUT_SECONDS
    ).transactions
    assert [transaction.amount for transaction in listed] == [100, 1]
    # The same request_id is free: the late write was never stored.
    again = stub.CreateTransaction(late, timeout=RPC_TIMEOUT_SECONDS).transaction
    assert again.amount == 7


def test_health_answers_while_the_api_is_saturated(backend: StandaloneBackend, tmp_path: Path) -> None:
    calls_in_flight_max = 3
    with served(lambda: LedgerService(backend, calls_in_flight_max=calls_in_flight_max)) as (
        served_channel,
        server,
        _,
    ):
        stub = Stub(served_channel)
        account = new_account(stub, 10)
        health = health_pb2_grpc.HealthStub(served_channel)
        request = ledger_pb2.CreateTransactionRequest(account_id=account, amount=1, settled=True)
        with futures.ThreadPoolExecutor(max_workers=calls_in_flight_max) as pool:
            with writer_held(backend):
                held = [
                    pool.submit(stub.CreateTransaction, request, timeout=RPC_TIMEOUT_SECONDS)
                    for _ in range(calls_in_flight_max)
                ]
                poll_until(lambda: server.service.gate.in_flight == calls_in_flight_max, "the API saturated")
                with pytest.raises(grpc.RpcError) as refused:
                    stub.CreateTransaction(request, timeout=RPC_TIMEOUT_SECONDS)
                details = error_details(refused.value)
                assert (details.code, details.reason) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "TOO_MANY_REQUESTS",
                )
                for service in ("", "ledger_cluster.api.v1.LedgerService"):
                    answer = health.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_SECONDS
                    )
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
            amounts = [call.result(RPC_TIMEOUT_SECONDS).transaction.amount for call in held]
            assert amounts == [1] * calls_in_flight_max


@pytest.mark.parametrize(
    "call",
    [
        lambda stub, text: stub.GetAccount(
            ledger_pb2.GetAccountRequest(account_id=text), timeout=RPC_TIMEOUT_SECONDS
        ),
        lambda stub, text: stub.CreateTransaction(
            ledger_pb2.CreateTransactionRequest(account_id=text, amount=1), timeout=RPC_TIMEOUT_SECONDS
        ),
        lambda stub, text: stub.SettleTransaction(
            ledger_pb2.SettleTransactionRequest(transaction_id=text), timeout=RPC_TIMEOUT_SECONDS
        ),
    ],
    ids=["GetAccount", "CreateTransaction", "SettleTransaction"],
)
def test_a_huge_malformed_id_gets_a_short_invalid_argument(
    channel: grpc.Channel, call: Callable[[Stub, str], object]
) -> None:
    huge = "\n" + "z" * HUGE_INPUT_CHARACTERS
    with pytest.raises(grpc.RpcError) as caught:
        call(Stub(channel), huge)
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason in {"INVALID_ACCOUNT_ID", "INVALID_TRANSACTION_ID"}
    assert len(details.message) < SHORT_ERROR_MESSAGE_CHARACTERS_MAX, details.message
    assert "\n" not in details.message and "\\n" in details.message  # escaped, one line
    assert f"({HUGE_INPUT_CHARACTERS + 1} characters)" in details.message
    # The metadata names the input too: its first characters, escaped.
    assert list(details.metadata.values()) == [escaped(huge)]
    assert escaped(huge) == "\\n" + "z" * (ECHOED_INPUT_CHARACTERS_MAX - 1)


def test_a_huge_malformed_batch_item_id_gets_a_short_item_error(channel: grpc.Channel) -> None:
    stub = Stub(channel)
    results = stub.SettleTransactions(
        ledger_pb2.SettleTransactionsRequest(transaction_ids=["q" * HUGE_INPUT_CHARACTERS]),
        timeout=RPC_TIMEOUT_SECONDS,
    ).results
    error = cast(Any, results[0]).error
    assert (error.code, error.reason) == ("INVALID_ARGUMENT", "INVALID_TRANSACTION_ID")
    assert len(error.message) < SHORT_ERROR_MESSAGE_CHARACTERS_MAX
