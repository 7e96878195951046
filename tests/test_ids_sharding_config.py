"""ids, the pinned shard-key function, and cluster config validation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger_cluster import config as cluster_config
from ledger_cluster.errors import ConfigError, InvalidIdError
from ledger_cluster.ids import (
    format_account_id,
    format_transaction_id,
    parse_account_id,
    parse_transaction_id,
)
from ledger_cluster.localcluster.cluster import config_ports, loopback_config
from ledger_cluster.sharding import SHARD_KEY_MAX, shard_key

REPO_ROOT = Path(__file__).resolve().parent.parent

# Golden values: if shard_key ever changes, every stored account lands in another shard.
SHARD_KEY_GOLDEN = [
    (0x0000000000000000, 2941612277),
    (0x0000000000000001, 3441844757),
    (0x0000000000000002, 3439633525),
    (0x00000000000000FF, 3095798280),
    (0x0000000000000100, 820011064),
    (0x0000000100000000, 3418114165),
    (0x8000000000000000, 2981150437),
    (0xFFFFFFFFFFFFFFFF, 312716868),
    (0x0123456789ABCDEF, 1438990173),
    (0xFEDCBA9876543210, 419002395),
    (0xDEADBEEFCAFEBABE, 1066018922),
    (0x000000000000002A, 2797278012),
]


@pytest.mark.parametrize(("account_id", "expected"), SHARD_KEY_GOLDEN)
def test_shard_key_is_pinned(account_id: int, expected: int) -> None:
    assert shard_key(account_id) == expected


def test_account_id_round_trip() -> None:
    assert format_account_id(0xDEADBEEF) == "00000000deadbeef"
    assert parse_account_id("00000000deadbeef") == 0xDEADBEEF
    assert parse_account_id(format_account_id(2**64 - 1)) == 2**64 - 1


def test_transaction_id_carries_its_account() -> None:
    text = format_transaction_id(0x0123456789ABCDEF, 7)
    assert text == "0123456789abcdef0000000000000007"
    parsed = parse_transaction_id(text)
    assert (parsed.account_id, parsed.transaction_number) == (0x0123456789ABCDEF, 7)


@pytest.mark.parametrize(
    "text",
    ["", "123", "00000000DEADBEEF", "00000000deadbeeg", "0" * 17, " 00000000deadbee", "+000000000000001"],
)
def test_malformed_account_ids_are_rejected(text: str) -> None:
    with pytest.raises(InvalidIdError, match="account id must be 16 lowercase hex characters"):
        parse_account_id(text)


@pytest.mark.parametrize("text", ["", "0" * 31, "0" * 33, "A" * 32, "z" * 32])
def test_malformed_transaction_ids_are_rejected(text: str) -> None:
    with pytest.raises(InvalidIdError, match="transaction id must be 32 lowercase hex characters"):
        parse_transaction_id(text)


def test_checked_in_config_has_3_nodes_16_shards_3_replicas() -> None:
    config = cluster_config.load(REPO_ROOT / "cluster_config.json")
    assert len(config.nodes) == 3
    assert len(config.shards) == 16
    assert all(len(shard.replicas) == 3 for shard in config.shards)
    assert [node.raft_address for node in config.nodes] == [
        "127.0.0.1:7100",
        "127.0.0.1:7101",
        "127.0.0.1:7102",
    ]
    assert config == cluster_config.generate(3, 16, 3, cluster_id=config.cluster_id)


def test_generate_draws_a_new_cluster_id_unless_given_one() -> None:
    first, second = cluster_config.generate(1, 1, 1), cluster_config.generate(1, 1, 1)
    assert first.cluster_id != second.cluster_id
    assert cluster_config.generate(1, 1, 1, cluster_id="0" * 32).cluster_id == "0" * 32


def test_generate_gives_each_node_one_raft_port() -> None:
    config = cluster_config.generate(3, 16, 3, host="10.0.0.5", raft_port_base=8200)
    assert [node.raft_address for node in config.nodes] == ["10.0.0.5:8200", "10.0.0.5:8201", "10.0.0.5:8202"]


@pytest.mark.parametrize(("nodes", "shards", "replicas"), [(1, 1, 1), (3, 4, 3), (5, 32, 3), (7, 7, 5)])
def test_generated_configs_cover_the_key_space_and_spread_replicas(
    nodes: int, shards: int, replicas: int
) -> None:
    config = cluster_config.generate(nodes, shards, replicas)
    assert config.shards[0].lower_bound == 0
    assert config.shards[-1].upper_bound == SHARD_KEY_MAX
    for key in _keys_around_every_bound(config):
        assert config.shard_for_key(key) == config.shards[_equal_split_index(key, shards)], key
    load = [sum(r.node_id == n.node_id for s in config.shards for r in s.replicas) for n in config.nodes]
    assert max(load) - min(load) <= 1


def _equal_split_index(key: int, shard_count: int) -> int:
    """Which of `shard_count` equal ranges of the key space holds `key`, by arithmetic rather
    than from the config's bounds: the last range i whose start i * 2**32 // n is <= key."""
    return ((key + 1) * shard_count - 1) // (SHARD_KEY_MAX + 1)


def _keys_around_every_bound(config: cluster_config.ClusterConfig) -> set[int]:
    # An off-by-one in the search shows at a bound or next to it.
    bounds = {bound for shard in config.shards for bound in (shard.lower_bound, shard.upper_bound)}
    near = {key + step for key in bounds for step in (-1, 0, 1)}
    return {key for key in near | {SHARD_KEY_MAX // 3} if 0 <= key <= SHARD_KEY_MAX}


# generate(4, 4, 3) splits the key space in quarters.
SHARD_FOR_KEY_GOLDEN = [
    (0, "shard-00"),
    (2**30 - 1, "shard-00"),
    (2**30, "shard-01"),
    (2**31 - 1, "shard-01"),
    (2**31, "shard-02"),
    (3 * 2**30 - 1, "shard-02"),
    (3 * 2**30, "shard-03"),
    (SHARD_KEY_MAX, "shard-03"),
]


@pytest.mark.parametrize(("key", "shard_id"), SHARD_FOR_KEY_GOLDEN)
def test_shard_for_key_maps_bounds_to_their_shards(key: int, shard_id: str) -> None:
    assert cluster_config.generate(4, 4, 3).shard_for_key(key).shard_id == shard_id


def test_loopback_config_gives_each_node_its_own_three_free_ports() -> None:
    checked_in_ports = config_ports(cluster_config.load(REPO_ROOT / "cluster_config.json"))
    generated = cluster_config.generate(3, 4, 3)
    config = loopback_config(3, 4, 3, frozenset(checked_in_ports))
    # gRPC, Raft and metrics per node, and nothing else: the replicas have no ports of their own.
    assert len(config_ports(config)) == 9
    assert not config_ports(config) & checked_in_ports
    assert all(node.raft_address.startswith("127.0.0.1:") for node in config.nodes)
    assert config.shards == generated.shards


def _preferred_counts(config: cluster_config.ClusterConfig) -> list[int]:
    return [sum(s.preferred_leader == n.node_id for s in config.shards) for n in config.nodes]


def test_generate_spreads_preferred_leaders_evenly_over_16_shards_and_3_nodes() -> None:
    config = cluster_config.generate(3, 16, 3)
    assert _preferred_counts(config) == [6, 5, 5]
    # Rotating, so that neighbouring key ranges (often written together) have different leaders.
    assert [s.preferred_leader for s in config.shards[:4]] == ["node01", "node02", "node03", "node01"]


# (5, 5, 3): choosing each shard's least-preferred replica in turn leaves node05 with none.
@pytest.mark.parametrize(
    ("nodes", "shards", "replicas"),
    [
        (nodes, shards, replicas)
        for nodes in range(1, 8)
        for replicas in (1, 3, 5)
        if replicas <= nodes
        for shards in (1, 2, 5, 6, 16, 31)
    ],
)
def test_generate_gives_each_node_an_even_share_of_preferred_leaders(
    nodes: int, shards: int, replicas: int
) -> None:
    config = cluster_config.generate(nodes, shards, replicas)
    for shard in config.shards:
        assert shard.preferred_leader in {replica.node_id for replica in shard.replicas}, shard
    counts = _preferred_counts(config)
    assert sum(counts) == shards
    assert set(counts) <= {shards // nodes, -(-shards // nodes)}, counts


def test_write_atomic_then_load_round_trips(tmp_path: Path) -> None:
    config = cluster_config.generate(3, 8, 3)
    path = tmp_path / "cluster.json"
    cluster_config.write_atomic(config, path)
    assert cluster_config.load(path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.json"]


# Marks a field that a change removes.
DELETED = object()
JsonPath = tuple[str | int, ...]


@dataclass(frozen=True)
class CopyOf:
    """A change's new value: the value at `path` in the same config."""

    path: JsonPath


def _at(obj: Any, path: JsonPath) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _change(obj: dict[str, Any], path: JsonPath, value: object) -> None:
    container = _at(obj, path[:-1])
    if value is DELETED:
        del container[path[-1]]
    else:
        container[path[-1]] = _at(obj, value.path) if isinstance(value, CopyOf) else value


# (what, where, new value, the error it must cause) on generate(4, 4, 3): four nodes, so that a
# shard (three replicas) has a node it is not on; shard 1 starts at 2**30.
INVALID_CONFIG_CHANGES: list[tuple[str, JsonPath, object, str]] = [
    ("gap", ("shards", 1, "lower_bound"), 2**30 + 1, f"shard-01 starts at {2**30 + 1}, expected {2**30}"),
    ("overlap", ("shards", 1, "lower_bound"), 2**30 - 1, f"shard-01 starts at {2**30 - 1}, expected {2**30}"),
    ("short", ("shards", 3, "upper_bound"), SHARD_KEY_MAX - 1, "cover the key space"),
    ("same-node-twice", ("shards", 0, "replicas", 1, "node_id"), "node01", "distinct nodes"),
    ("unknown-node", ("shards", 0, "replicas", 0, "node_id"), "node99", "unknown node 'node99'"),
    (
        "raft-address-of-another-node",
        ("nodes", 1, "raft_address"),
        CopyOf(("nodes", 0, "raft_address")),
        "127.0.0.1:7100 is both node01's raft_address and node02's raft_address",
    ),
    (
        # The same port written another way is the same endpoint.
        "raft-address-equals-grpc-address",
        ("nodes", 2, "raft_address"),
        "127.0.0.1:07000",
        "127.0.0.1:07000 is both node01's grpc_address and node03's raft_address",
    ),
    (
        "raft-address-equals-metrics-address",
        ("nodes", 0, "raft_address"),
        CopyOf(("nodes", 0, "metrics_address")),
        "127.0.0.1:9101 is both node01's raft_address and node01's metrics_address",
    ),
    (
        "raft-address-without-port",
        ("nodes", 0, "raft_address"),
        "127.0.0.1",
        r"nodes\[0\]\.raft_address: address '127.0.0.1' must be HOST:PORT",
    ),
    (
        "raft-address-port-out-of-range",
        ("nodes", 0, "raft_address"),
        "127.0.0.1:65536",
        r"nodes\[0\]\.raft_address: bad port",
    ),
    (
        "raft-address-not-a-string",
        ("nodes", 0, "raft_address"),
        7100,
        r"nodes\[0\]\.raft_address must be a str",
    ),
    ("raft-address-missing", ("nodes", 0, "raft_address"), DELETED, r"nodes\[0\] is missing 'raft_address'"),
    ("bad-grpc-address", ("nodes", 0, "grpc_address"), "localhost", "must be HOST:PORT"),
    ("bool-bound", ("shards", 0, "lower_bound"), False, "lower_bound must be a int"),
    (
        "preferred-leader-not-a-replica",
        ("shards", 1, "preferred_leader"),
        "node01",
        r"shards\[1\] \(shard-01\): preferred_leader 'node01' is not one of its replicas "
        r"\['node04', 'node02', 'node03'\]",
    ),
    (
        "preferred-leader-unknown",
        ("shards", 1, "preferred_leader"),
        "node99",
        "preferred_leader 'node99' is not one of its replicas",
    ),
    ("preferred-leader-missing", ("shards", 0, "preferred_leader"), DELETED, "missing 'preferred_leader'"),
    (
        "replica-with-raft-port",
        ("shards", 0, "replicas", 0, "raft_port"),
        7100,
        r"shards\[0\]\.replicas\[0\] has unknown fields \['raft_port'\]",
    ),
    (
        "node-with-raft-host",
        ("nodes", 0, "raft_host"),
        "127.0.0.1",
        r"nodes\[0\] has unknown fields \['raft_host'\]",
    ),
    ("cluster-id-uppercase", ("cluster_id",), "A" * 32, "cluster_id must be 32 lowercase hex characters"),
    ("cluster-id-short", ("cluster_id",), "a" * 31, "cluster_id must be 32 lowercase hex characters"),
    # `$` in a pattern also matches before a final newline; the id must not carry one.
    (
        "cluster-id-newline",
        ("cluster_id",),
        "a" * 32 + "\n",
        "cluster_id must be 32 lowercase hex characters",
    ),
    ("cluster-id-missing", ("cluster_id",), DELETED, "missing 'cluster_id'"),
    ("version", ("format_version",), 99, "unsupported config format_version 99"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [pytest.param(path, value, message, id=name) for name, path, value, message in INVALID_CONFIG_CHANGES],
)
def test_invalid_configs_are_rejected(path: JsonPath, value: object, message: str, tmp_path: Path) -> None:
    obj = cluster_config.generate(4, 4, 3).to_json_object()
    _change(obj, path, value)
    config_path = tmp_path / "bad.json"
    config_path.write_text(json.dumps(obj))
    with pytest.raises(ConfigError, match=message) as raised:
        cluster_config.load(config_path)
    assert str(raised.value).startswith(f"cluster config {str(config_path)!r}: "), raised.value


def _format_1_config() -> dict[str, Any]:
    """A format 1 file as `ledger-dev seed-cluster-config --nodes 3 --shards 2 --replicas 3
    --host 10.0.0.5` wrote it: a raft_host per node, a raft_port per replica."""
    nodes = [
        {"id": f"node0{index}", "grpc_address": f"10.0.0.5:700{index - 1}", "raft_host": "10.0.0.5"}
        for index in (1, 2, 3)
    ]
    shards = [
        {
            "id": f"shard-0{shard}",
            "lower_bound": shard * 2**31,
            "upper_bound": (shard + 1) * 2**31 - 1,
            "replicas": [
                {"node_id": node["id"], "raft_port": 7100 + 2 * index + shard}
                for index, node in enumerate(nodes)
            ],
        }
        for shard in (0, 1)
    ]
    return {"format_version": 1, "nodes": nodes, "shards": shards}


def test_format_1_is_refused_with_the_command_that_regenerates_it(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps(_format_1_config()))
    with pytest.raises(ConfigError, match="format_version 1 is no longer supported") as raised:
        cluster_config.load(path)
    message = str(raised.value)
    command = (
        "`ledger-dev seed-cluster-config --nodes 3 --shards 2 --replicas 3 --host 10.0.0.5 --out <file>`"
    )
    assert command in message, message
    assert "data directories are unaffected" in message, message


def test_format_1_too_damaged_to_read_is_still_refused_by_version() -> None:
    with pytest.raises(
        ConfigError, match=r"no longer supported .*`ledger-dev seed-cluster-config --out <file>`"
    ):
        cluster_config.parse({"format_version": 1})


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        cluster_config.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        cluster_config.load(tmp_path / "broken.json")
