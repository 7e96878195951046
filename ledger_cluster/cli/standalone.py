"""ledger-standalone: the whole ledger in one process, no Raft (development, small installs)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from ledger_cluster.cli.common import (
    CONTEXT_SETTINGS,
    PublicSecurity,
    config_option,
    listen_options,
    load_config,
    log_level_option,
    setup_logging,
    version_option,
)
from ledger_cluster.errors import StorageError
from ledger_cluster.gateway import StandaloneBackend
from ledger_cluster.server import install_stop_signals, serve_ledger

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
def main(
    *,
    host: str,
    port: int,
    http_port: int | None,
    metrics_port: int,
    calls_in_flight_max: int,
    public_security: PublicSecurity,
    data_dir: str,
    config_path: str,
    log_level: str,
) -> None:
    """Serve ledger_cluster.api.v1.LedgerService from one process: every shard of the config,
    one LMDB environment each; concurrent writes to a shard share one LMDB write transaction,
    synced before any of them is acknowledged."""
    credentials = public_security.server_credentials()
    stop_requested = install_stop_signals()
    setup_logging(log_level)
    config = load_config(config_path)

    def describe(bound_port: int, bound_metrics_port: int) -> str:
        return (
            f"serving LedgerService on {host}:{bound_port} (standalone, {len(config.shards)} shards,"
            f" data in {Path(data_dir).resolve()}); metrics on {host}:{bound_metrics_port}"
        )

    try:
        asyncio.run(
            serve_ledger(
                lambda: StandaloneBackend(config, data_dir),
                host=host,
                port=port,
                metrics_port=metrics_port,
                role="standalone",
                calls_in_flight_max=calls_in_flight_max,
                credentials=credentials,
                stop_requested=stop_requested,
                describe=describe,
                http_port=http_port,
                http_tls=public_security.http_tls(),
            )
        )
    except (OSError, StorageError) as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":
    main()
