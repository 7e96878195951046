"""The secrets of `ledger-node` (the Raft secret and the cluster token): from the environment or a
file, never the command line, and never short or blank unless development asks for it
explicitly. A refused secret stops the process before it opens anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger_cluster.errors import ConfigError
from ledger_cluster.security import SECRET_BYTES_MIN, read_secret

RAFT_SECRET_BYTES_MIN = SECRET_BYTES_MIN
STRONG = "s" * SECRET_BYTES_MIN
NODE_TIMEOUT_SECONDS = 30.0
VARIABLE = "LEDGER_RAFT_PASSWORD"


def raft_secret(from_environment: str | None, path: str | None, allow_weak: bool) -> str:
    environment = {} if from_environment is None else {VARIABLE: from_environment}
    return read_secret(
        "Raft secret",
        environment_variable=VARIABLE,
        path=path,
        allow_weak=allow_weak,
        environment=environment,
    )


def test_a_strong_secret_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert raft_secret(STRONG, None, allow_weak=False) == STRONG
    path = tmp_path / "secret"
    path.write_text(STRONG + "\n")
    assert raft_secret("ignored-when-a-file-is-given", str(path), allow_weak=False) == STRONG


@pytest.mark.parametrize(
    ("from_environment", "why"),
    [
        (None, "no Raft secret"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("s" * (RAFT_SECRET_BYTES_MIN - 1), "at least"),
    ],
)
def test_a_missing_blank_or_short_secret_is_refused(from_environment: str | None, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        raft_secret(from_environment, None, allow_weak=False)


def test_the_published_development_secret_needs_the_development_flag() -> None:
    development = "local-development-only-not-a-secret-0000"
    with pytest.raises(ConfigError, match="published development secret"):
        raft_secret(development, None, allow_weak=False)
    assert raft_secret(development, None, allow_weak=True) == development


def test_development_may_use_a_short_secret_but_never_a_blank_one() -> None:
    assert raft_secret("short", None, allow_weak=True) == "short"
    with pytest.raises(ConfigError, match="is empty"):
        raft_secret("", None, allow_weak=True)


def run_node(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ledger_cluster.cli.node",
            "--node-id",
            "node01",
            "--data-dir",
            "/nonexistent",
            *arguments,
        ],
        env={**base, **environment},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_SECONDS,
        check=False,
    )


def test_the_node_refuses_a_secret_on_its_command_line() -> None:
    result = run_node(["--raft-password", STRONG], {})
    assert result.returncode == 2
    assert "shows in /proc/*/cmdline" in result.stderr


def test_the_node_refuses_a_short_secret_before_it_starts() -> None:
    result = run_node([], {"LEDGER_RAFT_PASSWORD": "local-development-only", "LEDGER_CLUSTER_TOKEN": STRONG})
    assert result.returncode == 2
    assert f"at least {RAFT_SECRET_BYTES_MIN}" in result.stderr
    assert not Path("/nonexistent").exists()


def test_the_node_refuses_a_cluster_token_on_its_command_line() -> None:
    result = run_node(["--cluster-token", STRONG], {"LEDGER_RAFT_PASSWORD": STRONG})
    assert result.returncode == 2
    assert "--cluster-token is refused" in result.stderr


@pytest.mark.parametrize(
    ("token", "why"),
    [(None, "no cluster token"), ("", "is empty"), ("t" * (SECRET_BYTES_MIN - 1), "at least")],
)
def test_the_node_refuses_a_missing_blank_or_short_cluster_token(token: str | None, why: str) -> None:
    environment = {"LEDGER_RAFT_PASSWORD": STRONG}
    if token is not None:
        environment["LEDGER_CLUSTER_TOKEN"] = token
    result = run_node([], environment)
    assert result.returncode == 2
    assert why in result.stderr
    assert not Path("/nonexistent").exists()
