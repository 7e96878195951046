"""The cluster config: nodes, shards (contiguous ranges of the 32-bit shard-key space) and the
replicas of each shard. Loaded and validated as a whole; written atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger_cluster.errors import ConfigError
from ledger_cluster.sharding import SHARD_KEY_MAX, shard_key

CONFIG_FORMAT_VERSION = 1
DEFAULT_CONFIG_PATH = "cluster_config.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_NODE_GRPC_PORT_BASE = 7000
DEFAULT_RAFT_PORT_BASE = 7100
# node01 serves /metrics on 9101, node02 on 9102, ...; the gateway's default is 9100.
DEFAULT_METRICS_PORT_BASE = 9101
NODES_MAX = 64
SHARDS_MAX = 1024
REPLICAS_MAX = 7
PORT_MAX = 65535

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    grpc_address: str
    raft_host: str
    # HOST:PORT of the node's GET /metrics; None: the node serves no metrics.
    metrics_address: str | None = None


@dataclass(frozen=True)
class ReplicaConfig:
    node_id: str
    raft_port: int


@dataclass(frozen=True)
class ShardConfig:
    shard_id: str
    lower_bound: int
    upper_bound: int
    replicas: tuple[ReplicaConfig, ...]

    def contains(self, key: int) -> bool:
        return self.lower_bound <= key <= self.upper_bound


@dataclass(frozen=True)
class ClusterConfig:
    nodes: tuple[NodeConfig, ...]
    shards: tuple[ShardConfig, ...]

    def node(self, node_id: str) -> NodeConfig:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise ConfigError(f"node {node_id!r} is not in the config")

    def shard_for_key(self, key: int) -> ShardConfig:
        # Shards are sorted and contiguous (validated), so a binary search finds the owner.
        low, high = 0, len(self.shards) - 1
        while low <= high:
            middle = (low + high) // 2
            shard = self.shards[middle]
            if key < shard.lower_bound:
                high = middle - 1
            elif key > shard.upper_bound:
                low = middle + 1
            else:
                return shard
        raise ConfigError(f"no shard covers key {key}")  # unreachable for a validated config

    def shard_for_account(self, account_id: int) -> ShardConfig:
        return self.shard_for_key(shard_key(account_id))

    def to_json_object(self) -> dict[str, Any]:
        return {
            "format_version": CONFIG_FORMAT_VERSION,
            "nodes": [_node_json(node) for node in self.nodes],
            "shards": [
                {
                    "id": s.shard_id,
                    "lower_bound": s.lower_bound,
                    "upper_bound": s.upper_bound,
                    "replicas": [{"node_id": r.node_id, "raft_port": r.raft_port} for r in s.replicas],
                }
                for s in self.shards
            ],
        }


def _node_json(node: NodeConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": node.node_id,
        "grpc_address": node.grpc_address,
        "raft_host": node.raft_host,
    }
    if node.metrics_address is not None:
        fields["metrics_address"] = node.metrics_address
    return fields


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def json_field(obj: Any, name: str, kind: type, where: str, error: type[Exception] = ConfigError) -> Any:
    """`obj[name]`, which must exist and be of `kind`; otherwise `error` says where and why."""
    if not isinstance(obj, dict):
        raise error(f"{where} must be a JSON object")
    if name not in obj:
        raise error(f"{where} is missing {name!r}")
    value = obj[name]
    # bool is an int in Python; a port or bound given as true/false is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise error(f"{where}.{name} must be a {kind.__name__}, got {value!r}")
    return value


def _validate_address(address: str, where: str) -> None:
    host, separator, port = address.rpartition(":")
    _require(bool(separator) and bool(host), f"{where}: address {address!r} must be HOST:PORT")
    _require(port.isdigit() and 1 <= int(port) <= PORT_MAX, f"{where}: bad port in {address!r}")


def _parse_node(obj: Any, index: int) -> NodeConfig:
    where = f"nodes[{index}]"
    node = NodeConfig(
        node_id=json_field(obj, "id", str, where),
        grpc_address=json_field(obj, "grpc_address", str, where),
        raft_host=json_field(obj, "raft_host", str, where),
        metrics_address=json_field(obj, "metrics_address", str, where) if "metrics_address" in obj else None,
    )
    _require(bool(_NAME_PATTERN.match(node.node_id)), f"{where}: bad node id {node.node_id!r}")
    _validate_address(node.grpc_address, where)
    if node.metrics_address is not None:
        _validate_address(node.metrics_address, where)
    return node


def _parse_shard(obj: Any, index: int) -> ShardConfig:
    where = f"shards[{index}]"
    replicas_raw = json_field(obj, "replicas", list, where)
    replicas = tuple(
        ReplicaConfig(
            node_id=json_field(r, "node_id", str, f"{where}.replicas[{i}]"),
            raft_port=json_field(r, "raft_port", int, f"{where}.replicas[{i}]"),
        )
        for i, r in enumerate(replicas_raw)
    )
    shard = ShardConfig(
        shard_id=json_field(obj, "id", str, where),
        lower_bound=json_field(obj, "lower_bound", int, where),
        upper_bound=json_field(obj, "upper_bound", int, where),
        replicas=replicas,
    )
    _require(bool(_NAME_PATTERN.match(shard.shard_id)), f"{where}: bad shard id {shard.shard_id!r}")
    return shard


def validate(config: ClusterConfig) -> None:
    """Raise ConfigError unless the config can run a cluster."""
    _require(1 <= len(config.nodes) <= NODES_MAX, f"need 1..{NODES_MAX} nodes")
    _require(1 <= len(config.shards) <= SHARDS_MAX, f"need 1..{SHARDS_MAX} shards")
    node_ids = [n.node_id for n in config.nodes]
    _require(len(set(node_ids)) == len(node_ids), "node ids must be unique")
    grpc_addresses = [n.grpc_address for n in config.nodes]
    _require(len(set(grpc_addresses)) == len(grpc_addresses), "node gRPC addresses must be unique")
    shard_ids = [s.shard_id for s in config.shards]
    _require(len(set(shard_ids)) == len(shard_ids), "shard ids must be unique")
    _validate_coverage(config.shards)
    _validate_replicas(config)


def _validate_coverage(shards: tuple[ShardConfig, ...]) -> None:
    expected_lower = 0
    for shard in shards:
        _require(
            shard.lower_bound == expected_lower,
            f"shard {shard.shard_id} starts at {shard.lower_bound}, expected {expected_lower}: "
            "shards must be sorted, contiguous and without overlap",
        )
        _require(
            shard.lower_bound <= shard.upper_bound <= SHARD_KEY_MAX,
            f"shard {shard.shard_id} has bad bounds {shard.lower_bound}..{shard.upper_bound}",
        )
        expected_lower = shard.upper_bound + 1
    _require(expected_lower == SHARD_KEY_MAX + 1, "shards must cover the key space up to 2**32-1")


def _validate_replicas(config: ClusterConfig) -> None:
    node_hosts = {n.node_id: n.raft_host for n in config.nodes}
    used_ports: set[tuple[str, int]] = set()
    for node in config.nodes:
        host, _, port = node.grpc_address.rpartition(":")
        used_ports.add((host, int(port)))
    for node in config.nodes:
        if node.metrics_address is not None:
            host, _, port = node.metrics_address.rpartition(":")
            endpoint = (host, int(port))
            _require(endpoint not in used_ports, f"port {host}:{port} used twice")
            used_ports.add(endpoint)
    for shard in config.shards:
        _require(
            1 <= len(shard.replicas) <= REPLICAS_MAX,
            f"shard {shard.shard_id} needs 1..{REPLICAS_MAX} replicas",
        )
        replica_nodes = [r.node_id for r in shard.replicas]
        _require(
            len(set(replica_nodes)) == len(replica_nodes),
            f"shard {shard.shard_id}: replicas must be on distinct nodes",
        )
        for replica in shard.replicas:
            _require(
                replica.node_id in node_hosts,
                f"shard {shard.shard_id}: unknown node {replica.node_id!r}",
            )
            _require(
                1 <= replica.raft_port <= PORT_MAX,
                f"shard {shard.shard_id}: bad raft port {replica.raft_port}",
            )
            endpoint = (node_hosts[replica.node_id], replica.raft_port)
            _require(endpoint not in used_ports, f"port {endpoint[0]}:{endpoint[1]} used twice")
            used_ports.add(endpoint)


def parse(obj: Any) -> ClusterConfig:
    version = json_field(obj, "format_version", int, "config")
    _require(version == CONFIG_FORMAT_VERSION, f"unsupported config format_version {version}")
    nodes = tuple(_parse_node(n, i) for i, n in enumerate(json_field(obj, "nodes", list, "config")))
    shards = tuple(_parse_shard(s, i) for i, s in enumerate(json_field(obj, "shards", list, "config")))
    config = ClusterConfig(nodes=nodes, shards=shards)
    validate(config)
    return config


def load(path: str | os.PathLike[str]) -> ClusterConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read cluster config {str(path)!r}: {error.strerror}") from error
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"cluster config {str(path)!r} is not valid JSON: {error}") from error
    return parse(obj)


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write `obj` as JSON (mode 0600) so that a reader sees the old file or the new one, never
    a torn one, and the new one survives a power loss once this returns."""
    target = Path(path).resolve()
    text = json.dumps(obj, indent=2) + "\n"
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_name, target)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    directory_descriptor = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


def write_atomic(config: ClusterConfig, path: str | os.PathLike[str]) -> None:
    """Validate and write a cluster config atomically."""
    validate(config)
    write_json_atomic(config.to_json_object(), path)


def generate(
    node_count: int,
    shard_count: int,
    replica_count: int,
    *,
    host: str = DEFAULT_HOST,
    grpc_port_base: int = DEFAULT_NODE_GRPC_PORT_BASE,
    raft_port_base: int = DEFAULT_RAFT_PORT_BASE,
    metrics_port_base: int = DEFAULT_METRICS_PORT_BASE,
) -> ClusterConfig:
    """Equal key ranges; each shard's replicas go to the least-loaded nodes, ties broken by
    rotating from node i for shard i, so every node holds the same number of replicas (+-1)
    and the first replica of each shard (the likely first leader) rotates too."""
    _require(1 <= replica_count <= node_count, "replicas must be between 1 and the node count")
    nodes = tuple(
        NodeConfig(
            node_id=f"node{index + 1:02d}",
            grpc_address=f"{host}:{grpc_port_base + index}",
            raft_host=host,
            metrics_address=f"{host}:{metrics_port_base + index}",
        )
        for index in range(node_count)
    )
    key_space = SHARD_KEY_MAX + 1
    replica_load = [0] * node_count
    shards = []
    for shard_index in range(shard_count):
        chosen = sorted(
            range(node_count),
            key=lambda node_index: (replica_load[node_index], (node_index - shard_index) % node_count),
        )[:replica_count]
        replicas = []
        for node_index in chosen:
            replica_load[node_index] += 1
            replicas.append(
                ReplicaConfig(
                    node_id=nodes[node_index].node_id,
                    raft_port=raft_port_base + node_index * shard_count + shard_index,
                )
            )
        shards.append(
            ShardConfig(
                shard_id=f"shard-{shard_index:02d}",
                lower_bound=shard_index * key_space // shard_count,
                upper_bound=(shard_index + 1) * key_space // shard_count - 1,
                replicas=tuple(replicas),
            )
        )
    config = ClusterConfig(nodes=nodes, shards=tuple(shards))
    validate(config)
    return config
