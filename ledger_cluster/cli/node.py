"""ledger-node: one node process of the replicated cluster."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import click

from ledger_cluster.cli.common import (
    CONTEXT_SETTINGS,
    cluster_token_options,
    config_option,
    load_config,
    log_level_option,
    refuse_secret_arguments,
    setup_logging,
    version_option,
)
from ledger_cluster.errors import ConfigError, ReplicaBrokenError, StorageError
from ledger_cluster.node import NodeServer
from ledger_cluster.replica import (
    LOG_COMPACTION_MIN_ENTRIES_DEFAULT,
    LOG_COMPACTION_MIN_SECONDS_DEFAULT,
    RAFT_PASSWORD_ENVIRONMENT_VARIABLE,
    ReplicaOptions,
)
from ledger_cluster.replica_journal import Durability
from ledger_cluster.security import (
    SECRET_BYTES_MIN,
    InternalCredentials,
    read_secret,
)
from ledger_cluster.server import install_stop_signals, wait_for_stop

logger = logging.getLogger("ledger_cluster.node")


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
        f" {RAFT_PASSWORD_ENVIRONMENT_VARIABLE}. At least {SECRET_BYTES_MIN} bytes."
    ),
)
@cluster_token_options
@click.option(
    "--allow-weak-secrets",
    is_flag=True,
    help=f"Development only: accept a Raft secret or cluster token shorter than {SECRET_BYTES_MIN} bytes.",
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
    cluster_token_file: str | None,
    allow_weak_secrets: bool,
    raft_password: str | None,
    cluster_token: str | None,
    log_compaction_min_entries: int,
    log_compaction_min_seconds: float,
    durability: str,
    config_path: str,
    log_level: str,
) -> None:
    """Host this node's shard replicas (one PySyncObj Raft group member per shard) and serve
    the internal NodeService on the node's configured address."""
    refuse_secret_arguments({"--raft-password": raft_password, "--cluster-token": cluster_token})
    try:
        secret = read_secret(
            "Raft secret",
            environment_variable=RAFT_PASSWORD_ENVIRONMENT_VARIABLE,
            path=raft_password_file,
            allow_weak=allow_weak_secrets,
        )
        credentials = InternalCredentials.from_environment(cluster_token_file, allow_weak_secrets)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
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
        asyncio.run(
            _serve(lambda: NodeServer(config, node_id, Path(data_dir), options, credentials), stop_requested)
        )
    except (ConfigError, StorageError, ReplicaBrokenError, OSError) as error:
        raise click.ClickException(str(error)) from error
    logger.info("node %s stopped", node_id)


async def _serve(make_server: Callable[[], NodeServer], stop_requested: threading.Event) -> None:
    # The replicas start (journal replay included) before the loop serves anything.
    server = make_server()
    try:
        await server.start()
        await wait_for_stop(stop_requested)
    finally:
        await server.stop()


if __name__ == "__main__":
    main()
