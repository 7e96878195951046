"""ledger-standalone: the whole ledger in one process, no Raft (development, small installs)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ledger_cluster.cli.common import (
    CONTEXT_SETTINGS,
    config_option,
    listen_options,
    load_config,
    log_level_option,
    setup_logging,
    version_option,
)
from ledger_cluster.errors import StorageError
from ledger_cluster.gateway import StandaloneBackend
from ledger_cluster.server import LedgerServer, install_stop_signals, run_until

logger = logging.getLogger("ledger_cluster.standalone")


@click.command(context_settings=CONTEXT_SETTINGS)
@listen_options
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default="./data/standalone",
    show_default=True,
    envvar="LEDGER_DATA_DIR",
    help="Where the shards' LMDB files live (env LEDGER_DATA_DIR).",
)
@config_option
@log_level_option
@version_option("ledger-standalone")
def main(host: str, port: int, data_dir: str, config_path: str, log_level: str) -> None:
    """Serve ledger_cluster.api.v1.LedgerService from one process: every shard of the config,
    one LMDB environment each, every write synced before it is acknowledged."""
    stop_requested = install_stop_signals()
    setup_logging(log_level)
    config = load_config(config_path)
    try:
        backend = StandaloneBackend(config, data_dir)
    except StorageError as error:
        raise click.ClickException(str(error)) from error
    try:
        server = LedgerServer(backend, f"{host}:{port}")
    except (OSError, RuntimeError) as error:
        backend.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {error}") from error
    logger.info(
        "serving LedgerService on %s:%d (standalone, %d shards, data in %s)",
        host,
        server.port,
        len(config.shards),
        Path(data_dir).resolve(),
    )
    run_until(server, stop_requested)


if __name__ == "__main__":
    main()
