"""The offline benchmark tools of issue 13 at tiny sizes: `scripts/bench-core` measures and
caches a preloaded state; `scripts/preload-state` writes a backup that `ledger-dev restore`
accepts, whose accounts `ledger-dev bench --accounts-file` then loads on a server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger_cluster import bench_state
from ledger_cluster import config as cluster_config
from ledger_cluster.gateway.service import TRANSACTION_NUMBER_RANDOM_BITS
from ledger_cluster.ids import parse_account_id
from ledger_cluster.sharding import shard_key
from tests.processes import (
    REPO_ROOT,
    StandaloneServer,
    clean_environment,
    run_dev_cli,
    standalone_server,
    write_generated_config,
)

SCRIPT_TIMEOUT_SECONDS = 60.0
DEV_CLI_TIMEOUT_SECONDS = 60.0
BENCH_CORE = REPO_ROOT / "scripts" / "bench-core"
PRELOAD_STATE = REPO_ROOT / "scripts" / "preload-state"
SHARDS = 4
ACCOUNTS_PER_SHARD = 5
TRANSACTIONS_PER_SHARD = 500
# The device's figure may be missing (a state on tmpfs has no block device).
WRITE_FIGURES = ("kib_written_per_item", "kib_write_calls_per_item")


def run_script(script: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """The script on this interpreter, importing this checkout's package."""
    environment = clean_environment()
    environment["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, str(script), *arguments],
        cwd=REPO_ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
        check=False,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def last_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, describe(result)
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


# -- scripts/bench-core -------------------------------------------------------------------------


def run_bench_core(cache: Path) -> dict[str, Any]:
    return last_json(
        run_script(
            BENCH_CORE,
            *["--transactions", "2000", "--rounds", "2", "--entries", "3", "--json"],
            "--state-cache",
            str(cache),
        )
    )


def test_bench_core_measures_rounds_and_reuses_its_cached_state(tmp_path: Path) -> None:
    first = run_bench_core(tmp_path / "cache")
    assert first["preload"]["from_cache"] is False
    assert first["preload"]["transactions"] == 2000
    assert len(first["rounds"]) == 2
    for figures in [*first["rounds"], first["median"]]:
        for name in ("items_per_s", "cpu_us_per_item", "cpu_user_us_per_item", *WRITE_FIGURES):
            assert figures[name] > 0, (name, figures)
    # Every item stored rows: the preload's and both rounds' 3 x 1000 items.
    assert sum(first["rows_after"].values()) - sum(first["rows_before"].values()) >= 6000
    assert sum(first["rows_before"].values()) >= 2000

    second = run_bench_core(tmp_path / "cache")
    assert second["preload"]["from_cache"] is True
    assert second["rows_before"] == first["rows_before"]
    assert second["median"]["items_per_s"] > 0


def test_bench_core_refuses_a_data_dir_in_use(tmp_path: Path) -> None:
    (tmp_path / "data.mdb").write_bytes(b"")
    result = run_script(BENCH_CORE, "--transactions", "100", "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert "is not empty" in result.stderr


# -- scripts/preload-state, restore, and the bench on its accounts ------------------------------


@dataclass(frozen=True)
class Restored:
    config_path: Path
    backup_dir: Path
    data_root: Path


@pytest.fixture(scope="module")
def restored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restored]:
    base = tmp_path_factory.mktemp("preloaded")
    config_path = write_generated_config(base / "cluster_config.json", nodes=3, shards=SHARDS, replicas=3)
    backup_dir = base / "backup"
    sizes = f"--transactions-per-shard {TRANSACTIONS_PER_SHARD} --accounts-per-shard {ACCOUNTS_PER_SHARD}"
    built = run_script(
        PRELOAD_STATE, "--config", str(config_path), "--out", str(backup_dir), *sizes.split(), "--jobs", "2"
    )
    assert built.returncode == 0, describe(built)
    data_root = base / "data"
    restore = run_dev_cli(
        ["restore", "--backup", str(backup_dir), "--config", str(config_path), "--data-root", str(data_root)],
        DEV_CLI_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
    )
    assert restore.returncode == 0, describe(restore)
    assert f"restored {SHARDS} shards" in restore.stdout
    yield Restored(config_path, backup_dir, data_root)


def test_preload_state_writes_a_backup_of_every_shard(restored: Restored) -> None:
    manifest = json.loads((restored.backup_dir / "manifest.json").read_text())
    config = cluster_config.load(restored.config_path)
    assert [shard["shard_id"] for shard in manifest["shards"]] == [shard.shard_id for shard in config.shards]
    assert not (restored.backup_dir / bench_state.WORK_DIRECTORY_NAME).exists()
    account_ids = [
        parse_account_id(line) for line in (restored.backup_dir / "accounts.txt").read_text().split()
    ]
    assert len(set(account_ids)) == SHARDS * ACCOUNTS_PER_SHARD
    # Shard by shard in turn, so the first SHARDS accounts are one per shard.
    first_shards = [
        config.shard_for_key(shard_key(account_id)).shard_id for account_id in account_ids[:SHARDS]
    ]
    assert first_shards == [shard.shard_id for shard in config.shards]


def bench_target(server: StandaloneServer) -> list[str]:
    """`bench` against this server, its CPU read from its own metrics (not the dev ports')."""
    return [
        "bench",
        "--gateway",
        server.address,
        "--metrics",
        f"http://127.0.0.1:{server.metrics_port}/metrics",
    ]


def test_the_bench_loads_the_preloaded_accounts(restored: Restored, tmp_path: Path) -> None:
    # Every node of the config holds every shard, so one node's data serves as a standalone's.
    with standalone_server(
        restored.data_root / "node01", restored.config_path, tmp_path / "server.log"
    ) as server:
        result = run_dev_cli(
            [
                *bench_target(server),
                "--accounts-file",
                str(restored.backup_dir / "accounts.txt"),
                *["--accounts", "8", "--mix", "create", "--batch", "10", "--concurrency", "2"],
                *["--warmup", "0", "--duration", "1", "--window-seconds", "0.5", "--json"],
            ],
            DEV_CLI_TIMEOUT_SECONDS,
            cwd=REPO_ROOT,
        )
    summary = last_json(result)
    assert "using 8 existing accounts" in result.stderr
    assert summary["balances_checked"] == 8
    assert summary["balance_mismatches"] == []
    assert summary["errors_by_code"] == {}
    assert summary["transactions"] > 0
    assert len(summary["throughput_tx_per_s_by_window"]) == 2
    assert summary["window_ratio_last_to_first"] is not None


def test_the_bench_refuses_accounts_that_do_not_exist(restored: Restored, tmp_path: Path) -> None:
    accounts_file = tmp_path / "accounts.txt"
    accounts_file.write_text("0123456789abcdef\n")
    with standalone_server(
        restored.data_root / "node02", restored.config_path, tmp_path / "server.log"
    ) as server:
        result = run_dev_cli(
            [*bench_target(server), "--accounts-file", str(accounts_file), "--duration", "1"],
            DEV_CLI_TIMEOUT_SECONDS,
            cwd=REPO_ROOT,
        )
    assert result.returncode == 1, describe(result)
    assert "0123456789abcdef does not exist" in result.stderr


# -- pieces ---------------------------------------------------------------------------------------


def test_transaction_numbers_never_repeat_for_an_account_within_a_window() -> None:
    numbers = bench_state.TransactionNumbers()
    now = 1_700_000_000_000_000_000
    drawn = [numbers.draw(7, now) for _ in range(5000)]
    assert len(set(drawn)) == len(drawn)
    # Time-ordered: the random low bits never reach the next window.
    bits = TRANSACTION_NUMBER_RANDOM_BITS
    assert all(now >> bits == number >> bits for number in drawn)


def test_accounts_are_interleaved_shard_by_shard() -> None:
    assert bench_state.interleaved([[1, 2, 3], [4], [5, 6]]) == [1, 4, 5, 2, 6, 3]
