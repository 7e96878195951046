"""ledger-gateway: part of the replicated cluster (one Raft group per shard)."""

from __future__ import annotations

import click

from ledger_cluster.cli.common import CONTEXT_SETTINGS, config_option, log_level_option, version_option

CLUSTER_NOT_BUILT = (
    "clustered mode is not built yet (issue 3, 'Replicated cluster'); "
    "run the same API in one process with: ledger-standalone --port 8000 --data-dir ./data/standalone"
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--host", default="127.0.0.1", show_default=True, envvar="LEDGER_HOST")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, envvar="LEDGER_PORT")
@config_option
@log_level_option
@version_option("ledger-gateway")
def main(host: str, port: int, config_path: str, log_level: str) -> None:
    """Serve the public LedgerService, routing each request to its shard's leader."""
    raise click.UsageError(CLUSTER_NOT_BUILT)


if __name__ == "__main__":
    main()
