"""`ledger-dev scenario-2` against a real `ledger-standalone` process over gRPC on 127.0.0.1: a
transfer between accounts on two shards walked through a partial settle, a refusal for funds and
an expiry, with every printed status and balance checked, and the stored legs read back."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ledger_cluster import bench
from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.ids import parse_account_id
from tests.processes import (
    REPO_ROOT,
    StandaloneServer,
    run_dev_cli,
    standalone_server,
    write_generated_config,
)

RPC_TIMEOUT_SECONDS = 10.0
# The scenario waits up to its own expiry deadline (2 s + 20 s) twice at most, plus its calls.
CLI_TIMEOUT_SECONDS = 90.0
SHARDS = 4

SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS
EXPIRED = ledger_pb2.TRANSACTION_STATUS_EXPIRED

STEP_LINE = re.compile(
    r"^(?P<step>\d+)\s{2}(?P<action>.+?)\s{2,}(?P<id>[0-9a-f]{32})\s+(?P<amount>-?\d+)\s+(?P<settled>-?\d+)\s+"
    r"(?P<status>[A-Z_]+)\s+debit available/settled (?P<debit>-?\d+/-?\d+)"
    r"\s+credit available/settled (?P<credit>-?\d+/-?\d+)$"
)
HEADER_LINE = re.compile(
    r"^scenario-2 from (?P<debit>[0-9a-f]{16}) \((?P<debit_shard>[a-z0-9-]+)\)"
    r" to (?P<credit>[0-9a-f]{16}) \((?P<credit_shard>[a-z0-9-]+)\) via "
)

Stub = ledger_pb2_grpc.LedgerServiceStub


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generated_config(tmp_path_factory.mktemp("config") / "cluster_config.json", 3, SHARDS, 3)


@pytest.fixture(scope="module")
def server(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    base = tmp_path_factory.mktemp("standalone")
    with standalone_server(base / "data", config_path, base / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: StandaloneServer) -> Iterator[Stub]:
    with grpc.insecure_channel(server.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


def scenario_2(
    server: StandaloneServer, config_path: Path, *arguments: str
) -> subprocess.CompletedProcess[str]:
    return run_dev_cli(
        ["scenario-2", "--gateway", server.address, "--config", str(config_path), *arguments],
        CLI_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
    )


def list_all(stub: Stub, account_id: str) -> list[ledger_pb2.Transaction]:
    request = ledger_pb2.ListTransactionsRequest(account_id=account_id, page_size=1000)
    return list(stub.ListTransactions(request, timeout=RPC_TIMEOUT_SECONDS).transactions)


def test_scenario_2_walks_a_transfer_across_shards(
    server: StandaloneServer, config_path: Path, stub: Stub
) -> None:
    completed = scenario_2(server, config_path)
    output = completed.stdout
    assert completed.returncode == 0, f"stdout:\n{output}\nstderr:\n{completed.stderr}"
    header = next(match for line in output.splitlines() if (match := HEADER_LINE.match(line)))
    debit_id, credit_id = header["debit"], header["credit"]
    config = cluster_config.load(config_path)
    assert config.shard_for_account(parse_account_id(debit_id)).shard_id == header["debit_shard"]
    assert config.shard_for_account(parse_account_id(credit_id)).shard_id == header["credit_shard"]
    assert header["debit_shard"] != header["credit_shard"], output

    steps = [match for line in output.splitlines() if (match := STEP_LINE.match(line))]
    assert [int(step["step"]) for step in steps] == [1, 2, 3, 4, 5, 6], output
    assert [
        (int(step["amount"]), int(step["settled"]), step["status"], step["debit"], step["credit"])
        for step in steps
    ] == [
        (100, 100, "SETTLED", "100/100", "0/0"),
        (30, 0, "PENDING", "70/100", "0/0"),
        (30, 20, "SETTLED", "80/80", "20/20"),
        (1000, 0, "INSUFFICIENT_FUNDS", "80/80", "20/20"),
        (10, 0, "PENDING", "70/80", "20/20"),
        (10, 0, "EXPIRED", "80/80", "20/20"),
    ], output
    top_up, pending, settled, refused, expiring, expired = (step["id"] for step in steps)
    assert pending == settled, "step 3 settles the transfer of step 2"
    assert expiring == expired, "step 6 is the transfer of step 5, expired"
    for transfer_id in (pending, refused, expiring):
        assert transfer_id.startswith(debit_id), "a transfer id starts with its debit account id"
    assert top_up.startswith(debit_id)
    assert "final balances: debit available/settled 80/80  credit available/settled 20/20" in output

    # What the server stores agrees with the printed lines: the debit legs are the transfers
    # themselves, and only the transfers that got past the funds check have a credit leg.
    transfers = {
        transfer_id: stub.GetTransfer(
            ledger_pb2.GetTransferRequest(transfer_id=transfer_id, consistent=True),
            timeout=RPC_TIMEOUT_SECONDS,
        ).transfer
        for transfer_id in (pending, refused, expiring)
    }
    for transfer in transfers.values():
        assert (transfer.debit_account_id, transfer.credit_account_id) == (debit_id, credit_id)
        assert transfer.debit_transaction_id == transfer.id
    debit_legs = list_all(stub, debit_id)
    assert [(t.id, t.amount, t.status, t.transfer_id) for t in debit_legs] == [
        (top_up, 100, SETTLED, ""),
        (pending, -30, SETTLED, pending),
        (refused, -1000, INSUFFICIENT_FUNDS, refused),
        (expiring, -10, EXPIRED, expiring),
    ]
    assert debit_legs[1].settled_amount == -20
    assert {t.counterparty_account_id for t in debit_legs[1:]} == {credit_id}
    credit_legs = list_all(stub, credit_id)
    assert [(t.id, t.amount, t.status, t.transfer_id, t.counterparty_account_id) for t in credit_legs] == [
        (transfers[pending].credit_transaction_id, 30, SETTLED, pending, debit_id),
        (transfers[expiring].credit_transaction_id, 10, EXPIRED, expiring, debit_id),
    ]
    assert credit_legs[0].settled_amount == 20
    # Each leg is printed in its account's listing.
    for leg in (*debit_legs, *credit_legs):
        assert leg.id in output


def test_scenario_2_refuses_two_accounts_of_one_shard(
    server: StandaloneServer, config_path: Path, stub: Stub
) -> None:
    shard = cluster_config.load(config_path).shards[0]
    account_ids = []
    for _ in range(2):
        _, request_id = bench.account_request_in_shard(shard.lower_bound, shard.upper_bound)
        request = ledger_pb2.CreateAccountRequest(request_id=request_id)
        account_ids.append(stub.CreateAccount(request, timeout=RPC_TIMEOUT_SECONDS).account.id)
    completed = scenario_2(
        server, config_path, "--debit-account-id", account_ids[0], "--credit-account-id", account_ids[1]
    )
    assert completed.returncode == 2, completed.stdout
    assert f"both accounts are on {shard.shard_id}; scenario-2 crosses shards" in completed.stderr
    for account_id in account_ids:
        assert list_all(stub, account_id) == [], "nothing was written"
