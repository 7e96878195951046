"""Transfers on a real 3-node cluster behind its gateway: a cross-shard transfer is visible on
both shards once the call returns, and one whose caller vanished after the debit (the debit
command sent straight to the debit shard's leader, as a gateway that died would leave it) is
finished by the debit shard's driver, and expires by replicated time."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ledger_cluster import backup as cluster_backup
from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.config import ClusterConfig
from ledger_cluster.core import commands, verification
from ledger_cluster.ids import parse_account_id
from ledger_cluster.internal.v1 import core_pb2, node_pb2
from tests.cluster import Cluster, running_cluster

RPC_TIMEOUT_SECONDS = 10.0
# The bound for the cluster finishing a transfer by itself, with the driver's grace.
DRIVEN_WITHIN_SECONDS = 10.0
POLL_SECONDS = 0.1
ACCOUNT_TRIES_MAX = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("transfer-cluster")) as running:
        running.wait_healthy()
        yield running


def shard_of(config: ClusterConfig, account_id: str) -> str:
    return config.shard_for_account(parse_account_id(account_id)).shard_id


def cross_shard_pair(cluster: Cluster, balance: int) -> tuple[str, str]:
    stub = cluster.ledger_stub()
    debit = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account.id
    stub.CreateTransaction(
        ledger_pb2.CreateTransactionRequest(account_id=debit, amount=balance, settled=True),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    for _ in range(ACCOUNT_TRIES_MAX):
        credit = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account.id
        if shard_of(cluster.config, credit) != shard_of(cluster.config, debit):
            return debit, credit
    raise AssertionError("no account on another shard")


def balances(cluster: Cluster, account_id: str) -> tuple[int, int, int]:
    found = (
        cluster.ledger_stub()
        .GetAccount(
            ledger_pb2.GetAccountRequest(account_id=account_id, consistent=True), timeout=RPC_TIMEOUT_SECONDS
        )
        .account
    )
    return found.available_balance, found.settled_balance, found.credits_pending


def wait_for(condition: object, what: str, seconds: float = DRIVEN_WITHIN_SECONDS) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started


def test_a_cross_shard_transfer_is_whole_when_the_call_returns(cluster: Cluster) -> None:
    debit, credit = cross_shard_pair(cluster, 100)
    made = (
        cluster.ledger_stub()
        .CreateTransfer(
            ledger_pb2.CreateTransferRequest(
                debit_account_id=debit, credit_account_id=credit, amount=40, settled=True
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        .transfer
    )
    assert made.status == ledger_pb2.TRANSFER_STATUS_SETTLED
    assert balances(cluster, debit) == (60, 60, 0)
    assert balances(cluster, credit) == (40, 40, 0)


def send_debit_only(
    cluster: Cluster, debit: str, credit: str, amount: int, *, settled: bool, timeout_seconds: int
) -> str:
    """CreateTransfer on the debit shard's leader and nothing else: what a gateway that died
    right after the debit leaves behind."""
    shard_id = shard_of(cluster.config, debit)
    number = time.time_ns()
    command = commands.create_transfer(
        debit_account_id=parse_account_id(debit),
        transfer_number=number,
        credit_account_id=parse_account_id(credit),
        amount=amount,
        description="orphaned",
        settled=settled,
        request_id="",
        now=time.time_ns(),
        timeout_seconds=timeout_seconds,
    )
    result = cluster.update_at_leader(shard_id, command)
    assert result.outcome == core_pb2.OUTCOME_OK, result.message
    return f"{debit}{number:016x}"


def test_the_driver_finishes_a_transfer_whose_caller_vanished(cluster: Cluster) -> None:
    debit, credit = cross_shard_pair(cluster, 100)
    transfer_id = send_debit_only(cluster, debit, credit, 30, settled=True, timeout_seconds=0)
    assert balances(cluster, debit) == (70, 70, 0)
    seconds = wait_for(lambda: balances(cluster, credit) == (30, 30, 0), "the credit leg")
    found = cluster.ledger_stub().GetTransfer(
        ledger_pb2.GetTransferRequest(transfer_id=transfer_id), timeout=RPC_TIMEOUT_SECONDS
    )
    assert (
        found.transfer.status == ledger_pb2.TRANSFER_STATUS_SETTLED and found.transfer.credit_transaction_id
    )
    assert seconds < DRIVEN_WITHIN_SECONDS


def test_a_pending_cross_shard_transfer_expires_on_both_sides(cluster: Cluster) -> None:
    debit, credit = cross_shard_pair(cluster, 100)
    send_debit_only(cluster, debit, credit, 25, settled=False, timeout_seconds=1)
    stub = cluster.ledger_stub()

    def credit_statuses() -> list[int]:
        listing = stub.ListTransactions(
            ledger_pb2.ListTransactionsRequest(account_id=credit, consistent=True),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        return [transaction.status for transaction in listing.transactions]

    # The driver may store the credit leg and its expiry in one entry: only the end is sure.
    wait_for(lambda: credit_statuses() == [ledger_pb2.TRANSACTION_STATUS_EXPIRED], "the expired credit leg")
    assert balances(cluster, credit) == (0, 0, 0)
    assert balances(cluster, debit) == (100, 100, 0)


def test_verify_sees_every_transfer_whole(cluster: Cluster) -> None:
    """Runs after the tests above (module order): their transfers, settled, expired and driven,
    all meet across shards once the drivers are done."""
    stub = cluster.ledger_stub()
    debit, credit = cross_shard_pair(cluster, 100)
    stub.CreateTransfer(
        ledger_pb2.CreateTransferRequest(debit_account_id=debit, credit_account_id=credit, amount=7),
        timeout=RPC_TIMEOUT_SECONDS,
    )

    def transfers_whole() -> bool:
        check = cluster_backup.check_transfers(
            cluster_backup.verify_cluster(cluster.config, cluster.internal_credentials, lambda _: None)
        )
        return not check.failures

    wait_for(transfers_whole, "a quiet, whole cluster")
    shards = cluster_backup.verify_cluster(cluster.config, cluster.internal_credentials, lambda _: None)
    assert all(shard.clean for shard in shards)
    check = cluster_backup.check_transfers(shards)
    assert check.debit_legs == check.credit_legs >= 3
    assert check.unfinished == 0


def test_verify_names_legs_that_disagree() -> None:
    """check_transfers on made-up answers: a credit leg with another settled amount, or one
    missing, fails; the matching pair passes."""
    debit_leg = verification.leg_tuple_hash(1, 2, 3, 2, (10, 2, 10))
    matching = verification.leg_tuple_hash(1, 2, 3, 2, (10, 2, 10))
    other = verification.leg_tuple_hash(1, 2, 3, 2, (10, 2, 9))

    def shards(credit_hash: int, credit_legs: int, settled: str) -> list[cluster_backup.ShardVerification]:
        def answer(summary: node_pb2.TransferSummary) -> node_pb2.VerifyResponse:
            return node_pb2.VerifyResponse(transfers=summary)

        debit_side = node_pb2.TransferSummary(
            debit_legs_hash=debit_leg.to_bytes(16, "big"),
            debit_legs=1,
            currencies=[node_pb2.CurrencyFlow(currency="", settled="-10", pending="0")],
        )
        credit_side = node_pb2.TransferSummary(
            credit_legs_hash=credit_hash.to_bytes(16, "big"),
            credit_legs=credit_legs,
            currencies=[node_pb2.CurrencyFlow(currency="", settled=settled, pending="0")],
        )
        return [
            cluster_backup.ShardVerification(
                "s1", (cluster_backup.ReplicaVerification("n1", answer(debit_side), ""),), ()
            ),
            cluster_backup.ShardVerification(
                "s2", (cluster_backup.ReplicaVerification("n1", answer(credit_side), ""),), ()
            ),
        ]

    assert cluster_backup.check_transfers(shards(matching, 1, "10")).failures == ()
    assert cluster_backup.check_transfers(shards(other, 1, "9")).failures
    assert cluster_backup.check_transfers(shards(0, 0, "0")).failures
