"""`ledger-dev bench --mix transfer` and `transfer-same` against a real `ledger-standalone` on
127.0.0.1: batches of CreateTransfers and the sequential unary mode, with the balance check that
accounts for transfers passing. And `bench --sdk`: every client call goes through the SDK's
AsyncLedgerClient, single creates and transfers reach the server as batch RPCs (counted by the
server's own metrics), and the balance checks still pass."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import (
    REPO_ROOT,
    StandaloneServer,
    rpc_count,
    run_dev_cli,
    standalone_server,
    write_generated_config,
)

CLI_TIMEOUT_SECONDS = 120.0
SHARDS = 4
# Two per shard at least, so same-shard pairs exist on every shard.
ACCOUNTS = 2 * SHARDS
# Enough concurrent single SDK callers that calls arrive while a batch is in flight.
SDK_CONCURRENCY = 16


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generated_config(tmp_path_factory.mktemp("config") / "cluster_config.json", 3, SHARDS, 3)


@pytest.fixture(scope="module")
def server(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    base = tmp_path_factory.mktemp("standalone")
    with standalone_server(base / "data", config_path, base / "server.log") as running:
        yield running


def bench(server: StandaloneServer, config_path: Path, *arguments: str) -> dict[str, Any]:
    completed = run_dev_cli(
        [
            "bench",
            "--gateway",
            server.address,
            "--config",
            str(config_path),
            "--accounts",
            str(ACCOUNTS),
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--json",
            *arguments,
        ],
        CLI_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    summary: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    per_second = "transfers/s" if summary["unit"] == "transfers" else "tx/s"
    assert per_second in completed.stdout.splitlines()[-2]
    return summary


def bench_sdk(server: StandaloneServer, config_path: Path, mix: str) -> dict[str, Any]:
    summary = bench(server, config_path, "--sdk", "--concurrency", str(SDK_CONCURRENCY), "--mix", mix)
    assert summary["client"] == "sdk"
    assert summary["transactions"] > 0
    assert summary["errors_by_code"] == {}
    assert summary["balances_checked"] == ACCOUNTS
    assert summary["balance_mismatches"] == []
    return summary


@pytest.mark.parametrize(
    ("mix", "concurrency", "batch"),
    [("transfer", 4, 10), ("transfer-same", 4, 10), ("transfer", 1, 1)],
    ids=["cross-shard-batches", "same-shard-batches", "cross-shard-sequential"],
)
def test_bench_transfers_count_transfers_and_keep_balances(
    server: StandaloneServer, config_path: Path, mix: str, concurrency: int, batch: int
) -> None:
    summary = bench(
        server, config_path, "--mix", mix, "--concurrency", str(concurrency), "--batch", str(batch)
    )
    assert summary["unit"] == "transfers"
    assert summary["transactions"] > 0
    assert summary["throughput_tx_per_s"] > 0
    assert 0 < summary["latency_ms_p50"] <= summary["latency_ms_max"]
    assert summary["errors_by_code"] == {}
    assert summary["balances_checked"] == ACCOUNTS
    assert summary["balance_mismatches"] == []


def test_bench_transfer_needs_pairs_it_can_make(server: StandaloneServer, config_path: Path) -> None:
    # One account per shard: no two share a shard.
    completed = run_dev_cli(
        [
            "bench",
            "--gateway",
            server.address,
            "--config",
            str(config_path),
            "--accounts",
            str(SHARDS),
            "--duration",
            "0.5",
            "--mix",
            "transfer-same",
        ],
        CLI_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 1
    assert f"no two of the {SHARDS} accounts are on one shard" in completed.stderr


def test_single_creates_through_the_sdk_reach_the_server_in_batches(
    server: StandaloneServer, config_path: Path
) -> None:
    unary_before = rpc_count(server, "CreateTransaction")
    batches_before = rpc_count(server, "CreateTransactions")
    summary = bench_sdk(server, config_path, "create")
    batches = rpc_count(server, "CreateTransactions") - batches_before
    # Setup tops up each new account with one unary call; the clients' creates never go unary.
    assert rpc_count(server, "CreateTransaction") - unary_before == ACCOUNTS
    # The warm-up's creates travel in batches too, so the measured ones bound them from below.
    assert 0 < batches < summary["operations"]


def test_transfers_through_the_sdk_travel_in_batches_and_conserve_money(
    server: StandaloneServer, config_path: Path
) -> None:
    unary_before = rpc_count(server, "CreateTransfer")
    batches_before = rpc_count(server, "CreateTransfers")
    # A mix without settles and cancels: each account's balance is also checked against the
    # transfers the SDK acknowledged, and the sum of all balances against conservation.
    summary = bench_sdk(server, config_path, "transfer,transfer-same,read")
    assert rpc_count(server, "CreateTransfer") == unary_before
    assert 0 < rpc_count(server, "CreateTransfers") - batches_before < summary["operations"]


def test_settles_and_cancels_through_the_sdk_keep_balances(
    server: StandaloneServer, config_path: Path
) -> None:
    settles_before = rpc_count(server, "SettleTransaction")
    cancels_before = rpc_count(server, "CancelTransaction")
    bench_sdk(server, config_path, "create,settle,cancel")
    assert rpc_count(server, "SettleTransaction") > settles_before
    assert rpc_count(server, "CancelTransaction") > cancels_before


def test_the_sdk_bench_refuses_batch_calls(server: StandaloneServer) -> None:
    completed = run_dev_cli(
        ["bench", "--sdk", "--batch", "10", "--gateway", server.address], CLI_TIMEOUT_SECONDS, cwd=REPO_ROOT
    )
    assert completed.returncode == 2
    assert "the SDK batches concurrent single calls itself" in completed.stderr
