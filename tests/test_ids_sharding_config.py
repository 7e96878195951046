"""ids, the pinned shard-key function, and cluster config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ledger_cluster import config as cluster_config
from ledger_cluster.errors import ConfigError, InvalidIdError
from ledger_cluster.ids import (
    format_account_id,
    format_transaction_id,
    parse_account_id,
    parse_transaction_id,
)
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
    with pytest.raises(InvalidIdError):
        parse_account_id(text)


@pytest.mark.parametrize("text", ["", "0" * 31, "0" * 33, "A" * 32, "z" * 32])
def test_malformed_transaction_ids_are_rejected(text: str) -> None:
    with pytest.raises(InvalidIdError):
        parse_transaction_id(text)


def test_checked_in_config_has_3_nodes_16_shards_3_replicas() -> None:
    config = cluster_config.load(REPO_ROOT / "cluster_config.json")
    assert len(config.nodes) == 3
    assert len(config.shards) == 16
    assert all(len(shard.replicas) == 3 for shard in config.shards)
    assert config == cluster_config.generate(3, 16, 3)


@pytest.mark.parametrize(("nodes", "shards", "replicas"), [(1, 1, 1), (3, 4, 3), (5, 32, 3), (7, 7, 5)])
def test_generated_configs_cover_the_key_space_and_spread_replicas(
    nodes: int, shards: int, replicas: int
) -> None:
    config = cluster_config.generate(nodes, shards, replicas)
    assert config.shards[0].lower_bound == 0
    assert config.shards[-1].upper_bound == SHARD_KEY_MAX
    for key in (0, 1, SHARD_KEY_MAX // 3, SHARD_KEY_MAX - 1, SHARD_KEY_MAX):
        assert config.shard_for_key(key).contains(key)
    load = [sum(r.node_id == n.node_id for s in config.shards for r in s.replicas) for n in config.nodes]
    assert max(load) - min(load) <= 1


def test_write_atomic_then_load_round_trips(tmp_path: Path) -> None:
    config = cluster_config.generate(3, 8, 3)
    path = tmp_path / "cluster.json"
    cluster_config.write_atomic(config, path)
    assert cluster_config.load(path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.json"]


def _mutated(change: str) -> dict[str, object]:
    obj = cluster_config.generate(3, 4, 3).to_json_object()
    shards = obj["shards"]
    nodes = obj["nodes"]
    if change == "gap":
        shards[1]["lower_bound"] += 1
    elif change == "overlap":
        shards[1]["lower_bound"] -= 1
    elif change == "short":
        shards[-1]["upper_bound"] -= 1
    elif change == "same-node-twice":
        shards[0]["replicas"][1]["node_id"] = shards[0]["replicas"][0]["node_id"]
    elif change == "unknown-node":
        shards[0]["replicas"][0]["node_id"] = "node99"
    elif change == "duplicate-port":
        shards[1]["replicas"][0]["raft_port"] = shards[0]["replicas"][0]["raft_port"]
        shards[1]["replicas"][0]["node_id"] = shards[0]["replicas"][0]["node_id"]
        shards[1]["replicas"][1]["node_id"] = shards[0]["replicas"][1]["node_id"]
        shards[1]["replicas"][2]["node_id"] = shards[0]["replicas"][2]["node_id"]
    elif change == "bad-address":
        nodes[0]["grpc_address"] = "localhost"
    elif change == "bool-port":
        shards[0]["replicas"][0]["raft_port"] = True
    elif change == "version":
        obj["format_version"] = 99
    return obj


@pytest.mark.parametrize(
    "change",
    [
        "gap",
        "overlap",
        "short",
        "same-node-twice",
        "unknown-node",
        "duplicate-port",
        "bad-address",
        "bool-port",
        "version",
    ],
)
def test_invalid_configs_are_rejected(change: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_mutated(change)))
    with pytest.raises(ConfigError):
        cluster_config.load(path)


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        cluster_config.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        cluster_config.load(tmp_path / "broken.json")
