"""The offline benchmark tools of issue 13 at tiny sizes: `scripts/bench-core` measures and
caches a preloaded state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ledger_cluster import bench_state
from ledger_cluster.gateway.service import TRANSACTION_NUMBER_RANDOM_BITS
from tests.processes import REPO_ROOT, clean_environment

SCRIPT_TIMEOUT_SECONDS = 60.0
BENCH_CORE = REPO_ROOT / "scripts" / "bench-core"
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


# -- pieces ---------------------------------------------------------------------------------------


def test_transaction_numbers_never_repeat_for_an_account_within_a_window() -> None:
    numbers = bench_state.TransactionNumbers()
    now = 1_700_000_000_000_000_000
    drawn = [numbers.draw(7, now) for _ in range(5000)]
    assert len(set(drawn)) == len(drawn)
    # Time-ordered: the random low bits never reach the next window.
    bits = TRANSACTION_NUMBER_RANDOM_BITS
    assert all(now >> bits == number >> bits for number in drawn)
