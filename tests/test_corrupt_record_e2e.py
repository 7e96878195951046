"""A real `ledger-standalone` process whose LMDB state holds a corrupt account row: calls that
need that row fail with DATA_LOSS `CORRUPT_RECORD` naming the damage, nothing of them is
applied, and the server goes on serving every other account, even in the same batch (one
LMDB write transaction) as the refused items."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.core import TABLE_NAMES, tables
from ledger_cluster.ids import parse_account_id
from ledger_cluster.status import error_details
from ledger_cluster.storage import Storage, WriteTransaction
from tests.cluster import new_cluster, started_cluster
from tests.processes import StandaloneServer, standalone_server, write_generated_config

RPC_TIMEOUT_SECONDS = 10.0
SHARDS = 2
# With SHARDS shards, this many accounts put two on one shard.
ACCOUNTS_CREATED = SHARDS + 1
ACCOUNT_FLAGS_OFFSET = 1  # records.py: after the layout byte
UNKNOWN_ACCOUNT_FLAG = 0x80
FIRST_DEPOSIT = 100
CORRUPT = (grpc.StatusCode.DATA_LOSS, "CORRUPT_RECORD")
ROWS_SCANNED_MAX = 100


@dataclass(frozen=True)
class Setup:
    data_dir: Path
    config_path: Path
    log_path: Path
    shard_id: str
    corrupt_account: str
    healthy_account: str


@contextmanager
def stub_of(server: StandaloneServer) -> Iterator[ledger_pb2_grpc.LedgerServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


def deposit(
    stub: ledger_pb2_grpc.LedgerServiceStub, account_id: str, amount: int
) -> ledger_pb2.CreateTransactionResponse:
    request = ledger_pb2.CreateTransactionRequest(account_id=account_id, amount=amount, settled=True)
    return stub.CreateTransaction(request, timeout=RPC_TIMEOUT_SECONDS)


def two_accounts_of_one_shard(
    stub: ledger_pb2_grpc.LedgerServiceStub, config: cluster_config.ClusterConfig
) -> tuple[str, str, str]:
    by_shard: dict[str, list[str]] = {}
    for _ in range(ACCOUNTS_CREATED):
        account = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account
        deposit(stub, account.id, FIRST_DEPOSIT)
        shard = config.shard_for_account(parse_account_id(account.id))
        by_shard.setdefault(shard.shard_id, []).append(account.id)
    shard_id, accounts = next((shard_id, ids) for shard_id, ids in sorted(by_shard.items()) if len(ids) >= 2)
    return shard_id, accounts[0], accounts[1]


def set_unknown_flag(data_dir: Path, shard_id: str, account_id: str) -> None:
    """Damage the row while no process has the environment open."""
    storage = Storage(data_dir / "replicas" / shard_id, TABLE_NAMES)
    key = tables.account_key(parse_account_id(account_id))

    def damage(transaction: WriteTransaction) -> None:
        data = bytearray(transaction.get(tables.ACCOUNTS, key) or b"")
        assert data, f"no row of {account_id} in {shard_id}"
        data[ACCOUNT_FLAGS_OFFSET] |= UNKNOWN_ACCOUNT_FLAG
        transaction.put(tables.ACCOUNTS, key, bytes(data))

    try:
        storage.write(damage)
    finally:
        storage.close()


def stored_rows_of(data_dir: Path, shard_id: str, account_id: str) -> tuple[bytes | None, int]:
    """(the account row, how many transaction rows it has), read with no server running."""
    storage = Storage(data_dir / "replicas" / shard_id, TABLE_NAMES)
    prefix = tables.account_key(parse_account_id(account_id))
    try:
        with storage.read() as view:
            rows = view.scan(tables.TRANSACTIONS, prefix, prefix, ROWS_SCANNED_MAX)
            return view.get(tables.ACCOUNTS, prefix), len(rows)
    finally:
        storage.close()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    config_path = write_generated_config(tmp_path / "cluster_config.json", shards=SHARDS)
    config = cluster_config.load(config_path)
    data_dir, log_path = tmp_path / "data", tmp_path / "standalone.log"
    with standalone_server(data_dir, config_path, log_path) as server, stub_of(server) as stub:
        shard_id, corrupt_account, healthy_account = two_accounts_of_one_shard(stub, config)
    set_unknown_flag(data_dir, shard_id, corrupt_account)
    return Setup(data_dir, config_path, log_path, shard_id, corrupt_account, healthy_account)


def expect_corrupt(error: grpc.RpcError) -> None:
    details = error_details(error)
    assert (details.code, details.reason) == CORRUPT, details
    assert "flags 0x80 are unknown" in details.message, details


def test_a_corrupt_row_is_answered_data_loss_and_the_server_serves_the_rest(setup: Setup) -> None:
    damaged_row, _ = stored_rows_of(setup.data_dir, setup.shard_id, setup.corrupt_account)
    with (
        standalone_server(setup.data_dir, setup.config_path, setup.log_path) as server,
        stub_of(server) as stub,
    ):
        with pytest.raises(grpc.RpcError) as refused_write:
            deposit(stub, setup.corrupt_account, 5)
        expect_corrupt(refused_write.value)
        with pytest.raises(grpc.RpcError) as refused_read:
            stub.GetAccount(
                ledger_pb2.GetAccountRequest(account_id=setup.corrupt_account),
                timeout=RPC_TIMEOUT_SECONDS,
            )
        expect_corrupt(refused_read.value)

        amounts = [1, 2, 3, 4]
        owners = [setup.corrupt_account, setup.healthy_account] * 2
        batch = ledger_pb2.CreateTransactionsRequest(
            items=[
                ledger_pb2.CreateTransactionRequest(account_id=owner, amount=amount, settled=True)
                for owner, amount in zip(owners, amounts, strict=True)
            ]
        )
        results = stub.CreateTransactions(batch, timeout=RPC_TIMEOUT_SECONDS).results

        assert [result.WhichOneof("result") for result in results] == ["error", "transaction"] * 2
        for result in results[::2]:
            assert (result.error.code, result.error.reason) == ("DATA_LOSS", "CORRUPT_RECORD"), result
        healthy = stub.GetAccount(
            ledger_pb2.GetAccountRequest(account_id=setup.healthy_account), timeout=RPC_TIMEOUT_SECONDS
        ).account
        assert healthy.settled_balance == FIRST_DEPOSIT + 2 + 4
        assert deposit(stub, setup.healthy_account, 7).transaction.amount == 7
        assert server.process.is_running(), server.process.describe()

    # Nothing of the refused writes was stored: the damaged row as it was, its one deposit.
    assert stored_rows_of(setup.data_dir, setup.shard_id, setup.corrupt_account) == (damaged_row, 1)


# -- a cluster: no crash loop of the shard's replicas ----------------------------------------------

CLUSTER_SHARDS = 1


def test_a_corrupt_row_on_every_replica_stops_no_replica_and_they_stay_identical(tmp_path: Path) -> None:
    """The same damage on every replica (as a restore would bring it): the write that meets it
    is refused alike on all three, none of them stops, a restart of each replays its journal
    without stopping, and the shard keeps taking writes and stays identical on its replicas."""
    cluster = new_cluster(tmp_path / "cluster", shards=CLUSTER_SHARDS)
    (shard,) = cluster.config.shards
    with started_cluster(cluster):
        stub = cluster.ledger_stub()
        corrupt_account, healthy_account = (
            stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account.id
            for _ in range(2)
        )
        for account_id in (corrupt_account, healthy_account):
            deposit(stub, account_id, FIRST_DEPOSIT)
        cluster.wait_converged()
        cluster.close_channels()
    for node in cluster.nodes.values():
        set_unknown_flag(node.data_dir, shard.shard_id, corrupt_account)

    with started_cluster(cluster):
        stub = cluster.ledger_stub()
        with pytest.raises(grpc.RpcError) as refused:
            deposit(stub, corrupt_account, 5)
        expect_corrupt(refused.value)
        assert deposit(stub, healthy_account, 2).transaction.amount == 2
        before_restarts = cluster.wait_converged()[shard.shard_id]

        for node_id in cluster.nodes:
            cluster.stop_node(node_id)
            cluster.restart_node(node_id)
        cluster.wait_healthy()

        assert deposit(stub, healthy_account, 3).transaction.amount == 3
        after_restarts = cluster.wait_converged()[shard.shard_id]
        assert after_restarts.applied_index > before_restarts.applied_index
        cluster.check_processes()
        cluster.close_channels()
