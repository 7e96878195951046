"""Transfers and the second wave's account and transaction fields through a real
ledger-standalone process (real gRPC, real LMDB, 4 shards): same-shard and cross-shard
transfers, pending, partial settle, cancel, expiry by the server's own driver, idempotency,
and every refusal, which changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.ids import parse_account_id
from ledger_cluster.status import error_details
from tests.processes import StandaloneServer, standalone_server, write_generated_config

RPC_TIMEOUT_SECONDS = 10.0
EXPIRY_WAIT_SECONDS = 15.0
POLL_SECONDS = 0.05
# New accounts tried before giving up on finding one on (or off) a given shard.
SHARD_SEARCH_TRIES_MAX = 200
Stub = ledger_pb2_grpc.LedgerServiceStub
T = ledger_pb2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    base = tmp_path_factory.mktemp("transfers")
    config = write_generated_config(base / "cluster_config.json", 3, 4, 3)
    with standalone_server(base / "data", config, base / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: StandaloneServer) -> Iterator[Stub]:
    with grpc.insecure_channel(server.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


def shard_of(server: StandaloneServer, account_id: str) -> str:
    config = cluster_config.load(server.config_path)
    return config.shard_for_account(parse_account_id(account_id)).shard_id


def new_account(stub: Stub, balance: int = 0, **fields: Any) -> str:
    account = stub.CreateAccount(T.CreateAccountRequest(**fields), timeout=RPC_TIMEOUT_SECONDS).account
    if balance:
        stub.CreateTransaction(
            T.CreateTransactionRequest(account_id=account.id, amount=balance, settled=True),
            timeout=RPC_TIMEOUT_SECONDS,
        )
    return str(account.id)


def account_beside(server: StandaloneServer, stub: Stub, other: str, same_shard: bool, **fields: Any) -> str:
    """A new empty account on the shard of `other` (`same_shard`), or on another shard."""
    other_shard = shard_of(server, other)
    for _ in range(SHARD_SEARCH_TRIES_MAX):
        candidate = new_account(stub, 0, **fields)
        if (shard_of(server, candidate) == other_shard) == same_shard:
            return candidate
    raise AssertionError(f"no account on the wanted shard within {SHARD_SEARCH_TRIES_MAX} tries")


def pair(
    server: StandaloneServer, stub: Stub, same_shard: bool, balance: int = 100, **fields: Any
) -> tuple[str, str]:
    """A funded debit account and a credit account, on one shard or on two."""
    debit = new_account(stub, balance, **fields)
    return debit, account_beside(server, stub, debit, same_shard, **fields)


def account(stub: Stub, account_id: str) -> T.Account:
    return stub.GetAccount(
        T.GetAccountRequest(account_id=account_id, consistent=True), timeout=RPC_TIMEOUT_SECONDS
    ).account


def balances(stub: Stub, account_id: str) -> tuple[int, int]:
    found = account(stub, account_id)
    return found.available_balance, found.settled_balance


def transfer(stub: Stub, debit: str, credit: str, amount: int, **fields: Any) -> T.Transfer:
    request = T.CreateTransferRequest(
        debit_account_id=debit, credit_account_id=credit, amount=amount, **fields
    )
    return stub.CreateTransfer(request, timeout=RPC_TIMEOUT_SECONDS).transfer


def refusal(call: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    details = error_details(raised.value)
    return raised.value.code(), details.reason, dict(details.metadata)


def legs(stub: Stub, account_id: str) -> list[T.Transaction]:
    listing = stub.ListTransactions(
        T.ListTransactionsRequest(account_id=account_id), timeout=RPC_TIMEOUT_SECONDS
    )
    return [transaction for transaction in listing.transactions if transaction.transfer_id]


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_a_settled_transfer_moves_money_and_lists_both_legs(
    server: StandaloneServer, stub: Stub, same_shard: bool
) -> None:
    debit, credit = pair(server, stub, same_shard)
    made = transfer(stub, debit, credit, 30, settled=True, description="rent", metadata={"order": "17"})
    assert made.status == T.TRANSFER_STATUS_SETTLED
    assert (made.amount, made.settled_amount, made.description) == (30, 30, "rent")
    assert dict(made.metadata) == {"order": "17"}
    assert made.debit_transaction_id == made.id and made.id.startswith(debit)
    assert made.credit_transaction_id.startswith(credit)
    assert balances(stub, debit) == (70, 70)
    assert balances(stub, credit) == (30, 30)
    assert account(stub, credit).credits_settled == 30
    (debit_leg,) = legs(stub, debit)
    (credit_leg,) = legs(stub, credit)
    assert (debit_leg.id, debit_leg.amount, debit_leg.transfer_id, debit_leg.counterparty_account_id) == (
        made.debit_transaction_id,
        -30,
        made.id,
        credit,
    )
    assert (credit_leg.id, credit_leg.amount, credit_leg.transfer_id, credit_leg.counterparty_account_id) == (
        made.credit_transaction_id,
        30,
        made.id,
        debit,
    )
    got = stub.GetTransfer(
        T.GetTransferRequest(transfer_id=made.id, consistent=True), timeout=RPC_TIMEOUT_SECONDS
    )
    assert got.transfer.status == T.TRANSFER_STATUS_SETTLED
    assert got.transfer.credit_transaction_id == made.credit_transaction_id


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_a_pending_transfer_holds_then_settles_partly(
    server: StandaloneServer, stub: Stub, same_shard: bool
) -> None:
    debit, credit = pair(server, stub, same_shard)
    made = transfer(stub, debit, credit, 30)
    assert made.status == T.TRANSFER_STATUS_PENDING
    assert balances(stub, debit) == (70, 100)
    assert balances(stub, credit) == (0, 0)
    assert account(stub, credit).credits_pending == 30
    settled = stub.SettleTransfer(
        T.SettleTransferRequest(transfer_id=made.id, amount=20), timeout=RPC_TIMEOUT_SECONDS
    )
    assert (settled.transfer.status, settled.transfer.settled_amount) == (T.TRANSFER_STATUS_SETTLED, 20)
    assert balances(stub, debit) == (80, 80)
    assert balances(stub, credit) == (20, 20)
    assert account(stub, credit).credits_pending == 0
    again = stub.SettleTransfer(
        T.SettleTransferRequest(transfer_id=made.id, amount=20), timeout=RPC_TIMEOUT_SECONDS
    )
    assert again.transfer.settled_amount == 20
    assert refusal(
        lambda: stub.SettleTransfer(
            T.SettleTransferRequest(transfer_id=made.id, amount=10), timeout=RPC_TIMEOUT_SECONDS
        )
    )[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SETTLE_AMOUNT_MISMATCH",
    )
    credit_leg = legs(stub, credit)[0]
    assert (credit_leg.status, credit_leg.settled_amount) == (T.TRANSACTION_STATUS_SETTLED, 20)


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_a_cancelled_transfer_moves_nothing(server: StandaloneServer, stub: Stub, same_shard: bool) -> None:
    debit, credit = pair(server, stub, same_shard)
    made = transfer(stub, debit, credit, 40)
    cancelled = stub.CancelTransfer(T.CancelTransferRequest(transfer_id=made.id), timeout=RPC_TIMEOUT_SECONDS)
    assert cancelled.transfer.status == T.TRANSFER_STATUS_CANCELLED
    assert balances(stub, debit) == (100, 100)
    assert balances(stub, credit) == (0, 0)
    assert account(stub, credit).credits_pending == 0
    assert refusal(
        lambda: stub.SettleTransfer(T.SettleTransferRequest(transfer_id=made.id), timeout=RPC_TIMEOUT_SECONDS)
    )[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TRANSFER_NOT_PENDING",
    )


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_a_pending_transfer_expires_by_replicated_time(
    server: StandaloneServer, stub: Stub, same_shard: bool
) -> None:
    debit, credit = pair(server, stub, same_shard)
    made = transfer(stub, debit, credit, 25, timeout_seconds=1)
    assert made.expires_at == made.created_at + 1_000_000_000
    give_up = time.monotonic() + EXPIRY_WAIT_SECONDS
    while True:
        found = stub.GetTransfer(
            T.GetTransferRequest(transfer_id=made.id), timeout=RPC_TIMEOUT_SECONDS
        ).transfer
        if found.status == T.TRANSFER_STATUS_EXPIRED and not account(stub, credit).credits_pending:
            break
        assert time.monotonic() < give_up, f"still {T.TransferStatus.Name(found.status)}"
        time.sleep(POLL_SECONDS)
    assert balances(stub, debit) == (100, 100)
    assert legs(stub, credit)[0].status == T.TRANSACTION_STATUS_EXPIRED
    assert refusal(
        lambda: stub.SettleTransfer(T.SettleTransferRequest(transfer_id=made.id), timeout=RPC_TIMEOUT_SECONDS)
    )[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TRANSFER_EXPIRED",
    )


def test_a_pending_transaction_expires_and_settles_partly(stub: Stub) -> None:
    account_id = new_account(stub, 100)
    expiring = stub.CreateTransaction(
        T.CreateTransactionRequest(account_id=account_id, amount=-10, timeout_seconds=1),
        timeout=RPC_TIMEOUT_SECONDS,
    ).transaction
    partial = stub.CreateTransaction(
        T.CreateTransactionRequest(account_id=account_id, amount=-50), timeout=RPC_TIMEOUT_SECONDS
    ).transaction
    settled = stub.SettleTransaction(
        T.SettleTransactionRequest(transaction_id=partial.id, amount=-20), timeout=RPC_TIMEOUT_SECONDS
    )
    assert (settled.transaction.status, settled.transaction.settled_amount) == (
        T.TRANSACTION_STATUS_SETTLED,
        -20,
    )
    assert refusal(
        lambda: stub.SettleTransaction(
            T.SettleTransactionRequest(transaction_id=expiring.id, amount=-11), timeout=RPC_TIMEOUT_SECONDS
        )
    )[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SETTLE_AMOUNT",
    )
    give_up = time.monotonic() + EXPIRY_WAIT_SECONDS
    while (
        stub.GetTransaction(
            T.GetTransactionRequest(transaction_id=expiring.id), timeout=RPC_TIMEOUT_SECONDS
        ).transaction.status
        != T.TRANSACTION_STATUS_EXPIRED
    ):
        assert time.monotonic() < give_up
        time.sleep(POLL_SECONDS)
    assert balances(stub, account_id) == (80, 80)
    assert refusal(
        lambda: stub.CancelTransaction(
            T.CancelTransactionRequest(transaction_id=expiring.id), timeout=RPC_TIMEOUT_SECONDS
        )
    )[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TRANSACTION_EXPIRED",
    )


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_funds_and_overdraft_limit_decide(server: StandaloneServer, stub: Stub, same_shard: bool) -> None:
    debit, credit = pair(server, stub, same_shard, balance=10, overdraft_limit=5)
    refused = transfer(stub, debit, credit, 16, settled=True)
    assert refused.status == T.TRANSFER_STATUS_INSUFFICIENT_FUNDS and not refused.credit_transaction_id
    assert balances(stub, credit) == (0, 0) and legs(stub, credit) == []
    taken = transfer(stub, debit, credit, 15, settled=True)
    assert taken.status == T.TRANSFER_STATUS_SETTLED
    assert balances(stub, debit) == (-5, -5)
    assert balances(stub, credit) == (15, 15)


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_a_request_id_makes_a_transfer_once(server: StandaloneServer, stub: Stub, same_shard: bool) -> None:
    debit, credit = pair(server, stub, same_shard)
    first = transfer(stub, debit, credit, 5, settled=True, request_id="pay-1")
    second = transfer(stub, debit, credit, 5, settled=True, request_id="pay-1")
    assert second.id == first.id and second.credit_transaction_id == first.credit_transaction_id
    assert balances(stub, credit) == (5, 5)
    assert refusal(lambda: transfer(stub, debit, credit, 6, settled=True, request_id="pay-1"))[:2] == (
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_accounts_of_one_currency_transfer_and_of_two_do_not(
    server: StandaloneServer, stub: Stub, same_shard: bool
) -> None:
    """On one shard the core reads the credit account's currency itself (the gateway reads it
    only across shards): an EUR-to-EUR transfer there once failed as CURRENCY_MISMATCH."""
    debit, credit = pair(server, stub, same_shard, currency="EUR")
    done = transfer(stub, debit, credit, 30, settled=True)
    assert done.status == T.TRANSFER_STATUS_SETTLED
    assert balances(stub, debit) == (70, 70) and balances(stub, credit) == (30, 30)
    dollars = account_beside(server, stub, debit, same_shard, currency="USD")
    code, reason, _ = refusal(lambda: transfer(stub, debit, dollars, 1))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH")
    assert balances(stub, debit) == (70, 70) and balances(stub, dollars) == (0, 0)


def test_refusals_change_nothing(server: StandaloneServer, stub: Stub) -> None:
    debit, credit = pair(server, stub, same_shard=False)
    euro = new_account(stub, 0, currency="EUR")
    missing = "00000000000000ff"
    cases = [
        (lambda: transfer(stub, debit, debit, 1), grpc.StatusCode.INVALID_ARGUMENT, "SAME_ACCOUNT", {}),
        (lambda: transfer(stub, debit, credit, 0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", {}),
        (
            lambda: transfer(stub, debit, euro, 1),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CURRENCY_MISMATCH",
            {},
        ),
        (
            lambda: transfer(stub, debit, missing, 1),
            grpc.StatusCode.NOT_FOUND,
            "ACCOUNT_NOT_FOUND",
            {"side": "credit"},
        ),
        (
            lambda: transfer(stub, missing, credit, 1),
            grpc.StatusCode.NOT_FOUND,
            "ACCOUNT_NOT_FOUND",
            {"side": "debit"},
        ),
        (
            lambda: transfer(stub, debit, credit, 1, metadata={"Bad Key": "x"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_METADATA",
            {},
        ),
        (
            lambda: transfer(stub, debit, credit, 1, settled=True, timeout_seconds=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TIMEOUT",
            {},
        ),
        (
            lambda: transfer(stub, debit, credit, 1, timeout_seconds=31 * 86400),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TIMEOUT",
            {},
        ),
        (
            lambda: new_account(stub, 0, currency="usd"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_CURRENCY",
            {},
        ),
        (
            lambda: new_account(stub, 0, overdraft_limit=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_OVERDRAFT_LIMIT",
            {},
        ),
        (
            lambda: new_account(stub, 0, metadata={f"k{index}": "v" for index in range(17)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_METADATA",
            {},
        ),
        (
            lambda: stub.GetTransfer(
                T.GetTransferRequest(transfer_id=debit + "0" * 16), timeout=RPC_TIMEOUT_SECONDS
            ),
            grpc.StatusCode.NOT_FOUND,
            "TRANSFER_NOT_FOUND",
            {},
        ),
    ]
    for call, code, reason, metadata in cases:
        got_code, got_reason, got_metadata = refusal(call)
        assert (got_code, got_reason) == (code, reason)
        assert metadata.items() <= got_metadata.items()
    assert balances(stub, debit) == (100, 100)
    assert legs(stub, debit) == [] and legs(stub, credit) == []


def test_a_leg_is_settled_only_through_its_transfer(server: StandaloneServer, stub: Stub) -> None:
    debit, credit = pair(server, stub, same_shard=False)
    made = transfer(stub, debit, credit, 10)
    assert refusal(
        lambda: stub.SettleTransaction(
            T.SettleTransactionRequest(transaction_id=made.debit_transaction_id), timeout=RPC_TIMEOUT_SECONDS
        )
    )[:2] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TRANSFER_LEG",
    )


def test_create_transfers_answers_each_item(server: StandaloneServer, stub: Stub) -> None:
    debit, credit = pair(server, stub, same_shard=False)
    near, _ = pair(server, stub, same_shard=True)
    items = [
        T.CreateTransferRequest(debit_account_id=debit, credit_account_id=credit, amount=10, settled=True),
        T.CreateTransferRequest(debit_account_id=debit, credit_account_id=debit, amount=10),
        T.CreateTransferRequest(debit_account_id=debit, credit_account_id=near, amount=500, settled=True),
        T.CreateTransferRequest(debit_account_id=debit, credit_account_id=credit, amount=5),
    ]
    results = stub.CreateTransfers(T.CreateTransfersRequest(items=items), timeout=RPC_TIMEOUT_SECONDS).results
    assert [result.WhichOneof("result") for result in results] == [
        "transfer",
        "error",
        "transfer",
        "transfer",
    ]
    assert results[1].error.reason == "SAME_ACCOUNT"
    assert results[2].transfer.status == T.TRANSFER_STATUS_INSUFFICIENT_FUNDS
    assert balances(stub, debit) == (85, 90)
    assert balances(stub, credit) == (10, 10)


def test_accounts_and_transactions_keep_their_new_fields(stub: Stub) -> None:
    made = stub.CreateAccount(
        T.CreateAccountRequest(
            currency="USD", overdraft_limit=50, metadata={"owner": "ada"}, request_id="acct-fields"
        ),
        timeout=RPC_TIMEOUT_SECONDS,
    ).account
    assert (made.currency, made.overdraft_limit, dict(made.metadata)) == ("USD", 50, {"owner": "ada"})
    again = stub.CreateAccount(
        T.CreateAccountRequest(
            currency="USD", overdraft_limit=50, metadata={"owner": "ada"}, request_id="acct-fields"
        ),
        timeout=RPC_TIMEOUT_SECONDS,
    ).account
    assert again.id == made.id
    assert refusal(
        lambda: stub.CreateAccount(
            T.CreateAccountRequest(currency="EUR", request_id="acct-fields"), timeout=RPC_TIMEOUT_SECONDS
        )
    )[:2] == (
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    spent = stub.CreateTransaction(
        T.CreateTransactionRequest(account_id=made.id, amount=-40, settled=True, metadata={"why": "coffee"}),
        timeout=RPC_TIMEOUT_SECONDS,
    ).transaction
    assert spent.status == T.TRANSACTION_STATUS_SETTLED and dict(spent.metadata) == {"why": "coffee"}
    read = account(stub, made.id)
    assert (read.available_balance, read.debits_settled, dict(read.metadata)) == (-40, 40, {"owner": "ada"})
    listed = stub.ListTransactions(T.ListTransactionsRequest(account_id=made.id), timeout=RPC_TIMEOUT_SECONDS)
    assert dict(listed.transactions[0].metadata) == {"why": "coffee"}


@pytest.mark.parametrize("same_shard", [True, False], ids=["same-shard", "cross-shard"])
def test_a_credit_past_int64_is_refused_and_moves_nothing(
    server: StandaloneServer, stub: Stub, same_shard: bool
) -> None:
    """Same shard: refused before anything is stored. Across shards: the credit shard refuses
    the leg after the debit, and the debit is reversed before the call answers."""
    debit, credit = pair(server, stub, same_shard)
    stub.CreateTransaction(
        T.CreateTransactionRequest(account_id=credit, amount=2**63 - 11, settled=True),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    code, reason, _ = refusal(lambda: transfer(stub, debit, credit, 50, settled=True))
    assert (code, reason) == (grpc.StatusCode.OUT_OF_RANGE, "BALANCE_OVERFLOW")
    assert balances(stub, debit) == (100, 100)
    assert balances(stub, credit) == (2**63 - 11, 2**63 - 11)
    for leg in legs(stub, debit) + legs(stub, credit):
        assert leg.status == T.TRANSACTION_STATUS_CANCELLED
