"""ledger-gateway: the public LedgerService in front of a replicated cluster."""

from __future__ import annotations

import logging

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
from ledger_cluster.gateway import ClusterBackend
from ledger_cluster.server import LedgerServer, install_stop_signals, run_until

logger = logging.getLogger("ledger_cluster.gateway")


@click.command(context_settings=CONTEXT_SETTINGS)
@listen_options
@config_option
@log_level_option
@version_option("ledger-gateway")
def main(host: str, port: int, config_path: str, log_level: str) -> None:
    """Serve ledger_cluster.api.v1.LedgerService, routing each request by shard key to the
    shard's leader. Health says SERVING only while every shard has a reachable leader."""
    stop_requested = install_stop_signals()
    setup_logging(log_level)
    config = load_config(config_path)
    backend = ClusterBackend(config)
    try:
        server = LedgerServer(backend, f"{host}:{port}")
    except (OSError, RuntimeError) as error:
        backend.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {error}") from error
    logger.info(
        "gateway serving LedgerService on %s:%d for %d shards on %d nodes",
        host,
        server.port,
        len(config.shards),
        len(config.nodes),
    )
    run_until(server, stop_requested)


if __name__ == "__main__":
    main()
