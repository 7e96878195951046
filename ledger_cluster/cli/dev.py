"""ledger-dev: developer commands against a running gateway or standalone server."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import click
import grpc

from ledger_cluster import backup as cluster_backup
from ledger_cluster import bench, bench_metrics
from ledger_cluster import config as cluster_config
from ledger_cluster.cli.common import (
    CONTEXT_SETTINGS,
    config_option,
    describe_rpc_error,
    load_config,
    version_option,
)
from ledger_cluster.client import NodeStatus, node_statuses_now
from ledger_cluster.dev_certificates import write_development_certificates
from ledger_cluster.errors import ConfigError, InvalidIdError, LedgerError
from ledger_cluster.ids import parse_account_id
from ledger_cluster.internal.v1 import node_pb2
from ledger_cluster.limits import BATCH_ITEMS_MAX
from ledger_cluster.localcluster.cluster import config_ports
from ledger_cluster.nemesis import network
from ledger_cluster.nemesis import runner as nemesis_runner
from ledger_cluster.nemesis.faults import (
    ALL_FAULT_KINDS,
    ELECTION_BOUND_SECONDS_DEFAULT,
    FAULT_KINDS,
    PARTITION_KINDS,
)
from ledger_cluster.sdk import (
    LedgerApiError,
    LedgerClient,
    Transaction,
    TransactionStatus,
    Transfer,
    TransferStatus,
)
from ledger_cluster.security import (
    CLIENT_TLS_CA_ENVIRONMENT_VARIABLE,
    CLUSTER_TOKEN_ENVIRONMENT_VARIABLE,
    CLUSTER_TOKEN_FILE_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE,
    ClientCredentials,
    InternalCredentials,
    public_client_from_environment,
)

DEFAULT_GATEWAY = "localhost:8000"
# Read for the cluster token when the environment has none: the local cluster's (honcho's).
DEVELOPMENT_ENVIRONMENT_FILE = Path(".env")
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


def _timeout_option(what: str) -> Callable[[click.decorators.FC], click.decorators.FC]:
    return click.option(
        "--timeout-seconds",
        type=click.FloatRange(min=0.1),
        default=DEFAULT_TIMEOUT_SECONDS,
        show_default=True,
        envvar="LEDGER_TIMEOUT_SECONDS",
        help=f"Deadline of {what} (env LEDGER_TIMEOUT_SECONDS).",
    )


# Commands that call the nodes once per question.
timeout_option = _timeout_option("each call")
# Commands that go through the SDK, which retries a call that may succeed on a second try.
operation_timeout_option = _timeout_option("each operation, its retries included")


def development_environment(path: Path) -> dict[str, str]:
    """The LEDGER_* assignments of a dotenv file like the repository's `.env` ({} without one)."""
    if not path.is_file():
        return {}
    assignments = {}
    for line in path.read_text().splitlines():
        key, equals, value = line.strip().partition("=")
        if equals and key.startswith("LEDGER_"):
            assignments[key] = value
    return assignments


def cluster_credentials() -> ClientCredentials:
    """What ledger-dev presents to the nodes: the cluster token from LEDGER_CLUSTER_TOKEN (or
    LEDGER_CLUSTER_TOKEN_FILE), else the development token in ./.env, so the README's local
    cluster needs no setup; internal TLS from the LEDGER_INTERNAL_TLS_* variables."""
    environment = dict(os.environ)
    if not {CLUSTER_TOKEN_ENVIRONMENT_VARIABLE, CLUSTER_TOKEN_FILE_ENVIRONMENT_VARIABLE} & environment.keys():
        environment.update(development_environment(DEVELOPMENT_ENVIRONMENT_FILE))
    try:
        # Weak or not, the token is the nodes' to judge; a client only presents it.
        return InternalCredentials.from_environment(allow_weak=True, environment=environment).client()
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


def public_credentials() -> ClientCredentials:
    try:
        return public_client_from_environment()
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


@contextmanager
def ledger_client(address: str, timeout_seconds: float) -> Iterator[LedgerClient]:
    """The SDK's client: each operation has `timeout_seconds`, retries included, and one that
    fails retryably is retried with the same request id within it (a shard electing a leader,
    about a second, does not fail a scenario). One that still fails ends the command with its
    status and ErrorInfo reason."""
    client = LedgerClient(
        address,
        credentials=public_credentials(),
        call_timeout_seconds=timeout_seconds,
        retry_deadline_seconds=timeout_seconds,
    )
    try:
        yield client
    except LedgerApiError as error:
        raise click.ClickException(f"{address}: {error}") from None
    finally:
        client.close()


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


@main.command("dev-certificates")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dev-certificates"),
    show_default=True,
)
def dev_certificates(out_dir: Path) -> None:
    """Write a DEVELOPMENT-ONLY CA and a certificate it signs for localhost and 127.0.0.1-3
    (server and client use): enough for mutual TLS between a local cluster's processes and
    for TLS on a local gateway. Prints the variables that turn them on."""
    written = write_development_certificates(out_dir)
    click.echo(f"wrote {written.ca_path}, {written.certificate_path}, {written.key_path} (development only)")
    click.echo("internal mutual TLS (nodes, gateway, ledger-dev):")
    for variable, path in (
        (INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE, written.ca_path),
        (INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE, written.certificate_path),
        (INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE, written.key_path),
    ):
        click.echo(f"  export {variable}={path.resolve()}")
    click.echo("public TLS: ledger-gateway --tls-cert ... --tls-key ...; clients:")
    click.echo(f"  export {CLIENT_TLS_CA_ENVIRONMENT_VARIABLE}={written.ca_path.resolve()}")


@main.command("seed-accounts")
@click.option("--count", type=click.IntRange(1, SEED_ACCOUNTS_MAX), default=100, show_default=True)
@gateway_option
@operation_timeout_option
def seed_accounts(count: int, gateway: str, timeout_seconds: float) -> None:
    """Create COUNT accounts and print their ids, one per line (progress goes to stderr)."""
    with (
        ledger_client(gateway, timeout_seconds) as client,
        click.progressbar(length=count, label="creating accounts", file=sys.stderr) as progress,
    ):
        for _ in range(count):
            click.echo(client.create_account().id)
            progress.update(1)


class _ScenarioPrinter:
    def __init__(self, client: LedgerClient, account_id: str):
        self._client = client
        self._account_id = account_id
        self._step = 0

    def balances(self) -> str:
        account = self._client.get_account(self._account_id, consistent=True)
        return f"available/settled {account.available_balance}/{account.settled_balance}"

    def line(self, action: str, transaction: Transaction | None) -> Transaction | None:
        self._step += 1
        if transaction is None:
            detail = f"{'-':32}  {'-':>7}  {'-':18}"
        else:
            detail = f"{transaction.id:32}  {transaction.amount:>7}  {transaction.status.value:18}"
        click.echo(f"{self._step}  {action:22}  {detail}  {self.balances()}")
        return transaction

    def create(self, action: str, amount: int, settled: bool, description: str) -> Transaction:
        transaction = self._client.create_transaction(
            self._account_id, amount, settled=settled, description=description
        )
        self.line(action, transaction)
        return transaction


@main.command("scenario-1")
@click.option("--account-id", required=True, help="Account to run the scenario on (16 hex chars).")
@gateway_option
@operation_timeout_option
def scenario_1(account_id: str, gateway: str, timeout_seconds: float) -> None:
    """Run the monstera-example scenario on one account: read, instant top-up +100, pending
    purchase -10, settle it, purchase -1000 (INSUFFICIENT_FUNDS), printing the transaction id,
    amount, status and the balances after every step."""
    with ledger_client(gateway, timeout_seconds) as client:
        printer = _ScenarioPrinter(client, account_id)
        click.echo(f"scenario-1 on account {account_id} via {gateway}")
        click.echo(f"#  {'step':22}  {'transaction':32}  {'amount':>7}  {'status':18}  balances")
        printer.line("read balance", None)
        printer.create("top-up +100 (instant)", 100, settled=True, description="scenario-1 top-up")
        purchase = printer.create(
            "purchase -10 (pending)", -10, settled=False, description="scenario-1 purchase"
        )
        printer.line("settle the purchase", client.settle_transaction(purchase.id))
        printer.create("purchase -1000", -1000, settled=True, description="scenario-1 large purchase")


# scenario-2's amounts: a top-up, a pending transfer settled in part, one far beyond the funds
# (at least this much), and a pending one left to expire.
SCENARIO_2_TOP_UP = 100
SCENARIO_2_PENDING = 30
SCENARIO_2_PARTIAL_SETTLE = 20
SCENARIO_2_TOO_LARGE_MIN = 1000
SCENARIO_2_EXPIRING = 10
SCENARIO_2_EXPIRY_TIMEOUT_SECONDS = 2
# The cluster expires a transfer within a second or two of its deadline (and then its credit leg
# on the other shard) while the shards have leaders; this far past the deadline it has failed.
SCENARIO_2_EXPIRY_WAIT_SECONDS = 20.0
SCENARIO_2_POLL_SECONDS = 0.1
# One page of each account's legs is printed; a fresh account has a handful.
SCENARIO_2_LEGS_PAGE_SIZE = 1000


def _shard_id_of(config: cluster_config.ClusterConfig, account_id: str, option: str) -> str:
    try:
        return config.shard_for_account(parse_account_id(account_id)).shard_id
    except InvalidIdError as error:
        raise click.BadParameter(str(error), param_hint=option) from None


def _account_on_other_shard(client: LedgerClient, config: cluster_config.ClusterConfig, shard_id: str) -> str:
    """A new account on a shard other than `shard_id`: the gateway derives an account id from
    its CreateAccount request id, so the request id is drawn for a shard of the config."""
    others = [shard for shard in config.shards if shard.shard_id != shard_id]
    if not others:
        raise click.ClickException(
            f"the config has one shard only ({shard_id}): no transfer can cross shards"
        )
    shard = others[secrets.randbelow(len(others))]
    _, request_id = bench.account_request_in_shard(shard.lower_bound, shard.upper_bound)
    return client.create_account(request_id=request_id).id


class _TransferScenarioPrinter:
    """One line per step: what it made (id, amount, settled amount, status) and both accounts'
    balances read back consistently."""

    def __init__(self, client: LedgerClient, debit_account_id: str, credit_account_id: str):
        self._client = client
        self._accounts = (("debit", debit_account_id), ("credit", credit_account_id))
        self._step = 0

    def balances(self) -> str:
        cells = []
        for label, account_id in self._accounts:
            account = self._client.get_account(account_id, consistent=True)
            cells.append(f"{label} available/settled {account.available_balance}/{account.settled_balance}")
        return "  ".join(cells)

    def line(self, action: str, made: Transaction | Transfer) -> None:
        self._step += 1
        click.echo(
            f"{self._step}  {action:28}  {made.id:32}  {made.amount:>7}  {made.settled_amount:>7}"
            f"  {made.status.value:18}  {self.balances()}"
        )

    def transfer(self, action: str, transfer: Transfer) -> Transfer:
        self.line(action, transfer)
        return transfer

    def legs(self, label: str, account_id: str, shard_id: str) -> list[Transaction]:
        page = self._client.list_transactions(account_id, page_size=SCENARIO_2_LEGS_PAGE_SIZE)
        click.echo(f"transactions of the {label} account {account_id} ({shard_id}):")
        for leg in page.transactions:
            click.echo(
                f"   {leg.id:32}  {leg.amount:>7}  {leg.settled_amount:>7}  {leg.status.value:18}"
                f"  transfer {leg.transfer_id or '-':32}  counterparty {leg.counterparty_account_id or '-'}"
            )
        if page.next_page_token:
            click.echo(f"   (more than {SCENARIO_2_LEGS_PAGE_SIZE}; the rest not shown)")
        return list(page.transactions)


def _poll_until(what: str, done: Callable[[], bool], deadline_seconds: float) -> None:
    """Call `done` every SCENARIO_2_POLL_SECONDS until it is true; fail the command past the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while not done():
        if time.monotonic() >= deadline:
            raise click.ClickException(f"{what} not seen within {deadline_seconds:g} s")
        time.sleep(SCENARIO_2_POLL_SECONDS)


class _TransferParties(NamedTuple):
    debit_account_id: str
    debit_shard_id: str
    credit_account_id: str
    credit_shard_id: str


def _scenario_2_parties(
    client: LedgerClient,
    config: cluster_config.ClusterConfig,
    debit_account_id: str | None,
    credit_account_id: str | None,
) -> _TransferParties:
    """The debit and credit accounts (new ones for those not given) and their shards."""
    if debit_account_id is None:
        debit_account_id = client.create_account().id
    debit_shard_id = _shard_id_of(config, debit_account_id, "--debit-account-id")
    if credit_account_id is None:
        credit_account_id = _account_on_other_shard(client, config, debit_shard_id)
    credit_shard_id = _shard_id_of(config, credit_account_id, "--credit-account-id")
    if credit_shard_id == debit_shard_id:
        raise click.BadParameter(
            f"both accounts are on {debit_shard_id}; scenario-2 crosses shards",
            param_hint="--credit-account-id",
        )
    return _TransferParties(debit_account_id, debit_shard_id, credit_account_id, credit_shard_id)


SCENARIO_2_WAIT_SECONDS = SCENARIO_2_EXPIRY_TIMEOUT_SECONDS + SCENARIO_2_EXPIRY_WAIT_SECONDS


def _wait_until_resolved(client: LedgerClient, pending: Transfer) -> Transfer:
    """The transfer as it stands once it has left PENDING."""
    latest = pending

    def resolved() -> bool:
        nonlocal latest
        latest = client.get_transfer(pending.id, consistent=True)
        return latest.status is not TransferStatus.PENDING

    _poll_until(f"transfer {pending.id} leaving PENDING", resolved, SCENARIO_2_WAIT_SECONDS)
    return latest


def _wait_until_credit_leg_expired(client: LedgerClient, expired: Transfer) -> None:
    """The credit leg on the other shard follows the debit leg's expiry a moment later."""

    def credit_leg_expired() -> bool:
        leg = client.get_transaction(expired.credit_transaction_id)
        return leg.status is TransactionStatus.EXPIRED

    _poll_until(
        f"credit leg {expired.credit_transaction_id} EXPIRED", credit_leg_expired, SCENARIO_2_WAIT_SECONDS
    )


@main.command("scenario-2")
@click.option(
    "--debit-account-id",
    default=None,
    help="Account the money leaves (16 hex chars). Default: a new account.",
)
@click.option(
    "--credit-account-id",
    default=None,
    help="Account the money arrives in, on another shard of --config. Default: a new account on"
    " another shard.",
)
@config_option
@gateway_option
@operation_timeout_option
def scenario_2(
    debit_account_id: str | None,
    credit_account_id: str | None,
    config_path: str,
    gateway: str,
    timeout_seconds: float,
) -> None:
    """Walk a transfer between two accounts on different shards: top-up of the debit account
    +100, a pending transfer of 30, settle 20 of it (the rest of the hold is released), a
    transfer beyond the funds (INSUFFICIENT_FUNDS, nothing moves), a pending transfer of 10 with
    timeout_seconds=2 polled until it is EXPIRED; every step prints its id, amount, settled
    amount, status and both accounts' balances. Then both accounts' transactions (the legs).
    Without account ids, new accounts are created on two shards of --config."""
    config = load_config(config_path)
    with ledger_client(gateway, timeout_seconds) as client:
        parties = _scenario_2_parties(client, config, debit_account_id, credit_account_id)
        debit_account_id, credit_account_id = parties.debit_account_id, parties.credit_account_id
        printer = _TransferScenarioPrinter(client, debit_account_id, credit_account_id)
        click.echo(
            f"scenario-2 from {debit_account_id} ({parties.debit_shard_id}) to {credit_account_id}"
            f" ({parties.credit_shard_id}) via {gateway}"
        )
        click.echo(
            f"#  {'step':28}  {'transaction or transfer':32}  {'amount':>7}  {'settled':>7}  {'status':18}"
            "  balances"
        )
        top_up = client.create_transaction(
            debit_account_id, SCENARIO_2_TOP_UP, settled=True, description="scenario-2 top-up"
        )
        printer.line(f"top-up debit +{SCENARIO_2_TOP_UP} (instant)", top_up)

        def create(amount: int, settled: bool, description: str, timeout: int = 0) -> Transfer:
            return client.create_transfer(
                debit_account_id,
                credit_account_id,
                amount,
                settled=settled,
                description=description,
                timeout_seconds=timeout,
            )

        pending = printer.transfer(
            f"transfer {SCENARIO_2_PENDING} (pending)",
            create(SCENARIO_2_PENDING, settled=False, description="scenario-2 pending transfer"),
        )
        printer.transfer(
            f"settle {SCENARIO_2_PARTIAL_SETTLE} of it",
            client.settle_transfer(pending.id, amount=SCENARIO_2_PARTIAL_SETTLE),
        )
        debit_account = client.get_account(debit_account_id, consistent=True)
        too_large = max(
            SCENARIO_2_TOO_LARGE_MIN, debit_account.available_balance + debit_account.overdraft_limit + 1
        )
        printer.transfer(
            f"transfer {too_large}", create(too_large, settled=True, description="scenario-2 large transfer")
        )
        expiring = printer.transfer(
            f"transfer {SCENARIO_2_EXPIRING} (pending, {SCENARIO_2_EXPIRY_TIMEOUT_SECONDS} s)",
            create(
                SCENARIO_2_EXPIRING,
                settled=False,
                description="scenario-2 expiring transfer",
                timeout=SCENARIO_2_EXPIRY_TIMEOUT_SECONDS,
            ),
        )
        resolved = printer.transfer("wait until it expires", _wait_until_resolved(client, expiring))
        if resolved.status is not TransferStatus.EXPIRED:
            raise click.ClickException(f"transfer {expiring.id} ended {resolved.status.value}, not EXPIRED")
        _wait_until_credit_leg_expired(client, resolved)
        click.echo(f"final balances: {printer.balances()}")
        printer.legs("debit", debit_account_id, parties.debit_shard_id)
        printer.legs("credit", credit_account_id, parties.credit_shard_id)


def _replica_health(replica: node_pb2.ReplicaStatus | None, node_error: str) -> str:
    if node_error:
        return f"down ({node_error})"
    if replica is None:
        return "missing"
    if not replica.has_quorum:
        return "no quorum"
    lag = replica.commit_index - replica.last_applied
    return f"lagging {lag}" if lag else "ok"


def _account_ids_of(path: Path, count: int) -> list[str]:
    """The first `count` account ids of `path`, one per line (blank lines and # comments skipped)."""
    account_ids = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_account_id(line)
        except InvalidIdError as error:
            raise click.BadParameter(f"{path}:{number}: {error}", param_hint="--accounts-file") from None
        account_ids.append(line)
        if len(account_ids) == count:
            break
    if not account_ids:
        raise click.BadParameter(f"{path} lists no account", param_hint="--accounts-file")
    return account_ids


@main.command("bench")
@click.option(
    "--accounts",
    type=click.IntRange(1, bench.ACCOUNTS_MAX),
    default=100,
    show_default=True,
    help="Accounts to create and load; with --accounts-file, how many of the file's to use.",
)
@click.option(
    "--accounts-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Use existing accounts instead of creating new ones: the first --accounts ids of this file"
    " (one per line, as scripts/preload-state writes to accounts.txt). Each must exist and hold"
    f" at least {bench.ACCOUNTS_FILE_BALANCE_MIN}.",
)
@click.option(
    "--duration",
    "duration_seconds",
    type=click.FloatRange(0.1, bench.DURATION_SECONDS_MAX),
    default=10.0,
    show_default=True,
    help="Measured seconds, after the warm-up.",
)
@click.option(
    "--warmup",
    "warmup_seconds",
    type=click.FloatRange(0.0, bench.WARMUP_SECONDS_MAX),
    default=1.0,
    show_default=True,
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, bench.CONCURRENCY_MAX),
    default=32,
    show_default=True,
    help="Clients, each with one call in flight (coroutines sharing one channel).",
)
@click.option(
    "--batch",
    type=click.IntRange(1, BATCH_ITEMS_MAX),
    default=1,
    show_default=True,
    help="Items per call: above 1, creates, settles, cancels and transfers use the batch RPCs (B items"
    " count as B transactions); reads stay unary.",
)
@click.option(
    "--mix",
    default="create,settle,cancel,read",
    show_default=True,
    help="Comma-separated operations to draw from evenly: create, settle, cancel, read, transfer (one"
    " unit, settled, between two accounts on different shards of --config), transfer-same (on one"
    " shard). A mix of transfers only counts transfers per second.",
)
@config_option
@click.option(
    "--metrics",
    "metrics_urls",
    multiple=True,
    metavar="URL",
    help="Prometheus endpoint of a server process (loopback http only) whose CPU per transaction"
    f" is reported; repeatable, at most {bench_metrics.METRICS_URLS_MAX}. Default: those of"
    f" {', '.join(bench_metrics.DEFAULT_METRICS_URLS)} that answer.",
)
@click.option(
    "--window-seconds",
    type=click.FloatRange(min=bench.WINDOW_SECONDS_MIN),
    default=bench.WINDOW_SECONDS_DEFAULT,
    show_default=True,
    help="Also report throughput per window of this length of the measured period, and the last"
    " window's over the first's.",
)
@click.option(
    "--sdk",
    is_flag=True,
    help="Make every call through the Python SDK's AsyncLedgerClient, as an application would:"
    " the clients' concurrent single creates and transfers travel auto-batched, and retryable"
    " failures are retried with the same request id. Not with --batch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
@gateway_option
def bench_command(
    *,
    accounts: int,
    accounts_file: Path | None,
    window_seconds: float,
    duration_seconds: float,
    warmup_seconds: float,
    concurrency: int,
    batch: int,
    mix: str,
    metrics_urls: tuple[str, ...],
    sdk: bool,
    as_json: bool,
    config_path: str,
    gateway: str,
) -> None:
    """Load a running gateway with concurrent clients (one unary call per transaction, or batch
    calls of --batch items) and report throughput, latency percentiles, errors by code and CPU
    per transaction (of each server process with a metrics endpoint, and of this load
    generator); then check every account's balances against its transactions, and, for a mix
    without settles and cancels, against its acknowledged writes and the sum of all balances
    against conservation (exit 1 on any mismatch). A write whose outcome is unknown counts as an
    error, never as a success. Transfer mixes read the server's shards from --config."""
    operations = [name.strip() for name in mix.split(",") if name.strip()]
    unknown = sorted(set(operations) - set(bench.OPERATIONS))
    if not operations or unknown:
        raise click.BadParameter(
            f"unknown operations {unknown}; choose from {bench.OPERATIONS}", param_hint="--mix"
        )
    if sdk and batch > 1:
        raise click.BadParameter(
            "the SDK batches concurrent single calls itself; drop --batch", param_hint="--sdk"
        )
    if len(metrics_urls) > bench_metrics.METRICS_URLS_MAX:
        raise click.BadParameter(
            f"{len(metrics_urls)} endpoints; at most {bench_metrics.METRICS_URLS_MAX}", param_hint="--metrics"
        )
    for url in metrics_urls:
        problem = bench_metrics.loopback_url_problem(url)
        if problem is not None:
            raise click.BadParameter(problem, param_hint="--metrics")
    existing_account_ids = None if accounts_file is None else _account_ids_of(accounts_file, accounts)
    needs_config = bool(set(operations) & set(bench.TRANSFER_OPERATIONS))
    config = load_config(config_path) if needs_config else None
    try:
        result = bench.run_bench(
            gateway,
            accounts=accounts,
            duration_seconds=duration_seconds,
            concurrency=concurrency,
            mix=operations,
            warmup_seconds=warmup_seconds,
            progress=lambda line: click.echo(line, err=True),
            batch=batch,
            # None: the dev cluster's ports, those that answer.
            metrics_urls=list(metrics_urls) or None,
            window_seconds=window_seconds,
            existing_account_ids=existing_account_ids,
            config=config,
            sdk=sdk,
        )
    except grpc.RpcError as error:
        raise click.ClickException(f"{gateway}: {describe_rpc_error(error)}") from None
    except bench.BenchError as error:
        raise click.ClickException(f"{gateway}: {error}") from None
    click.echo(result.describe())
    if as_json:
        click.echo(json.dumps(result.summary(), sort_keys=True))
    if result.balance_mismatches:
        for line in result.balance_mismatches:
            click.echo(f"mismatch: {line}", err=True)
        sys.exit(1)


@main.command("nemesis")
@click.option(
    "--duration",
    "duration_seconds",
    type=click.FloatRange(min=1.0, max=nemesis_runner.DURATION_SECONDS_MAX),
    default=120.0,
    show_default=True,
    help="Seconds of faults under load (setup, healing and checks come on top).",
)
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True, help="Seeds the schedule.")
@click.option("--clients", type=click.IntRange(1, nemesis_runner.CLIENTS_MAX), default=4, show_default=True)
@click.option(
    "--faults",
    default=",".join(FAULT_KINDS),
    show_default=True,
    help=f"Comma-separated faults to draw from; also {', '.join(PARTITION_KINDS)}.",
)
@click.option(
    "--partitions",
    is_flag=True,
    help="Add every network partition fault to --faults. Partitions run the whole cluster in a"
    " private network namespace that the command makes (and deletes at the end) and re-runs itself"
    " in: needs root, `ip` and `iptables`.",
)
@click.option(
    "--shards",
    type=click.IntRange(1, nemesis_runner.SHARDS_MAX),
    default=nemesis_runner.SHARDS_DEFAULT,
    show_default=True,
)
@click.option(
    "--log-compaction-min-entries",
    type=click.IntRange(min=10),
    default=nemesis_runner.LOG_COMPACTION_MIN_ENTRIES_DEFAULT,
    show_default=True,
    help="Low, so snapshots and snapshot transfers happen during the run.",
)
@click.option(
    "--election-bound-seconds",
    type=click.FloatRange(min=0.1),
    default=ELECTION_BOUND_SECONDS_DEFAULT,
    show_default=True,
    help="A shard without a leader for longer after a fault fails the run.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run directory (config, data, logs, history.jsonl, report.json); must not exist."
    " Default: a new directory under ./nemesis-runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on the last line.")
@click.option(
    "--workload",
    type=click.Choice(nemesis_runner.WORKLOAD_CHOICES),
    default=nemesis_runner.WORKLOAD_CHOICE_DEFAULT,
    show_default=True,
    help="Operations the clients draw from: transactions, transfers (with the top-ups that fund"
    " them), or both.",
)
def nemesis_command(
    *,
    duration_seconds: float,
    seed: int,
    clients: int,
    faults: str,
    partitions: bool,
    shards: int,
    log_compaction_min_entries: int,
    election_bound_seconds: float,
    out_dir: Path | None,
    as_json: bool,
    workload: str,
) -> None:
    """Start a local 3-node cluster with its own ports and data, drive it with concurrent clients
    (creates, top-ups, purchases, settles, cancels, transfers, reads, duplicate request_ids) while a seeded
    nemesis kills, pauses, wipes and re-leads nodes; then heal it, check every promise against
    the history and print a report. Exits 1 when any check fails."""
    chosen = tuple(name.strip() for name in faults.split(",") if name.strip())
    chosen += PARTITION_KINDS if partitions else ()
    unknown = sorted(set(chosen) - set(ALL_FAULT_KINDS))
    if not chosen or unknown:
        raise click.BadParameter(
            f"unknown faults {unknown}; choose from {', '.join(ALL_FAULT_KINDS)}", param_hint="--faults"
        )
    if set(chosen) & set(PARTITION_KINDS):
        try:
            network.rerun_in_namespace_unless_inside()
        except network.NamespaceError as error:
            raise click.ClickException(str(error)) from error
    if out_dir is None:
        out_dir = Path("nemesis-runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-seed-{seed}"
    if out_dir.exists():
        raise click.BadParameter(f"{out_dir} already exists; pick a new run directory", param_hint="--out")
    default_config = Path(cluster_config.DEFAULT_CONFIG_PATH)
    avoided = config_ports(cluster_config.load(default_config)) if default_config.is_file() else set()
    options = nemesis_runner.NemesisOptions(
        base_dir=out_dir.resolve(),
        duration_seconds=duration_seconds,
        seed=seed,
        clients=clients,
        faults=tuple(dict.fromkeys(chosen)),
        shards=shards,
        log_compaction_min_entries=log_compaction_min_entries,
        election_bound_seconds=election_bound_seconds,
        avoided_ports=frozenset(avoided),
        workload=workload,
    )
    report = nemesis_runner.run_nemesis(options, _progress)
    click.echo(report.to_text())
    if as_json:
        click.echo(report.to_json())
    if not report.passed:
        sys.exit(1)


# Marks a shard whose leader is not its preferred leader (the node that should lead it when healthy).
NOT_PREFERRED_MARK = "*"


def _shard_replicas(
    shard: cluster_config.ShardConfig, by_node: dict[str, NodeStatus]
) -> dict[str, node_pb2.ReplicaStatus | None]:
    """Each replica's status by node id, None where its node did not report the shard."""
    return {
        replica.node_id: next(
            (r for r in by_node[replica.node_id].replicas if r.shard_id == shard.shard_id), None
        )
        for replica in shard.replicas
    }


def _acting_leader(replicas: dict[str, node_pb2.ReplicaStatus | None]) -> node_pb2.ReplicaStatus | None:
    # A leader that lost its majority still calls itself leader until it falls back, but it can
    # commit nothing: it does not count.
    leaders = [r for r in replicas.values() if r is not None and r.is_leader and r.has_quorum]
    return max(leaders, key=lambda r: r.term) if leaders else None


def _leader_cell(leader: node_pb2.ReplicaStatus | None, preferred_leader: str) -> str:
    if leader is None:
        return "NONE"
    return leader.node_id + ("" if leader.node_id == preferred_leader else NOT_PREFERRED_MARK)


def _replica_cells(replicas: dict[str, node_pb2.ReplicaStatus | None], by_node: dict[str, NodeStatus]) -> str:
    cells = []
    for node_id, replica in replicas.items():
        numbers = f"{replica.commit_index}/{replica.last_applied}" if replica else "-/-"
        cells.append(f"{node_id} {numbers} {_replica_health(replica, by_node[node_id].error)}")
    return " | ".join(cells)


@main.command("status")
@config_option
@timeout_option
def status(config_path: str, timeout_seconds: float) -> None:
    """Per shard: its leader beside its preferred leader (a * marks a leader that is not the
    preferred one), term, and each replica's commit and applied index and health. Exits 1 when
    any shard has no leader; a leader other than the preferred one is reported, not an error."""
    config = load_config(config_path)
    statuses = node_statuses_now(config, cluster_credentials(), timeout_seconds)
    by_node = {status.node_id: status for status in statuses}
    for node_status in statuses:
        state = f"down ({node_status.error})" if node_status.error else "up"
        click.echo(f"{node_status.node_id}  {node_status.address}  {state}")
    click.echo(f"{'shard':10}  {'leader':8}  {'preferred':9}  {'term':>5}  replicas (commit/applied health)")
    leaderless, not_preferred = [], []
    for shard in config.shards:
        replicas = _shard_replicas(shard, by_node)
        leader = _acting_leader(replicas)
        if leader is None:
            leaderless.append(shard.shard_id)
        elif leader.node_id != shard.preferred_leader:
            not_preferred.append(shard.shard_id)
        term = max((r.term for r in replicas.values() if r is not None), default=0)
        leader_cell = _leader_cell(leader, shard.preferred_leader)
        click.echo(
            f"{shard.shard_id:10}  {leader_cell:8}  {shard.preferred_leader:9}  {term:>5}  "
            + _replica_cells(replicas, by_node)
        )
    if not_preferred:
        click.echo(
            f"{NOT_PREFERRED_MARK} led by a node other than its preferred leader: {', '.join(not_preferred)}"
        )
    if leaderless:
        click.echo(f"shards without a leader: {', '.join(leaderless)}", err=True)
        sys.exit(1)


def _progress(message: str) -> None:
    click.echo(message, err=True)


@main.command("backup")
@config_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New or empty directory for the snapshots and manifest.json.",
)
@click.option(
    "--timeout-seconds",
    type=click.FloatRange(min=1.0),
    default=cluster_backup.SNAPSHOT_STREAM_TIMEOUT_SECONDS_DEFAULT,
    show_default=True,
    help="Deadline of one shard's snapshot stream.",
)
def backup(config_path: str, out_dir: Path, timeout_seconds: float) -> None:
    """Snapshot every shard from its leader into OUT: one <shard>.snapshot per shard, checked
    against the leader's sha256 and its own checksum, then manifest.json (written last: a
    directory without it is no backup). Progress goes to stderr."""
    config = load_config(config_path)
    try:
        manifest = cluster_backup.backup_cluster(
            config, cluster_credentials(), out_dir, _progress, timeout_seconds
        )
    except LedgerError as error:
        raise click.ClickException(f"backup failed: {error}") from error
    records = sum(shard.record_count for shard in manifest.shards)
    click.echo(f"backed up {len(manifest.shards)} shards ({records} records) to {out_dir}")


@main.command("restore")
@click.option(
    "--backup",
    "backup_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="Directory written by `ledger-dev backup`.",
)
@config_option
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Prepare <data-root>/<node-id>/ for every node of the config (the Procfile uses ./data).",
)
def restore(backup_dir: Path, config_path: str, data_root: Path) -> None:
    """Build every node's replicas of the config's shards from a backup, for any shard count.
    The backup is checked first (manifest, every file's sha256 and checksum) and existing shard
    data is never overwritten; nothing is written unless both checks pass. The restored cluster
    starts a fresh Raft log (applied index 0) on the backup's state."""
    config = load_config(config_path)
    try:
        restored = cluster_backup.restore_cluster(backup_dir, config, data_root, _progress)
    except LedgerError as error:
        raise click.ClickException(f"restore failed: {error}") from error
    nodes = sorted({node_id for shard in restored for node_id in shard.node_ids})
    click.echo(f"restored {len(restored)} shards on {', '.join(nodes)} under {data_root}")


def _replica_cell(replica: cluster_backup.ReplicaVerification) -> str:
    if replica.answer is None:
        return f"{replica.node_id} down"
    answer = replica.answer
    problems = f" {answer.problem_count} problems" if answer.problem_count else ""
    return f"{replica.node_id} {answer.applied_index}/{answer.digest[:12]}{problems}"


@main.command("verify")
@config_option
@click.option(
    "--timeout-seconds",
    type=click.FloatRange(min=0.1),
    default=cluster_backup.VERIFY_RPC_TIMEOUT_SECONDS_DEFAULT,
    show_default=True,
    help="Deadline of one replica's verification.",
)
@click.option(
    "--settle-seconds",
    type=click.FloatRange(min=0.0),
    default=cluster_backup.VERIFY_SETTLE_SECONDS_DEFAULT,
    show_default=True,
    help="How long replicas at different applied indexes are asked again before that fails.",
)
def verify(config_path: str, timeout_seconds: float, settle_seconds: float) -> None:
    """Check every replica of every shard: stored balances against its transactions, the key
    layout, and the state digest against the other replicas at the same applied index; then,
    across shards, that both legs of every transfer agree, that none is unfinished, and that
    per currency transfers moved money without making any (run it on a quiet cluster). Prints
    one line per shard (replica applied index/digest); exits 1 on any problem or mismatch."""
    config = load_config(config_path)
    results = cluster_backup.verify_cluster(
        config, cluster_credentials(), _progress, timeout_seconds, settle_seconds
    )
    click.echo(f"{'shard':10}  {'result':8}  replicas (applied index/digest)")
    for shard in results:
        cells = " | ".join(_replica_cell(replica) for replica in shard.replicas)
        click.echo(f"{shard.shard_id:10}  {'ok' if shard.clean else 'FAILED':8}  {cells}")
        for failure in shard.failures:
            click.echo(f"    {failure}")
    transfers = cluster_backup.check_transfers(results)
    verdict = "FAILED" if transfers.failures else "ok"
    click.echo(
        f"{'transfers':10}  {verdict:8}  {transfers.debit_legs} debit legs,"
        f" {transfers.credit_legs} credit legs, {transfers.unfinished} unfinished"
    )
    for failure in transfers.failures:
        click.echo(f"    {failure}")
    failed = [shard.shard_id for shard in results if not shard.clean]
    if failed or transfers.failures:
        shards = f": {', '.join(failed)}" if failed else ""
        also = " and for transfers" if transfers.failures else ""
        click.echo(f"verification failed for {len(failed)} shards{shards}{also}", err=True)
        sys.exit(1)
    click.echo(f"all {len(results)} shards verified, and every transfer's legs agree")


if __name__ == "__main__":
    main()
