"""ledger-dev: developer commands against a running gateway or standalone server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
import grpc

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc, node_pb2
from ledger_cluster.cli.common import (
    CONTEXT_SETTINGS,
    config_option,
    describe_rpc_error,
    load_config,
    version_option,
)
from ledger_cluster.client import ClusterClient
from ledger_cluster.errors import ConfigError

DEFAULT_GATEWAY = "localhost:8000"
DEFAULT_TIMEOUT_SECONDS = 5.0
SEED_ACCOUNTS_MAX = 1_000_000


def gateway_option(function: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--gateway",
        default=DEFAULT_GATEWAY,
        show_default=True,
        envvar="LEDGER_GATEWAY",
        help="Gateway or standalone server address (env LEDGER_GATEWAY).",
    )(function)


def timeout_option(function: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--timeout-seconds",
        type=click.FloatRange(min=0.1),
        default=DEFAULT_TIMEOUT_SECONDS,
        show_default=True,
        envvar="LEDGER_TIMEOUT_SECONDS",
        help="Deadline of each call (env LEDGER_TIMEOUT_SECONDS).",
    )(function)


@contextmanager
def ledger_stub(address: str) -> Iterator[ledger_pb2_grpc.LedgerServiceStub]:
    """A stub whose failed calls end the command with the status and its ErrorInfo reason."""
    with grpc.insecure_channel(address) as channel:
        try:
            yield ledger_pb2_grpc.LedgerServiceStub(channel)
        except grpc.RpcError as error:
            raise click.ClickException(f"{address}: {describe_rpc_error(error)}") from None


@click.group(context_settings=CONTEXT_SETTINGS)
@version_option("ledger-dev")
def main() -> None:
    """Developer tools for ledger-cluster: configs, seeding, scenarios."""


@main.command("seed-cluster-config")
@click.option("--nodes", type=click.IntRange(1, cluster_config.NODES_MAX), default=3, show_default=True)
@click.option("--shards", type=click.IntRange(1, cluster_config.SHARDS_MAX), default=16, show_default=True)
@click.option("--replicas", type=click.IntRange(1, cluster_config.REPLICAS_MAX), default=3, show_default=True)
@click.option("--host", default=cluster_config.DEFAULT_HOST, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=cluster_config.DEFAULT_CONFIG_PATH,
    show_default=True,
    envvar="LEDGER_CONFIG",
)
def seed_cluster_config(nodes: int, shards: int, replicas: int, host: str, out: str) -> None:
    """Write a validated cluster config: equal key ranges, replicas spread evenly over nodes."""
    try:
        config = cluster_config.generate(nodes, shards, replicas, host=host)
        cluster_config.write_atomic(config, out)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {out}: {nodes} nodes, {shards} shards, {replicas} replicas per shard")


@main.command("seed-accounts")
@click.option("--count", type=click.IntRange(1, SEED_ACCOUNTS_MAX), default=100, show_default=True)
@gateway_option
@timeout_option
def seed_accounts(count: int, gateway: str, timeout_seconds: float) -> None:
    """Create COUNT accounts and print their ids, one per line (progress goes to stderr)."""
    with (
        ledger_stub(gateway) as stub,
        click.progressbar(length=count, label="creating accounts", file=sys.stderr) as progress,
    ):
        for _ in range(count):
            response = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=timeout_seconds)
            click.echo(response.account.id)
            progress.update(1)


def _status_name(transaction: ledger_pb2.Transaction) -> str:
    return ledger_pb2.TransactionStatus.Name(transaction.status).removeprefix("TRANSACTION_STATUS_")


class _ScenarioPrinter:
    def __init__(self, stub: ledger_pb2_grpc.LedgerServiceStub, account_id: str, timeout: float):
        self._stub = stub
        self._account_id = account_id
        self._timeout = timeout
        self._step = 0

    def balances(self) -> str:
        account = self._stub.GetAccount(
            ledger_pb2.GetAccountRequest(account_id=self._account_id, consistent=True),
            timeout=self._timeout,
        ).account
        return f"available/settled {account.available_balance}/{account.settled_balance}"

    def line(self, action: str, transaction: ledger_pb2.Transaction | None) -> ledger_pb2.Transaction | None:
        self._step += 1
        if transaction is None:
            detail = f"{'-':32}  {'-':>7}  {'-':18}"
        else:
            detail = f"{transaction.id:32}  {transaction.amount:>7}  {_status_name(transaction):18}"
        click.echo(f"{self._step}  {action:22}  {detail}  {self.balances()}")
        return transaction

    def create(self, action: str, amount: int, settled: bool, description: str) -> ledger_pb2.Transaction:
        request = ledger_pb2.CreateTransactionRequest(
            account_id=self._account_id, amount=amount, settled=settled, description=description
        )
        transaction = self._stub.CreateTransaction(request, timeout=self._timeout).transaction
        self.line(action, transaction)
        return transaction


@main.command("scenario-1")
@click.option("--account-id", required=True, help="Account to run the scenario on (16 hex chars).")
@gateway_option
@timeout_option
def scenario_1(account_id: str, gateway: str, timeout_seconds: float) -> None:
    """Run the monstera-example scenario on one account: read, instant top-up +100, pending
    purchase -10, settle it, purchase -1000 (INSUFFICIENT_FUNDS), printing the transaction id,
    amount, status and the balances after every step."""
    with ledger_stub(gateway) as stub:
        printer = _ScenarioPrinter(stub, account_id, timeout_seconds)
        click.echo(f"scenario-1 on account {account_id} via {gateway}")
        click.echo(f"#  {'step':22}  {'transaction':32}  {'amount':>7}  {'status':18}  balances")
        printer.line("read balance", None)
        printer.create("top-up +100 (instant)", 100, settled=True, description="scenario-1 top-up")
        purchase = printer.create(
            "purchase -10 (pending)", -10, settled=False, description="scenario-1 purchase"
        )
        settled = stub.SettleTransaction(
            ledger_pb2.SettleTransactionRequest(transaction_id=purchase.id), timeout=timeout_seconds
        ).transaction
        printer.line("settle the purchase", settled)
        printer.create("purchase -1000", -1000, settled=True, description="scenario-1 large purchase")


def _replica_health(replica: node_pb2.ReplicaStatus | None, node_error: str) -> str:
    if node_error:
        return f"down ({node_error})"
    if replica is None:
        return "missing"
    if not replica.has_quorum:
        return "no quorum"
    lag = replica.commit_index - replica.last_applied
    return f"lagging {lag}" if lag else "ok"


@main.command("status")
@config_option
@timeout_option
def status(config_path: str, timeout_seconds: float) -> None:
    """Per shard: its leader, term, and each replica's commit and applied index and health.
    Exits 1 when any shard has no leader."""
    config = load_config(config_path)
    client = ClusterClient(config)
    try:
        statuses = client.node_statuses(timeout_seconds)
    finally:
        client.close()
    by_node = {status.node_id: status for status in statuses}
    for node_status in statuses:
        state = f"down ({node_status.error})" if node_status.error else "up"
        click.echo(f"{node_status.node_id}  {node_status.address}  {state}")
    click.echo(f"{'shard':10}  {'leader':8}  {'term':>5}  replicas (commit/applied health)")
    leaderless = []
    for shard in config.shards:
        replicas = {}
        for replica_config in shard.replicas:
            node_status = by_node[replica_config.node_id]
            replicas[replica_config.node_id] = next(
                (r for r in node_status.replicas if r.shard_id == shard.shard_id), None
            )
        # A leader that lost its majority still calls itself leader until it falls back, but
        # it can commit nothing: it does not count.
        leaders = [r for r in replicas.values() if r is not None and r.is_leader and r.has_quorum]
        leader = max(leaders, key=lambda r: r.term) if leaders else None
        if leader is None:
            leaderless.append(shard.shard_id)
        term = max((r.term for r in replicas.values() if r is not None), default=0)
        cells = []
        for node_id, replica in replicas.items():
            numbers = f"{replica.commit_index}/{replica.last_applied}" if replica else "-/-"
            cells.append(f"{node_id} {numbers} {_replica_health(replica, by_node[node_id].error)}")
        leader_name = leader.node_id if leader else "NONE"
        click.echo(f"{shard.shard_id:10}  {leader_name:8}  {term:>5}  " + " | ".join(cells))
    if leaderless:
        click.echo(f"shards without a leader: {', '.join(leaderless)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
