"""`ledger-dev bench --mix transfer` and `transfer-same` against a real `ledger-standalone` on
127.0.0.1: batches of CreateTransfers and the sequential unary mode, with the balance check that
accounts for transfers passing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import (
    REPO_ROOT,
    StandaloneServer,
    run_dev_cli,
    standalone_server,
    write_generated_config,
)

CLI_TIMEOUT_SECONDS = 120.0
SHARDS = 4
# Two per shard at least, so same-shard pairs exist on every shard.
ACCOUNTS = 2 * SHARDS


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
    assert "transfers/s" in completed.stdout.splitlines()[-2]
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
