"""Who may call which port (issue 15, item 1), on real processes.

- NodeService refuses every call without the cluster token (or with another one) with
  UNAUTHENTICATED before a handler runs, so a refused Update changes nothing; health stays open.
- A node refuses a command longer than any a gateway builds.
- With internal TLS the nodes speak mutual TLS only: plaintext and certificate-less clients
  are turned away, and the gateway, the nodes and ledger-dev work through it.
- The public port serves TLS (mutual with a client CA) and checks bearer tokens when given
  them; ledger-dev reaches it with LEDGER_TLS_CA and LEDGER_CLIENT_TOKEN.
- Secrets given on a command line, short ones, and a node address beyond loopback without
  TLS are refused before anything opens.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.core import commands
from ledger_cluster.core.records import TransactionRecord
from ledger_cluster.dev_certificates import DevelopmentCertificates
from ledger_cluster.errors import ConfigError
from ledger_cluster.internal.v1 import core_pb2, node_pb2, node_pb2_grpc
from ledger_cluster.limits import (
    BATCH_ITEMS_MAX,
    COMMAND_BYTES_MAX,
    CURRENCY_CHARACTERS_MAX,
    DESCRIPTION_BYTES_MAX,
    INT64_MIN,
    ITEM_COMMAND_BYTES_MAX,
    METADATA_ENTRIES_MAX,
    METADATA_KEY_BYTES_MAX,
    METADATA_VALUE_BYTES_MAX,
    REQUEST_ID_BYTES_MAX,
    TIMEOUT_SECONDS_MAX,
)
from ledger_cluster.localcluster.cluster import gateway_command
from ledger_cluster.localcluster.processes import (
    LOOPBACK_HOST,
    clean_environment,
    free_port,
    managed_process,
)
from ledger_cluster.security import SECRET_BYTES_MIN, ClientCredentials
from ledger_cluster.status import error_details
from tests.cluster import TEST_RAFT_PASSWORD, Cluster, new_cluster, started_cluster
from tests.processes import (
    REPO_ROOT,
    development_tls,
    standalone_command,
    tls_standalone_server,
    write_generated_config,
)

RPC_TIMEOUT_SECONDS = 10.0
PROCESS_TIMEOUT_SECONDS = 30.0
CLIENT_TOKEN = "client-token-for-the-security-tests-0001"
OTHER_TOKEN = "client-token-nobody-was-ever-given-00002"
UINT64_MAX = 2**64 - 1


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with started_cluster(new_cluster(tmp_path_factory.mktemp("cluster"), shards=2)) as running:
        yield running


def node_stub(
    address: str, credentials: ClientCredentials
) -> tuple[grpc.Channel, node_pb2_grpc.NodeServiceStub]:
    channel = credentials.channel(address)
    return channel, node_pb2_grpc.NodeServiceStub(channel)


def run_command(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A command run to its end, from the repository root (whose .env a tool may read)."""
    return subprocess.run(
        arguments,
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )


def dev_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "ledger_cluster.cli.dev", *arguments]


def code_and_reason(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        if callable(call):
            call()
    details = error_details(raised.value)
    return details.code, details.reason


def account_on(config: cluster_config.ClusterConfig, shard_id: str) -> int:
    """A fresh account id that the config places on `shard_id`."""
    candidate = time.time_ns()
    while config.shard_for_account(candidate).shard_id != shard_id:
        candidate += 1
    return candidate


def assert_no_account(cluster: Cluster, account_id: int) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        cluster.ledger_stub().GetAccount(
            ledger_pb2.GetAccountRequest(account_id=f"{account_id:016x}", consistent=True),
            timeout=RPC_TIMEOUT_SECONDS,
        )
    assert error_details(missing.value).code == grpc.StatusCode.NOT_FOUND


# -- the node command cap -------------------------------------------------------------------------


def largest_legal_items() -> list[bytes]:
    """Every one-item command a gateway builds, each with every field at its legal maximum."""
    metadata = tuple(
        (f"{index:02d}".ljust(METADATA_KEY_BYTES_MAX, "k"), "v" * METADATA_VALUE_BYTES_MAX)
        for index in range(METADATA_ENTRIES_MAX)
    )
    common = {
        "amount": INT64_MIN,
        "description": "é" * (DESCRIPTION_BYTES_MAX // 2),
        "settled": False,
        "request_id": "r" * REQUEST_ID_BYTES_MAX,
        "now": 2**63 - 1,
        "metadata": metadata,
        "timeout_seconds": TIMEOUT_SECONDS_MAX,
    }
    debit_leg = TransactionRecord(
        account_id=UINT64_MAX,
        transaction_number=UINT64_MAX,
        sequence=UINT64_MAX,
        amount=INT64_MIN + 1,  # its credit leg carries the negation
        status=0,
        initial_status=0,
        created_at=2**63 - 1,
        updated_at=2**63 - 1,
        description=common["description"],  # type: ignore[arg-type]
        settled_amount=INT64_MIN + 1,
        expires_at=2**63 - 1,
        flags=UINT64_MAX,
        linked_number=UINT64_MAX,
        counterparty_account_id=UINT64_MAX,
    )
    return [
        commands.credit_leg_of(debit_leg, metadata, "X" * CURRENCY_CHARACTERS_MAX, 2**63 - 1),
        commands.resolve_leg_of(debit_leg, 2**63 - 1),
        commands.create_transfer(
            debit_account_id=UINT64_MAX,
            transfer_number=UINT64_MAX,
            credit_account_id=UINT64_MAX,
            currency="X" * CURRENCY_CHARACTERS_MAX,
            **common,  # type: ignore[arg-type]
        ),
        commands.create_transaction(account_id=UINT64_MAX, transaction_number=UINT64_MAX, **common),  # type: ignore[arg-type]
        commands.create_account(
            UINT64_MAX,
            "r" * REQUEST_ID_BYTES_MAX,
            2**63 - 1,
            currency="X" * CURRENCY_CHARACTERS_MAX,
            overdraft_limit=2**63 - 1,
            metadata=metadata,
        ),
    ]


def test_the_node_command_cap_holds_the_largest_command_a_gateway_builds() -> None:
    items = largest_legal_items()
    assert max(len(item) for item in items) <= ITEM_COMMAND_BYTES_MAX
    assert len(commands.batch([max(items, key=len)] * BATCH_ITEMS_MAX)) <= COMMAND_BYTES_MAX


def too_long_in_all(account_id: int) -> bytes:
    item = commands.create_account(account_id, "p" * (DESCRIPTION_BYTES_MAX * 4), time.time_ns())
    too_large = commands.batch([item] * (COMMAND_BYTES_MAX // len(item) + 1))
    assert len(too_large) > COMMAND_BYTES_MAX
    return too_large


def too_many_items(account_id: int) -> bytes:
    return commands.batch([commands.create_account(account_id, "", time.time_ns())] * (BATCH_ITEMS_MAX + 1))


def one_item_too_long(account_id: int) -> bytes:
    return commands.create_account(account_id, "r" * (ITEM_COMMAND_BYTES_MAX + 1), time.time_ns())


def an_item_too_long_in_a_batch(account_id: int) -> bytes:
    return commands.batch([one_item_too_long(account_id)])


@pytest.mark.parametrize(
    "build", [too_long_in_all, too_many_items, one_item_too_long, an_item_too_long_in_a_batch]
)
def test_a_node_refuses_a_command_no_gateway_builds_and_changes_nothing(
    cluster: Cluster, build: Callable[[int], bytes]
) -> None:
    shard = cluster.config.shards[0]
    account_id = account_on(cluster.config, shard.shard_id)
    too_large = build(account_id)
    leader = cluster.leader_of(shard.shard_id)
    request = node_pb2.UpdateRequest(shard_id=shard.shard_id, command=too_large)
    code, reason = code_and_reason(
        lambda: cluster.node_stub(leader).Update(request, timeout=RPC_TIMEOUT_SECONDS)
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "COMMAND_TOO_LARGE")
    assert_no_account(cluster, account_id)


# -- NodeService authentication -------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, OTHER_TOKEN], ids=["no-token", "wrong-token"])
def test_node_service_refuses_calls_without_the_cluster_token(cluster: Cluster, token: str | None) -> None:
    shard = cluster.config.shards[0]
    leader = cluster.leader_of(shard.shard_id)
    account_id = account_on(cluster.config, shard.shard_id)
    channel, stub = node_stub(cluster.nodes[leader].address, ClientCredentials(token=token, tls=None))
    with channel:
        update = node_pb2.UpdateRequest(
            shard_id=shard.shard_id, command=commands.create_account(account_id, "", time.time_ns())
        )
        calls = {
            "Update": lambda: stub.Update(update, timeout=RPC_TIMEOUT_SECONDS),
            "Status": lambda: stub.Status(node_pb2.StatusRequest(), timeout=RPC_TIMEOUT_SECONDS),
            "Read": lambda: stub.Read(
                node_pb2.ReadRequest(
                    shard_id=shard.shard_id,
                    query=core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id)),
                    consistent=True,
                ),
                timeout=RPC_TIMEOUT_SECONDS,
            ),
            "Snapshot": lambda: list(
                stub.Snapshot(node_pb2.SnapshotRequest(shard_id=shard.shard_id), timeout=RPC_TIMEOUT_SECONDS)
            ),
            "TransferLeadership": lambda: stub.TransferLeadership(
                node_pb2.TransferLeadershipRequest(shard_id=shard.shard_id, target_node_id=leader),
                timeout=RPC_TIMEOUT_SECONDS,
            ),
            "Verify": lambda: stub.Verify(
                node_pb2.VerifyRequest(shard_id=shard.shard_id), timeout=RPC_TIMEOUT_SECONDS
            ),
        }
        for name, call in calls.items():
            assert code_and_reason(call) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"), name
        # Health answers anybody: it tells only whether the node serves.
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_SECONDS
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # The refused Update created nothing; the same Update with the token does.
    assert_no_account(cluster, account_id)
    result = cluster.update_at_leader(shard.shard_id, update.command)
    assert result.outcome == core_pb2.OUTCOME_OK, result.message


def test_a_gateway_with_a_wrong_token_says_not_applied(cluster: Cluster, tmp_path: Path) -> None:
    """A refusal before the handler is a promise that nothing ran: the caller hears UNAVAILABLE
    (retry), never OUTCOME_UNKNOWN."""
    port = free_port()
    command = gateway_command(port, free_port(), cluster.config_path)
    environment = {**clean_environment(), "LEDGER_CLUSTER_TOKEN": OTHER_TOKEN}
    log_path = tmp_path / "gateway.log"
    with managed_process("ledger-gateway (wrong token)", command, log_path, env=environment):
        with grpc.insecure_channel(f"{LOOPBACK_HOST}:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=PROCESS_TIMEOUT_SECONDS)
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            code, reason = code_and_reason(
                lambda: stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS)
            )
        assert code == grpc.StatusCode.UNAVAILABLE
        assert reason != "OUTCOME_UNKNOWN"
    assert "does not answer: UNAUTHENTICATED" in log_path.read_text()


def test_ledger_dev_needs_the_cluster_token(cluster: Cluster) -> None:
    answered = cluster.dev_cli(["status", "--config", str(cluster.config_path)])
    assert answered.returncode == 0, answered.stderr
    assert "UNAUTHENTICATED" not in answered.stdout
    environment = {**cluster.environment(), "LEDGER_CLUSTER_TOKEN": OTHER_TOKEN}
    refused = run_command(
        dev_command("status", "--config", str(cluster.config_path)),
        {**clean_environment(), **environment},
    )
    assert "UNAUTHENTICATED" in refused.stdout + refused.stderr


# -- internal mutual TLS ------------------------------------------------------------------------


def test_internal_mutual_tls_admits_only_the_cluster(
    tmp_path: Path, certificates: DevelopmentCertificates
) -> None:
    tls_cluster = new_cluster(tmp_path, shards=2)
    tls_cluster.internal_tls = certificates
    with started_cluster(tls_cluster) as running:
        # The gateway reached every shard's leader over mutual TLS with the token.
        created = running.ledger_stub().CreateAccount(
            ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS
        )
        assert created.account.id
        address = running.nodes["node01"].address
        attempts = {
            "plaintext": ClientCredentials(token=running.cluster_token, tls=None),
            "TLS without a client certificate": ClientCredentials(
                token=running.cluster_token,
                tls=development_tls(certificates, with_certificate=False),
            ),
        }
        for name, credentials in attempts.items():
            channel, stub = node_stub(address, credentials)
            with channel:
                code, _ = code_and_reason(
                    lambda stub=stub: stub.Status(node_pb2.StatusRequest(), timeout=RPC_TIMEOUT_SECONDS)
                )
                assert code == grpc.StatusCode.UNAVAILABLE, name
        channel, stub = node_stub(address, ClientCredentials(token=None, tls=development_tls(certificates)))
        with channel:
            code, _ = code_and_reason(
                lambda: stub.Status(node_pb2.StatusRequest(), timeout=RPC_TIMEOUT_SECONDS)
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
        verified = running.dev_cli(["verify", "--config", str(running.config_path)])
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_node_refuses_plaintext_node_service_beyond_loopback(tmp_path: Path) -> None:
    config_path = tmp_path / "cluster_config.json"
    config = cluster_config.generate(1, 1, 1, host="192.0.2.10")
    cluster_config.write_atomic(config, config_path)
    data_dir = tmp_path / "data"
    result = run_command(
        [
            sys.executable,
            "-m",
            "ledger_cluster.cli.node",
            "--node-id",
            "node01",
            "--data-dir",
            str(data_dir),
            "--config",
            str(config_path),
        ],
        {
            **clean_environment(),
            "LEDGER_RAFT_PASSWORD": TEST_RAFT_PASSWORD + "-long-enough",
            "LEDGER_CLUSTER_TOKEN": "t" * SECRET_BYTES_MIN,
        },
    )
    assert result.returncode != 0
    assert "reachable from other machines" in result.stderr
    assert not data_dir.exists()


def test_the_gateway_refuses_a_token_on_its_command_line() -> None:
    result = run_command(
        [sys.executable, "-m", "ledger_cluster.cli.gateway", "--cluster-token", "t" * SECRET_BYTES_MIN],
        clean_environment(),
    )
    assert result.returncode == 2
    assert "--cluster-token is refused" in result.stderr


# -- the public port: TLS and client tokens ---------------------------------------------------------


@pytest.fixture
def public_server(tmp_path: Path, certificates: DevelopmentCertificates) -> Iterator[str]:
    with tls_standalone_server(tmp_path, certificates, f"{OTHER_TOKEN.upper()},{CLIENT_TOKEN}") as server:
        yield server.address


def ledger_call(address: str, credentials: ClientCredentials) -> ledger_pb2.CreateAccountResponse:
    with credentials.channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        response: ledger_pb2.CreateAccountResponse = stub.CreateAccount(
            ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS
        )
        return response


def top_up(address: str, credentials: ClientCredentials, account_id: str) -> None:
    with credentials.channel(address) as channel:
        ledger_pb2_grpc.LedgerServiceStub(channel).CreateTransaction(
            ledger_pb2.CreateTransactionRequest(account_id=account_id, amount=100, settled=True),
            timeout=RPC_TIMEOUT_SECONDS,
        )


def available(address: str, credentials: ClientCredentials, account_id: str) -> int:
    with credentials.channel(address) as channel:
        answer = ledger_pb2_grpc.LedgerServiceStub(channel).GetAccount(
            ledger_pb2.GetAccountRequest(account_id=account_id), timeout=RPC_TIMEOUT_SECONDS
        )
        return int(answer.account.available_balance)


def test_the_public_port_serves_tls_and_checks_client_tokens(
    public_server: str, certificates: DevelopmentCertificates
) -> None:
    roots = development_tls(certificates, with_certificate=False)
    refused = {
        "plaintext": (ClientCredentials(token=CLIENT_TOKEN, tls=None), grpc.StatusCode.UNAVAILABLE),
        "no token": (
            ClientCredentials(token=None, tls=roots),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        "wrong token": (
            ClientCredentials(token=OTHER_TOKEN, tls=roots),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
    }
    admitted = ClientCredentials(token=CLIENT_TOKEN, tls=roots)
    account_id = ledger_call(public_server, admitted).account.id
    for name, (credentials, expected) in refused.items():
        code, _ = code_and_reason(
            lambda credentials=credentials: top_up(public_server, credentials, account_id)
        )
        assert code == expected, name
    # No refused top-up moved money; an admitted one does.
    assert available(public_server, admitted, account_id) == 0
    top_up(public_server, admitted, account_id)
    assert available(public_server, admitted, account_id) == 100


def test_ledger_dev_reaches_a_tls_gateway_with_a_token(
    public_server: str, certificates: DevelopmentCertificates
) -> None:
    environment = {
        **clean_environment(),
        "LEDGER_TLS_CA": str(certificates.ca_path),
        "LEDGER_CLIENT_TOKEN": CLIENT_TOKEN,
    }
    result = run_command(
        dev_command("seed-accounts", "--count", "3", "--gateway", public_server),
        environment,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    without_token = {key: value for key, value in environment.items() if key != "LEDGER_CLIENT_TOKEN"}
    refused = run_command(
        dev_command("seed-accounts", "--count", "3", "--gateway", public_server),
        without_token,
    )
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stderr


def test_the_public_port_with_a_client_ca_requires_a_client_certificate(
    tmp_path: Path, certificates: DevelopmentCertificates
) -> None:
    with tls_standalone_server(tmp_path, certificates, CLIENT_TOKEN, client_ca=True) as server:
        roots_only = ClientCredentials(token=CLIENT_TOKEN, tls=development_tls(certificates, False))
        code, _ = code_and_reason(lambda: ledger_call(server.address, roots_only))
        assert code == grpc.StatusCode.UNAVAILABLE
        answer = ledger_call(
            server.address, ClientCredentials(token=CLIENT_TOKEN, tls=development_tls(certificates))
        )
        assert answer.account.id


def test_tokens_travel_in_the_clear_only_to_loopback() -> None:
    with pytest.raises(ConfigError, match="only over TLS"):
        ClientCredentials(token=CLIENT_TOKEN, tls=None).channel("192.0.2.10:7000")
    ClientCredentials(token=None, tls=None).channel("192.0.2.10:7000").close()
    ClientCredentials(token=CLIENT_TOKEN, tls=None).channel("127.0.0.2:7000").close()


def test_the_public_port_refuses_a_blank_token_variable(tmp_path: Path) -> None:
    config_path = write_generated_config(tmp_path / "cluster_config.json", 3, 2, 3)
    command = standalone_command(free_port(), tmp_path / "data", config_path)
    result = run_command(command, {**clean_environment(), "LEDGER_CLIENT_TOKENS": " "})
    assert result.returncode == 2
    assert "LEDGER_CLIENT_TOKENS is set but blank" in result.stderr
    assert not (tmp_path / "data").exists()


def test_the_public_port_refuses_short_client_tokens(
    tmp_path: Path, certificates: DevelopmentCertificates
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# clients\n{CLIENT_TOKEN}\nshort-token\n")
    config_path = write_generated_config(tmp_path / "cluster_config.json", 3, 2, 3)
    command = standalone_command(free_port(), tmp_path / "data", config_path)
    result = run_command(
        [*command, "--client-tokens-file", str(tokens_file)],
        clean_environment(),
    )
    assert result.returncode == 2
    assert f"client token #2 in {tokens_file} is 11 bytes" in result.stderr
    assert not (tmp_path / "data").exists()
