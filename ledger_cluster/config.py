"""The cluster config: nodes, shards (contiguous ranges of the 32-bit shard-key space) and the
replicas of each shard. Loaded and validated as a whole; written atomically.

Format 2: each node has one Raft address shared by every shard it replicates (format 1 gave
each replica its own Raft port), each shard names a preferred leader, and the cluster has a
random `cluster_id` that salts the Raft transport's key derivation."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger_cluster.errors import ConfigError
from ledger_cluster.sharding import SHARD_KEY_MAX, shard_key

CONFIG_FORMAT_VERSION = 2
# The format with a Raft port per replica; refused with the command that rewrites it.
CONFIG_FORMAT_VERSION_PER_REPLICA_RAFT_PORTS = 1
DEFAULT_CONFIG_PATH = "cluster_config.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_NODE_GRPC_PORT_BASE = 7000
# node01's Raft transport listens on 7100, node02's on 7101, ...
DEFAULT_RAFT_PORT_BASE = 7100
# node01 serves /metrics on 9101, node02 on 9102, ...; the gateway's default is 9100.
DEFAULT_METRICS_PORT_BASE = 9101
NODES_MAX = 64
SHARDS_MAX = 1024
REPLICAS_MAX = 7
PORT_MAX = 65535
CLUSTER_ID_BYTES = 16

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_CLUSTER_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
# Unknown fields are refused: a leftover format 1 field or a misspelt one would otherwise be
# ignored without a word.
_CONFIG_FIELDS = frozenset({"format_version", "cluster_id", "nodes", "shards"})
_NODE_FIELDS = frozenset({"id", "grpc_address", "raft_address", "metrics_address"})
_SHARD_FIELDS = frozenset({"id", "lower_bound", "upper_bound", "replicas", "preferred_leader"})
_REPLICA_FIELDS = frozenset({"node_id"})


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    grpc_address: str
    # HOST:PORT where this node's Raft transport listens: one port for all the shards it replicates.
    raft_address: str
    # HOST:PORT of the node's GET /metrics; None: the node serves no metrics.
    metrics_address: str | None = None


@dataclass(frozen=True)
class ReplicaConfig:
    node_id: str


@dataclass(frozen=True)
class ShardConfig:
    shard_id: str
    lower_bound: int
    upper_bound: int
    replicas: tuple[ReplicaConfig, ...]
    # The node that should lead this shard when it is healthy; one of `replicas`.
    preferred_leader: str

    def contains(self, key: int) -> bool:
        return self.lower_bound <= key <= self.upper_bound


@dataclass(frozen=True)
class ClusterConfig:
    # 32 lowercase hex characters, random per cluster; the salt of the Raft transport's key derivation.
    cluster_id: str
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
            "cluster_id": self.cluster_id,
            "nodes": [_node_json(node) for node in self.nodes],
            "shards": [_shard_json(shard) for shard in self.shards],
        }


def _node_json(node: NodeConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": node.node_id,
        "grpc_address": node.grpc_address,
        "raft_address": node.raft_address,
    }
    if node.metrics_address is not None:
        fields["metrics_address"] = node.metrics_address
    return fields


def _shard_json(shard: ShardConfig) -> dict[str, Any]:
    return {
        "id": shard.shard_id,
        "lower_bound": shard.lower_bound,
        "upper_bound": shard.upper_bound,
        "replicas": [{"node_id": replica.node_id} for replica in shard.replicas],
        "preferred_leader": shard.preferred_leader,
    }


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


def _reject_unknown_fields(obj: dict[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    _require(not unknown, f"{where} has unknown fields {unknown}; known: {sorted(known)}")


def _parse_node(obj: Any, index: int) -> NodeConfig:
    where = f"nodes[{index}]"
    node = NodeConfig(
        node_id=json_field(obj, "id", str, where),
        grpc_address=json_field(obj, "grpc_address", str, where),
        raft_address=json_field(obj, "raft_address", str, where),
        metrics_address=json_field(obj, "metrics_address", str, where) if "metrics_address" in obj else None,
    )
    _reject_unknown_fields(obj, _NODE_FIELDS, where)
    return node


def _parse_replica(obj: Any, where: str) -> ReplicaConfig:
    replica = ReplicaConfig(node_id=json_field(obj, "node_id", str, where))
    _reject_unknown_fields(obj, _REPLICA_FIELDS, where)
    return replica


def _parse_shard(obj: Any, index: int) -> ShardConfig:
    where = f"shards[{index}]"
    replicas_raw = json_field(obj, "replicas", list, where)
    shard = ShardConfig(
        shard_id=json_field(obj, "id", str, where),
        lower_bound=json_field(obj, "lower_bound", int, where),
        upper_bound=json_field(obj, "upper_bound", int, where),
        replicas=tuple(_parse_replica(r, f"{where}.replicas[{i}]") for i, r in enumerate(replicas_raw)),
        preferred_leader=json_field(obj, "preferred_leader", str, where),
    )
    _reject_unknown_fields(obj, _SHARD_FIELDS, where)
    return shard


def validate(config: ClusterConfig) -> None:
    """Raise ConfigError unless the config can run a cluster."""
    _require(
        _CLUSTER_ID_PATTERN.fullmatch(config.cluster_id) is not None,
        f"cluster_id must be 32 lowercase hex characters, got {config.cluster_id!r}",
    )
    _require(1 <= len(config.nodes) <= NODES_MAX, f"need 1..{NODES_MAX} nodes, got {len(config.nodes)}")
    _require(1 <= len(config.shards) <= SHARDS_MAX, f"need 1..{SHARDS_MAX} shards, got {len(config.shards)}")
    for index, node in enumerate(config.nodes):
        _validate_node(node, f"nodes[{index}]")
    node_ids = [n.node_id for n in config.nodes]
    _require(len(set(node_ids)) == len(node_ids), "node ids must be unique")
    _validate_endpoints(config.nodes)
    shard_ids = [s.shard_id for s in config.shards]
    _require(len(set(shard_ids)) == len(shard_ids), "shard ids must be unique")
    _validate_coverage(config.shards)
    for index, shard in enumerate(config.shards):
        _validate_shard_replicas(shard, f"shards[{index}] ({shard.shard_id})", set(node_ids))


def _validate_node(node: NodeConfig, where: str) -> None:
    _require(_NAME_PATTERN.fullmatch(node.node_id) is not None, f"{where}: bad node id {node.node_id!r}")
    _validate_address(node.grpc_address, f"{where}.grpc_address")
    _validate_address(node.raft_address, f"{where}.raft_address")
    if node.metrics_address is not None:
        _validate_address(node.metrics_address, f"{where}.metrics_address")


def _validate_address(address: str, where: str) -> None:
    host, separator, port = address.rpartition(":")
    _require(bool(separator) and bool(host), f"{where}: address {address!r} must be HOST:PORT")
    _require(port.isdigit() and 1 <= int(port) <= PORT_MAX, f"{where}: bad port in {address!r}")


def _node_endpoints(node: NodeConfig) -> list[tuple[str, str]]:
    """(field name, HOST:PORT) of every socket the node listens on."""
    endpoints = [("grpc_address", node.grpc_address), ("raft_address", node.raft_address)]
    if node.metrics_address is not None:
        endpoints.append(("metrics_address", node.metrics_address))
    return endpoints


def _validate_endpoints(nodes: tuple[NodeConfig, ...]) -> None:
    # Two listeners on one HOST:PORT cannot both bind: the second process would fail at start.
    # The port is compared as a number, so "7000" and "07000" are the same endpoint.
    owners: dict[tuple[str, int], str] = {}
    for node in nodes:
        for field_name, address in _node_endpoints(node):
            host, _, port = address.rpartition(":")
            endpoint = (host, int(port))
            owner = f"{node.node_id}'s {field_name}"
            if endpoint in owners:
                raise ConfigError(f"{address} is both {owners[endpoint]} and {owner}")
            owners[endpoint] = owner


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


def _validate_shard_replicas(shard: ShardConfig, where: str, node_ids: set[str]) -> None:
    _require(_NAME_PATTERN.fullmatch(shard.shard_id) is not None, f"{where}: bad shard id {shard.shard_id!r}")
    _require(
        1 <= len(shard.replicas) <= REPLICAS_MAX,
        f"{where}: needs 1..{REPLICAS_MAX} replicas, got {len(shard.replicas)}",
    )
    replica_nodes = [r.node_id for r in shard.replicas]
    _require(len(set(replica_nodes)) == len(replica_nodes), f"{where}: replicas must be on distinct nodes")
    for node_id in replica_nodes:
        _require(node_id in node_ids, f"{where}: replica on unknown node {node_id!r}")
    _require(
        shard.preferred_leader in replica_nodes,
        f"{where}: preferred_leader {shard.preferred_leader!r} is not one of its replicas {replica_nodes}",
    )


def _format_1_refusal(obj: dict[str, Any]) -> str:
    return (
        f"format_version {CONFIG_FORMAT_VERSION_PER_REPLICA_RAFT_PORTS} is no longer supported (format "
        f"{CONFIG_FORMAT_VERSION} gives each node one raft_address for all its shards instead of a "
        "raft_port per replica, and adds cluster_id and preferred_leader): regenerate the file with "
        f"`ledger-dev seed-cluster-config{_format_1_layout_options(obj)} --out <file>`; "
        "data directories are unaffected"
    )


def _format_1_layout_options(obj: dict[str, Any]) -> str:
    """The seed-cluster-config options that rebuild a format 1 file's layout (same node ids,
    shard ranges and replica placement, which is all a data directory depends on); "" when the
    file is too damaged to tell."""
    try:
        nodes, shards = obj["nodes"], obj["shards"]
        replica_count = len(shards[0]["replicas"])
        host = nodes[0]["grpc_address"].rpartition(":")[0]
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""
    # Quoted: the message is a command to paste, and an IPv6 host's brackets are a shell glob.
    host_option = "" if host == DEFAULT_HOST else f" --host {shlex.quote(host)}"
    return f" --nodes {len(nodes)} --shards {len(shards)} --replicas {replica_count}{host_option}"


def parse(obj: Any) -> ClusterConfig:
    version = json_field(obj, "format_version", int, "config")
    if version == CONFIG_FORMAT_VERSION_PER_REPLICA_RAFT_PORTS:
        raise ConfigError(_format_1_refusal(obj))
    _require(
        version == CONFIG_FORMAT_VERSION,
        f"unsupported config format_version {version}; this version reads {CONFIG_FORMAT_VERSION}",
    )
    _reject_unknown_fields(obj, _CONFIG_FIELDS, "config")
    config = ClusterConfig(
        cluster_id=json_field(obj, "cluster_id", str, "config"),
        nodes=tuple(_parse_node(n, i) for i, n in enumerate(json_field(obj, "nodes", list, "config"))),
        shards=tuple(_parse_shard(s, i) for i, s in enumerate(json_field(obj, "shards", list, "config"))),
    )
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
    try:
        return parse(obj)
    except ConfigError as error:
        # parse() knows positions in the JSON, not which file: a node started with the wrong
        # --config should say which one.
        raise ConfigError(f"cluster config {str(path)!r}: {error}") from error


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
    cluster_id: str | None = None,
) -> ClusterConfig:
    """Equal key ranges, replicas spread evenly over the nodes (`_place_replicas`), preferred
    leaders spread evenly too (`_choose_preferred_leaders`); node i listens on the three port
    bases + i. `cluster_id` None draws a random one, so two generated clusters never share it."""
    _require(1 <= replica_count <= node_count, "replicas must be between 1 and the node count")
    nodes = tuple(
        NodeConfig(
            node_id=f"node{index + 1:02d}",
            grpc_address=f"{host}:{grpc_port_base + index}",
            raft_address=f"{host}:{raft_port_base + index}",
            metrics_address=f"{host}:{metrics_port_base + index}",
        )
        for index in range(node_count)
    )
    placements = _place_replicas(node_count, shard_count, replica_count)
    preferred_leaders = _choose_preferred_leaders(placements, node_count)
    key_space = SHARD_KEY_MAX + 1
    shards = tuple(
        ShardConfig(
            shard_id=f"shard-{shard_index:02d}",
            lower_bound=shard_index * key_space // shard_count,
            upper_bound=(shard_index + 1) * key_space // shard_count - 1,
            replicas=tuple(ReplicaConfig(node_id=nodes[node_index].node_id) for node_index in placement),
            preferred_leader=nodes[preferred_leaders[shard_index]].node_id,
        )
        for shard_index, placement in enumerate(placements)
    )
    config = ClusterConfig(
        cluster_id=secrets.token_hex(CLUSTER_ID_BYTES) if cluster_id is None else cluster_id,
        nodes=nodes,
        shards=shards,
    )
    validate(config)
    return config


def _place_replicas(node_count: int, shard_count: int, replica_count: int) -> list[list[int]]:
    """Node indexes of each shard's replicas: the least-loaded nodes, ties broken by rotating
    from node i for shard i, so every node holds the same number of replicas (+-1)."""
    replica_load = [0] * node_count
    placements = []
    for shard_index in range(shard_count):
        chosen = sorted(
            range(node_count),
            key=lambda node_index: (replica_load[node_index], (node_index - shard_index) % node_count),
        )[:replica_count]
        for node_index in chosen:
            replica_load[node_index] += 1
        placements.append(chosen)
    return placements


def _choose_preferred_leaders(placements: list[list[int]], node_count: int) -> list[int]:
    """Each shard's preferred leader, one of its replicas, spread so that each node leads
    shard_count/node_count shards (+-1) wherever the placement allows it: leaders do the
    proposing and the fsync-waiting, so an uneven spread makes one node the bottleneck.

    First the replica preferred least often so far, ties broken by the same rotation as the
    placement; that greedy pass can strand a node (5 nodes, 5 shards, 3 replicas leaves node05
    with none), so preferences then move along chains until no chain can even out two nodes."""
    preferred = []
    leader_load = [0] * node_count
    for shard_index, placement in enumerate(placements):
        leader = min(
            placement,
            key=lambda node_index: (leader_load[node_index], (node_index - shard_index) % node_count),
        )
        leader_load[leader] += 1
        preferred.append(leader)
    # Each move lowers the sum of squared loads by at least 2, from at most shard_count**2.
    moves_max = len(placements) ** 2 // 2 + 1
    for _ in range(moves_max):
        chain = _leadership_chain(placements, preferred, node_count)
        if chain is None:
            return preferred
        for shard_index, node_index in chain:
            preferred[shard_index] = node_index
    raise ConfigError("preferred leaders did not settle")  # unreachable: see moves_max


def _leadership_chain(
    placements: list[list[int]], preferred: list[int], node_count: int
) -> list[tuple[int, int]] | None:
    """(shard, new preferred node) moves that give one more shard to a least-loaded node and
    one fewer to a node with at least two more, each shard moving to another of its replicas;
    None when there is none, which means the spread is as even as the placement allows (a
    semi-matching without such a path is optimal: Harvey, Ladner, Lovasz, Tamir 2006)."""
    leader_load = [preferred.count(node_index) for node_index in range(node_count)]
    lightest = min(leader_load)
    for start in (node for node in range(node_count) if leader_load[node] == lightest):
        # Breadth-first from `start`; taken_from[giver] = (shard, taker): `taker` reaches
        # `giver` by taking over one of the shards `giver` is preferred for.
        taken_from: dict[int, tuple[int, int]] = {}
        frontier = [start]
        while frontier:
            next_frontier = []
            for taker in frontier:
                for shard_index, placement in enumerate(placements):
                    giver = preferred[shard_index]
                    if taker not in placement or giver == start or giver in taken_from:
                        continue
                    taken_from[giver] = (shard_index, taker)
                    if leader_load[giver] >= lightest + 2:
                        return _unwind_chain(taken_from, giver, start)
                    next_frontier.append(giver)
            frontier = next_frontier
    return None


def _unwind_chain(taken_from: dict[int, tuple[int, int]], end: int, start: int) -> list[tuple[int, int]]:
    chain = []
    node = end
    while node != start:
        shard_index, taker = taken_from[node]
        chain.append((shard_index, taker))
        node = taker
    return chain
