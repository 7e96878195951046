"""ledger-node: part of the replicated cluster (one Raft group per shard)."""

from __future__ import annotations

import click

from ledger_cluster.cli.common import CONTEXT_SETTINGS, config_option, log_level_option, version_option

CLUSTER_NOT_BUILT = (
    "clustered mode is not built yet (issue 3, 'Replicated cluster'); "
    "run the same API in one process with: ledger-standalone --port 8000 --data-dir ./data/standalone"
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--node-id", required=True, envvar="LEDGER_NODE_ID", help="This node's id in the config.")
@click.option("--data-dir", type=click.Path(file_okay=False), required=True, envvar="LEDGER_DATA_DIR")
@config_option
@log_level_option
@version_option("ledger-node")
def main(node_id: str, data_dir: str, config_path: str, log_level: str) -> None:
    """Host this node's shard replicas and serve the internal NodeService."""
    raise click.UsageError(CLUSTER_NOT_BUILT)


if __name__ == "__main__":
    main()
