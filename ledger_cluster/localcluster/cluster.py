"""A real replicated ledger cluster on this machine, for tests and `ledger-dev nemesis`: N
`ledger-node` processes and one `ledger-gateway` on 127.0.0.1, each node with its own data
directory under a base directory, every port (each node's gRPC, Raft and metrics port) chosen
free when the cluster is built, never one of the ports the caller asks to avoid (the checked-in
config's, so a cluster started with honcho keeps running alongside).

Readiness is always polled against a deadline: a node is ready when its gRPC health says
SERVING, the cluster when every shard has one leader that every running replica of the shard
follows and the gateway's health says SERVING (which it only does once it reaches a leader for
every shard). Every process is stopped by PID in a `finally`, however the caller ends.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, cast

import grpc

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2_grpc
from ledger_cluster.config import ClusterConfig
from ledger_cluster.dev_certificates import DevelopmentCertificates
from ledger_cluster.internal.v1 import core_pb2, node_pb2, node_pb2_grpc
from ledger_cluster.localcluster.processes import (
    LEDGER_SERVICE_NAME,
    LOOPBACK_HOST,
    POLL_INTERVAL_SECONDS,
    STOP_TIMEOUT_SECONDS,
    LocalClusterError,
    ManagedProcess,
    clean_environment,
    free_ports,
    health_status,
    log_tail,
    run_dev_cli,
    start_process,
    wait_until_serving,
)
from ledger_cluster.node_protocol import is_not_taken
from ledger_cluster.replica import RAFT_PASSWORD_ENVIRONMENT_VARIABLE
from ledger_cluster.security import (
    CLUSTER_TOKEN_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE,
    ClientCredentials,
    InternalCredentials,
)
from ledger_cluster.status import error_details

NODE_SERVICE_NAME = "ledger_cluster.internal.v1.NodeService"
NODE_READY_TIMEOUT_SECONDS = 30.0
CLUSTER_READY_TIMEOUT_SECONDS = 45.0
CONVERGE_TIMEOUT_SECONDS = 30.0
NODE_RPC_TIMEOUT_SECONDS = 2.0
DEV_CLI_TIMEOUT_SECONDS = 60.0
CLUSTER_LOG_TAIL_LINES = 25
# Random bytes of a local cluster's token (hex-encoded: twice as many characters).
CLUSTER_TOKEN_BYTES = 32
# Port sets are re-drawn when they meet the checked-in config's ports; a bound on the loop.
PORT_DRAWS_MAX = 10
# gRPC, Raft (one transport for all of the node's shards) and metrics.
PORTS_PER_NODE = 3


def config_ports(config: ClusterConfig) -> set[int]:
    """Every TCP port a config makes a process listen on."""
    return {
        int(address.rpartition(":")[2])
        for node in config.nodes
        for address in (node.grpc_address, node.raft_address, node.metrics_address)
        if address is not None
    }


def node_host(index: int, distinct_hosts: bool) -> str:
    """The loopback address of the `index`th node (from 0): 127.0.0.1 for every node, or with
    `distinct_hosts` 127.0.0.<index + 1>, so that firewall rules can tell the nodes apart (only
    inside a private network namespace: see nemesis/network.py)."""
    return f"127.0.0.{index + 1}" if distinct_hosts else LOOPBACK_HOST


def loopback_config(
    nodes: int = 3,
    shards: int = 4,
    replicas: int = 3,
    avoided_ports: frozenset[int] = frozenset(),
    distinct_hosts: bool = False,
) -> ClusterConfig:
    """`config.generate(nodes, shards, replicas)` with every node's gRPC, Raft and metrics port
    replaced by a distinct free loopback port, none of them in `avoided_ports`, on the node's
    `node_host`."""
    generated = cluster_config.generate(nodes, shards, replicas, host=LOOPBACK_HOST)
    port_count = PORTS_PER_NODE * len(generated.nodes)
    avoided = set(avoided_ports) | config_ports(generated)
    for _ in range(PORT_DRAWS_MAX):
        ports = free_ports(port_count)
        if not avoided.intersection(ports):
            break
    else:
        raise LocalClusterError(f"no free port set outside {sorted(avoided)} in {PORT_DRAWS_MAX} draws")
    next_port = iter(ports).__next__
    config = dataclasses.replace(
        generated,
        nodes=tuple(
            dataclasses.replace(
                node,
                grpc_address=f"{node_host(index, distinct_hosts)}:{next_port()}",
                raft_address=f"{node_host(index, distinct_hosts)}:{next_port()}",
                metrics_address=f"{node_host(index, distinct_hosts)}:{next_port()}",
            )
            for index, node in enumerate(generated.nodes)
        ),
    )
    cluster_config.validate(config)
    if len(config_ports(config)) != port_count or avoided.intersection(config_ports(config)):
        raise LocalClusterError(f"port replacement failed: {config}")
    return config


def node_command(
    node_id: str, config_path: Path, data_dir: Path, log_compaction_min_entries: int | None
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "ledger_cluster.cli.node",
        "--node-id",
        node_id,
        "--config",
        str(config_path),
        "--data-dir",
        str(data_dir),
    ]
    if log_compaction_min_entries is not None:
        command += ["--log-compaction-min-entries", str(log_compaction_min_entries)]
    return command


def gateway_command(port: int, metrics_port: int, config_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ledger_cluster.cli.gateway",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--config",
        str(config_path),
    ]


def stop_processes(
    processes: Iterable[ManagedProcess], timeout_seconds: float = STOP_TIMEOUT_SECONDS
) -> None:
    """SIGTERM every running process by PID at once (so their shutdowns overlap), then wait for
    each; kill -9 whatever has not ended by the deadline."""
    running = [process for process in processes if process.is_running()]
    for process in running:
        os.kill(process.pid, signal.SIGTERM)
        # A paused (SIGSTOPped) process only acts on the SIGTERM once it runs again.
        os.kill(process.pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout_seconds
    for process in running:
        try:
            process.popen.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class ClusterNode:
    node_id: str
    address: str
    data_dir: Path
    log_path: Path
    process: ManagedProcess | None = None
    # Set while the caller has stopped, killed or paused the node on purpose.
    down_on_purpose: bool = False

    def is_running(self) -> bool:
        return self.process is not None and self.process.is_running()


@dataclass(frozen=True)
class ShardLeadership:
    """One poll of who leads each shard, as the running nodes see it."""

    leaders: dict[str, str]  # shard id -> node id, for the shards with a settled leader
    problems: list[str]  # why the other shards are not settled

    @property
    def settled(self) -> bool:
        return not self.problems


@dataclass
class Cluster:
    """The processes of one local cluster and clients to reach them. Build with `new_cluster`."""

    base_dir: Path
    config: ClusterConfig
    config_path: Path
    log_compaction_min_entries: int | None
    raft_password: str
    nodes: dict[str, ClusterNode]
    gateway_port: int
    gateway_metrics_port: int
    gateway_log_path: Path
    gateway: ManagedProcess | None = None
    # Arguments every node starts with besides its own (`--durability process-crash`, say).
    node_arguments: tuple[str, ...] = ()
    # Every NodeService call of this cluster carries it: its own, so no other cluster's
    # process (nor a developer's .env) can call this one's nodes.
    cluster_token: str = field(default_factory=lambda: secrets.token_hex(CLUSTER_TOKEN_BYTES), repr=False)
    # Mutual TLS between the cluster's processes (and this object's node channels), if set.
    internal_tls: DevelopmentCertificates | None = None
    _channels: dict[str, grpc.Channel] = field(default_factory=dict, repr=False)

    # -- addresses and clients --

    @property
    def gateway_address(self) -> str:
        return f"{LOOPBACK_HOST}:{self.gateway_port}"

    @property
    def internal_credentials(self) -> ClientCredentials:
        return InternalCredentials.from_environment(environment=self.environment()).client()

    def environment(self) -> dict[str, str]:
        """What this cluster's processes and the dev CLI aimed at it need in their environment."""
        environment = {
            RAFT_PASSWORD_ENVIRONMENT_VARIABLE: self.raft_password,
            CLUSTER_TOKEN_ENVIRONMENT_VARIABLE: self.cluster_token,
        }
        if self.internal_tls is not None:
            environment[INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE] = str(self.internal_tls.ca_path)
            environment[INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE] = str(
                self.internal_tls.certificate_path
            )
            environment[INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE] = str(self.internal_tls.key_path)
        return environment

    def _channel(self, address: str) -> grpc.Channel:
        channel = self._channels.get(address)
        if channel is None:
            # The gateway's port is open (no client tokens here); the nodes' take the token.
            credentials = (
                ClientCredentials(None, None)
                if address == self.gateway_address
                else self.internal_credentials
            )
            channel = credentials.channel(
                address,
                options=[
                    ("grpc.use_local_subchannel_pool", 1),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500),
                ],
            )
            self._channels[address] = channel
        return channel

    def ledger_stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return ledger_pb2_grpc.LedgerServiceStub(self._channel(self.gateway_address))

    def node_stub(self, node_id: str) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self._channel(self.nodes[node_id].address))

    def close_channels(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    # -- failures --

    def processes(self) -> list[ManagedProcess]:
        processes = [node.process for node in self.nodes.values() if node.process is not None]
        return processes + ([self.gateway] if self.gateway is not None else [])

    def logs(self, lines: int = CLUSTER_LOG_TAIL_LINES) -> str:
        parts = []
        for node in self.nodes.values():
            state = node.process.describe() if node.process is not None else "never started"
            parts.append(f"--- {node.node_id}: {state}; last lines of {node.log_path} ---")
            parts.append(log_tail(node.log_path, lines))
        gateway_state = self.gateway.describe() if self.gateway is not None else "never started"
        parts.append(f"--- gateway: {gateway_state}; last lines of {self.gateway_log_path} ---")
        parts.append(log_tail(self.gateway_log_path, lines))
        return "\n".join(parts)

    def fail(self, message: str) -> NoReturn:
        raise LocalClusterError(f"{message}\n{self.logs()}")

    def check_processes(self) -> None:
        """Fail at once if a process that the caller did not stop has ended."""
        for node in self.nodes.values():
            if node.process is not None and not node.down_on_purpose and not node.is_running():
                self.fail(f"{node.process.describe()} ended unexpectedly")
        if self.gateway is not None and not self.gateway.is_running():
            self.fail(f"{self.gateway.describe()} ended unexpectedly")

    # -- processes --

    def start_node(self, node_id: str) -> ManagedProcess:
        """Start a node (without waiting for it); its log keeps growing across restarts."""
        node = self.nodes[node_id]
        if node.is_running():
            raise LocalClusterError(f"{node_id} is already running")
        env = {**clean_environment(), **self.environment()}
        command = node_command(node_id, self.config_path, node.data_dir, self.log_compaction_min_entries)
        command += self.node_arguments
        node.process = start_process(f"ledger-node {node_id}", command, node.log_path, env=env)
        node.down_on_purpose = False
        return node.process

    def wait_node_serving(self, node_id: str, timeout_seconds: float = NODE_READY_TIMEOUT_SECONDS) -> None:
        node = self.nodes[node_id]
        assert node.process is not None, f"{node_id} was never started"
        try:
            wait_until_serving(
                node.process, node.address, NODE_SERVICE_NAME, timeout_seconds, self.internal_credentials
            )
        except LocalClusterError as error:
            self.fail(str(error))

    def restart_node(self, node_id: str) -> None:
        self.start_node(node_id)
        self.wait_node_serving(node_id)

    def stop_node(self, node_id: str) -> int:
        """SIGTERM by PID; returns the exit code (0 after a clean shutdown)."""
        node = self.nodes[node_id]
        assert node.process is not None, f"{node_id} was never started"
        node.down_on_purpose = True
        return node.process.stop()

    def kill_node(self, node_id: str) -> int:
        """kill -9 by PID; returns the exit code (-SIGKILL)."""
        node = self.nodes[node_id]
        assert node.process is not None, f"{node_id} was never started"
        node.down_on_purpose = True
        return node.process.kill()

    def pause_node(self, node_id: str) -> None:
        """SIGSTOP by PID: the process keeps its sockets but answers nothing, like a long GC
        pause or a stalled VM."""
        node = self.nodes[node_id]
        assert node.process is not None, f"{node_id} was never started"
        node.down_on_purpose = True
        os.kill(node.process.pid, signal.SIGSTOP)

    def resume_node(self, node_id: str) -> None:
        """SIGCONT by PID after `pause_node`."""
        node = self.nodes[node_id]
        assert node.process is not None, f"{node_id} was never started"
        os.kill(node.process.pid, signal.SIGCONT)
        node.down_on_purpose = False

    def wipe_node_data(self, node_id: str) -> None:
        """Delete a stopped node's whole data directory (its LMDB state, Raft journals and
        dumps), as if its disk were replaced."""
        node = self.nodes[node_id]
        if node.is_running():
            raise LocalClusterError(f"{node_id} is running; stop it before wiping its data")
        if node.data_dir.exists():
            shutil.rmtree(node.data_dir)

    def transfer_leadership(
        self,
        shard_id: str,
        from_node_id: str,
        to_node_id: str = "",
        timeout_seconds: float = NODE_RPC_TIMEOUT_SECONDS,
    ) -> node_pb2.TransferLeadershipResponse:
        """NodeService.TransferLeadership on `from_node_id` (raises grpc.RpcError)."""
        request = node_pb2.TransferLeadershipRequest(shard_id=shard_id, target_node_id=to_node_id)
        return self.node_stub(from_node_id).TransferLeadership(request, timeout=timeout_seconds)

    def running_node_ids(self) -> list[str]:
        return [node_id for node_id, node in self.nodes.items() if node.is_running()]

    def start_gateway(self) -> ManagedProcess:
        if self.gateway is not None and self.gateway.is_running():
            raise LocalClusterError("the gateway is already running")
        command = gateway_command(self.gateway_port, self.gateway_metrics_port, self.config_path)
        env = self.gateway_environment()
        self.gateway = start_process("ledger-gateway", command, self.gateway_log_path, env=env)
        return self.gateway

    def gateway_environment(self) -> dict[str, str]:
        """What a gateway of this cluster runs with: its secrets, but not the Raft password."""
        env = {**clean_environment(), **self.environment()}
        del env[RAFT_PASSWORD_ENVIRONMENT_VARIABLE]  # the gateway speaks no Raft
        return env

    def stop_all(self) -> None:
        """The gateway first (so it stops calling the nodes), then every node at once."""
        for node in self.nodes.values():
            node.down_on_purpose = True
        try:
            if self.gateway is not None:
                stop_processes([self.gateway])
        finally:
            stop_processes([node.process for node in self.nodes.values() if node.process is not None])

    # -- what the nodes say --

    def status(
        self, node_id: str, timeout_seconds: float = NODE_RPC_TIMEOUT_SECONDS
    ) -> node_pb2.StatusResponse:
        return self.node_stub(node_id).Status(node_pb2.StatusRequest(), timeout=timeout_seconds)

    def statuses(self) -> dict[str, node_pb2.StatusResponse | str]:
        """Status of every running node, or why it did not answer."""
        answers: dict[str, node_pb2.StatusResponse | str] = {}
        for node_id in self.running_node_ids():
            try:
                answers[node_id] = self.status(node_id)
            except grpc.RpcError as error:
                answers[node_id] = cast(grpc.Call, error).code().name
        return answers

    def leadership(self) -> ShardLeadership:
        """Which node leads each shard, counting only a leader that every running replica of the
        shard follows at the leader's term, with a quorum."""
        answers = self.statuses()
        problems = [
            f"{node_id} did not answer Status: {answer}"
            for node_id, answer in answers.items()
            if isinstance(answer, str)
        ]
        replicas: dict[str, list[node_pb2.ReplicaStatus]] = {}
        for answer in answers.values():
            if not isinstance(answer, str):
                for replica in answer.replicas:
                    replicas.setdefault(replica.shard_id, []).append(replica)
        leaders: dict[str, str] = {}
        for shard in self.config.shards:
            views = replicas.get(shard.shard_id, [])
            claimed = [view for view in views if view.is_leader]
            if len(claimed) != 1:
                problems.append(f"{shard.shard_id}: {len(claimed)} replicas claim to lead")
                continue
            leader = claimed[0]
            lagging = [
                view.node_id
                for view in views
                if view.leader_node_id != leader.node_id or view.term != leader.term or not view.has_quorum
            ]
            if lagging:
                problems.append(f"{shard.shard_id}: {', '.join(lagging)} not yet following {leader.node_id}")
                continue
            leaders[shard.shard_id] = leader.node_id
        return ShardLeadership(leaders=leaders, problems=problems)

    def wait_leaders(self, timeout_seconds: float = CLUSTER_READY_TIMEOUT_SECONDS) -> dict[str, str]:
        """Poll until every shard has a settled leader; returns shard id -> leader node id."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            self.check_processes()
            leadership = self.leadership()
            if leadership.settled:
                return leadership.leaders
            if time.monotonic() > deadline:
                self.fail(f"shards without a settled leader after {timeout_seconds} s: {leadership.problems}")
            time.sleep(POLL_INTERVAL_SECONDS)

    def leader_of(self, shard_id: str, timeout_seconds: float = CLUSTER_READY_TIMEOUT_SECONDS) -> str:
        return self.wait_leaders(timeout_seconds)[shard_id]

    def update_at_leader(
        self, shard_id: str, command: bytes, timeout_seconds: float = CLUSTER_READY_TIMEOUT_SECONDS
    ) -> core_pb2.CommandResult:
        """One NodeService.Update to the shard's leader. Leadership can move between finding the
        leader and the call (a loaded machine misses a heartbeat); an answer that promises the
        command never reached the log is sent again to whoever leads then, any other error is
        raised."""
        deadline = time.monotonic() + timeout_seconds
        request = node_pb2.UpdateRequest(shard_id=shard_id, command=command)
        while True:
            leader = self.leader_of(shard_id, max(deadline - time.monotonic(), 0.0))
            remaining_seconds = max(deadline - time.monotonic(), NODE_RPC_TIMEOUT_SECONDS)
            try:
                return self.node_stub(leader).Update(request, timeout=remaining_seconds).result
            except grpc.RpcError as error:
                reason = error_details(error).reason
                if not is_not_taken(reason) or time.monotonic() > deadline:
                    raise
            time.sleep(POLL_INTERVAL_SECONDS)

    def gateway_health(self) -> str:
        try:
            return health_status(self.gateway_address, LEDGER_SERVICE_NAME)
        except grpc.RpcError as error:
            return cast(grpc.Call, error).code().name

    def wait_gateway_health(
        self, wanted: str = "SERVING", timeout_seconds: float = CLUSTER_READY_TIMEOUT_SECONDS
    ) -> float:
        """Poll the gateway's grpc.health until it says `wanted`; returns the seconds it took."""
        assert self.gateway is not None, "the gateway was never started"
        started = time.monotonic()
        deadline = started + timeout_seconds
        last_seen = "no answer yet"
        while True:
            self.check_processes()
            last_seen = self.gateway_health()
            if last_seen == wanted:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                self.fail(f"gateway health not {wanted} after {timeout_seconds} s (last: {last_seen})")
            time.sleep(POLL_INTERVAL_SECONDS)

    def wait_healthy(self, timeout_seconds: float = CLUSTER_READY_TIMEOUT_SECONDS) -> dict[str, str]:
        """Every node running and SERVING, every shard with a settled leader, the gateway SERVING.
        Returns shard id -> leader node id."""
        deadline = time.monotonic() + timeout_seconds
        for node_id, node in self.nodes.items():
            if not node.is_running():
                self.fail(f"{node_id} is not running")
            self.wait_node_serving(node_id, max(deadline - time.monotonic(), 0.1))
        leaders = self.wait_leaders(max(deadline - time.monotonic(), 0.1))
        self.wait_gateway_health("SERVING", max(deadline - time.monotonic(), 0.1))
        return leaders

    def digest(self, node_id: str, shard_id: str) -> node_pb2.DigestResponse:
        return self.node_stub(node_id).Digest(
            node_pb2.DigestRequest(shard_id=shard_id), timeout=NODE_RPC_TIMEOUT_SECONDS
        )

    def wait_converged(
        self,
        shard_ids: Sequence[str] | None = None,
        timeout_seconds: float = CONVERGE_TIMEOUT_SECONDS,
        excluded_node_ids: Iterable[str] = (),
    ) -> dict[str, node_pb2.DigestResponse]:
        """Poll NodeService.Digest on every replica of each shard (but those on the excluded
        nodes) until they all report the same applied index and the same digest; returns shard
        id -> that answer."""
        wanted = [shard.shard_id for shard in self.config.shards] if shard_ids is None else list(shard_ids)
        excluded = set(excluded_node_ids)
        replicas = {
            shard.shard_id: [replica.node_id for replica in shard.replicas if replica.node_id not in excluded]
            for shard in self.config.shards
        }
        converged: dict[str, node_pb2.DigestResponse] = {}
        last_seen: dict[str, dict[str, str]] = {}
        deadline = time.monotonic() + timeout_seconds
        while True:
            self.check_processes()
            for shard_id in wanted:
                if shard_id in converged:
                    continue
                answers: dict[str, node_pb2.DigestResponse] = {}
                seen: dict[str, str] = {}
                for node_id in replicas[shard_id]:
                    try:
                        answers[node_id] = self.digest(node_id, shard_id)
                        seen[node_id] = f"{answers[node_id].applied_index}/{answers[node_id].digest[:12]}"
                    except grpc.RpcError as error:
                        seen[node_id] = cast(grpc.Call, error).code().name
                last_seen[shard_id] = seen
                distinct = {(answer.applied_index, answer.digest) for answer in answers.values()}
                if len(answers) == len(replicas[shard_id]) and len(distinct) == 1:
                    converged[shard_id] = next(iter(answers.values()))
            if len(converged) == len(wanted):
                return converged
            if time.monotonic() > deadline:
                pending = {
                    shard_id: last_seen.get(shard_id) for shard_id in wanted if shard_id not in converged
                }
                self.fail(f"replicas not converged after {timeout_seconds} s (applied/digest): {pending}")
            time.sleep(POLL_INTERVAL_SECONDS)

    # -- the dev CLI --

    def dev_status(self) -> subprocess.CompletedProcess[str]:
        """`ledger-dev status --config <this cluster's config>`."""
        arguments = ["status", "--config", str(self.config_path)]
        arguments += ["--timeout-seconds", str(NODE_RPC_TIMEOUT_SECONDS)]
        return self.dev_cli(arguments)

    def dev_cli(self, arguments: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`ledger-dev ARGUMENTS...` with this cluster's credentials."""
        return run_dev_cli(arguments, DEV_CLI_TIMEOUT_SECONDS, cwd=cwd, environment=self.environment())


def new_cluster(
    base_dir: Path,
    raft_password: str,
    *,
    nodes: int = 3,
    shards: int = 4,
    replicas: int = 3,
    log_compaction_min_entries: int | None = None,
    avoided_ports: frozenset[int] = frozenset(),
    distinct_hosts: bool = False,
    node_arguments: Sequence[str] = (),
) -> Cluster:
    """A cluster's config and directories; nothing is started yet."""
    base_dir.mkdir(parents=True, exist_ok=True)
    config = loopback_config(nodes, shards, replicas, avoided_ports, distinct_hosts)
    config_path = base_dir / "cluster_config.json"
    cluster_config.write_atomic(config, config_path)
    gateway_port, gateway_metrics_port = free_ports(2)
    return Cluster(
        base_dir=base_dir,
        config=config,
        config_path=config_path,
        log_compaction_min_entries=log_compaction_min_entries,
        node_arguments=tuple(node_arguments),
        raft_password=raft_password,
        nodes={
            node.node_id: ClusterNode(
                node_id=node.node_id,
                address=node.grpc_address,
                data_dir=base_dir / "data" / node.node_id,
                log_path=base_dir / "logs" / f"{node.node_id}.log",
            )
            for node in config.nodes
        },
        gateway_port=gateway_port,
        gateway_metrics_port=gateway_metrics_port,
        gateway_log_path=base_dir / "logs" / "gateway.log",
    )


@contextmanager
def started_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """Start every node and the gateway of a cluster built by `new_cluster` (whose data
    directories may already hold state, e.g. restored from a backup), wait until it is healthy,
    and stop every process by PID when the block ends, however it ends."""
    try:
        for node_id in cluster.nodes:
            cluster.start_node(node_id)
        cluster.start_gateway()
        cluster.wait_healthy()
        yield cluster
    finally:
        try:
            cluster.stop_all()
        finally:
            cluster.close_channels()
