"""ledger-node: one node process of the replicated cluster."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import click

from ledger_cluster.cli.common import (
    CONTEXT_SETTINGS,
    config_option,
    load_config,
    log_level_option,
    setup_logging,
    version_option,
)
from ledger_cluster.config import ClusterConfig
from ledger_cluster.errors import ConfigError, ReplicaBrokenError, StorageError
from ledger_cluster.node import NodeServer
from ledger_cluster.replica import (
    LOG_COMPACTION_MIN_ENTRIES_DEFAULT,
    LOG_COMPACTION_MIN_SECONDS_DEFAULT,
    RAFT_PASSWORD_ENVIRONMENT_VARIABLE,
    ReplicaOptions,
)
from ledger_cluster.replica_journal import Durability
from ledger_cluster.server import install_stop_signals, wait_for_stop

logger = logging.getLogger("ledger_cluster.node")

# A shared secret shorter than this is refused (a guessable one would let anybody who can reach
# a Raft port speak as a node).
RAFT_SECRET_BYTES_MIN = 32


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--node-id",
    required=True,
    envvar="LEDGER_NODE_ID",
    help="This node's id in the config (env LEDGER_NODE_ID).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    required=True,
    envvar="LEDGER_DATA_DIR",
    help="Where this node keeps its replicas' LMDB files and Raft journals (env LEDGER_DATA_DIR).",
)
@click.option(
    "--raft-password-file",
    type=click.Path(dir_okay=False, exists=True),
    envvar="LEDGER_RAFT_PASSWORD_FILE",
    help=(
        "File holding the shared secret that encrypts and authenticates Raft traffic between"
        f" nodes (env LEDGER_RAFT_PASSWORD_FILE); without it the secret is read from"
        f" {RAFT_PASSWORD_ENVIRONMENT_VARIABLE}. At least {RAFT_SECRET_BYTES_MIN} bytes."
    ),
)
@click.option(
    "--allow-weak-raft-password",
    is_flag=True,
    help=f"Development only: accept a Raft secret shorter than {RAFT_SECRET_BYTES_MIN} bytes.",
)
@click.option("--raft-password", hidden=True, help="Refused: a secret on the command line shows in ps.")
@click.option(
    "--log-compaction-min-entries",
    type=click.IntRange(min=2),
    default=LOG_COMPACTION_MIN_ENTRIES_DEFAULT,
    show_default=True,
    envvar="LEDGER_LOG_COMPACTION_MIN_ENTRIES",
    help="Snapshot and truncate a shard's Raft journal once it holds this many entries.",
)
@click.option(
    "--log-compaction-min-seconds",
    type=click.FloatRange(min=1.0),
    default=LOG_COMPACTION_MIN_SECONDS_DEFAULT,
    show_default=True,
    envvar="LEDGER_LOG_COMPACTION_MIN_SECONDS",
    help="... or once this long has passed since the last snapshot.",
)
@click.option(
    "--durability",
    type=click.Choice([mode.value for mode in Durability]),
    default=Durability.POWER_LOSS.value,
    show_default=True,
    envvar="LEDGER_DURABILITY",
    help="What an acknowledged write survives: power-loss fsyncs the Raft journal and its meta"
    " before anything relies on them; process-crash does not (faster; survives kill -9 of any or"
    " all processes, not a power loss or kernel crash). See docs/performance.md, round 6.",
)
@config_option
@log_level_option
@version_option("ledger-node")
def main(
    *,
    node_id: str,
    data_dir: str,
    raft_password_file: str | None,
    allow_weak_raft_password: bool,
    raft_password: str | None,
    log_compaction_min_entries: int,
    log_compaction_min_seconds: float,
    durability: str,
    config_path: str,
    log_level: str,
) -> None:
    """Host this node's shard replicas (one PySyncObj Raft group member per shard) and serve
    the internal NodeService on the node's configured address."""
    if raft_password is not None:
        raise click.UsageError(
            f"--raft-password is refused: a secret on the command line shows in /proc/*/cmdline."
            f" Set {RAFT_PASSWORD_ENVIRONMENT_VARIABLE} or pass --raft-password-file"
        )
    secret = raft_secret(
        os.environ.get(RAFT_PASSWORD_ENVIRONMENT_VARIABLE), raft_password_file, allow_weak_raft_password
    )
    stop_requested = install_stop_signals()
    setup_logging(log_level)
    config = load_config(config_path)
    options = ReplicaOptions(
        raft_password=secret,
        log_compaction_min_entries=log_compaction_min_entries,
        log_compaction_min_seconds=log_compaction_min_seconds,
        durability=Durability(durability),
    )
    try:
        asyncio.run(_serve(config, node_id, Path(data_dir), options, stop_requested))
    except (ConfigError, StorageError, ReplicaBrokenError, OSError) as error:
        raise click.ClickException(str(error)) from error
    logger.info("node %s stopped", node_id)


def raft_secret(from_environment: str | None, path: str | None, allow_weak: bool) -> str:
    """The Raft secret from its file (one trailing newline dropped) or the environment; refused
    when missing, blank, or shorter than RAFT_SECRET_BYTES_MIN bytes without `allow_weak`."""
    if path is not None:
        try:
            secret = Path(path).read_bytes().decode().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as error:
            raise click.UsageError(f"cannot read the Raft secret from {path}: {error}") from error
        where = path
    elif from_environment is not None:
        secret, where = from_environment, RAFT_PASSWORD_ENVIRONMENT_VARIABLE
    else:
        raise click.UsageError(
            f"no Raft secret: set {RAFT_PASSWORD_ENVIRONMENT_VARIABLE} or pass --raft-password-file"
        )
    if not secret.strip():
        raise click.UsageError(f"the Raft secret in {where} is empty")
    size = len(secret.encode())
    if size < RAFT_SECRET_BYTES_MIN and not allow_weak:
        raise click.UsageError(
            f"the Raft secret in {where} is {size} bytes; at least {RAFT_SECRET_BYTES_MIN} are needed"
            " (--allow-weak-raft-password accepts it, for development only)"
        )
    return secret


async def _serve(
    config: ClusterConfig,
    node_id: str,
    data_dir: Path,
    options: ReplicaOptions,
    stop_requested: threading.Event,
) -> None:
    # The replicas start (journal replay included) before the loop serves anything.
    server = NodeServer(config, node_id, data_dir, options)
    try:
        await server.start()
        await wait_for_stop(stop_requested)
    finally:
        await server.stop()


if __name__ == "__main__":
    main()
