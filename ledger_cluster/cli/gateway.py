"""ledger-gateway: the public LedgerService in front of a replicated cluster."""

from __future__ import annotations

import asyncio
import logging

import click

from ledger_cluster.cli.common import (
    CONTEXT_SETTINGS,
    PublicSecurity,
    cluster_token_options,
    config_option,
    listen_options,
    load_config,
    log_level_option,
    refuse_secret_arguments,
    setup_logging,
    version_option,
)
from ledger_cluster.errors import ConfigError
from ledger_cluster.gateway import ClusterBackend
from ledger_cluster.security import (
    InternalCredentials,
)
from ledger_cluster.server import install_stop_signals, serve_ledger

logger = logging.getLogger("ledger_cluster.gateway")


@click.command(context_settings=CONTEXT_SETTINGS)
@listen_options
@cluster_token_options
@config_option
@log_level_option
@version_option("ledger-gateway")
def main(
    *,
    host: str,
    port: int,
    http_port: int | None,
    metrics_port: int,
    calls_in_flight_max: int,
    public_security: PublicSecurity,
    cluster_token_file: str | None,
    cluster_token: str | None,
    config_path: str,
    log_level: str,
) -> None:
    """Serve ledger_cluster.api.v1.LedgerService, routing each request by shard key to the
    shard's leader. Health says SERVING only while every shard has a reachable leader."""
    refuse_secret_arguments({"--cluster-token": cluster_token})
    credentials = public_security.server_credentials()
    try:
        internal = InternalCredentials.from_environment(
            cluster_token_file, public_security.allow_weak_secrets
        )
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    stop_requested = install_stop_signals()
    setup_logging(log_level)
    config = load_config(config_path)

    def describe(bound_port: int, bound_metrics_port: int) -> str:
        return (
            f"gateway serving LedgerService on {host}:{bound_port} for {len(config.shards)} shards on"
            f" {len(config.nodes)} nodes; metrics on {host}:{bound_metrics_port}"
        )

    try:
        asyncio.run(
            serve_ledger(
                lambda: ClusterBackend(config, internal.client()),
                host=host,
                port=port,
                metrics_port=metrics_port,
                role="gateway",
                calls_in_flight_max=calls_in_flight_max,
                credentials=credentials,
                stop_requested=stop_requested,
                describe=describe,
                http_port=http_port,
                http_tls=public_security.http_tls(),
            )
        )
    except (OSError, ConfigError) as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":
    main()
