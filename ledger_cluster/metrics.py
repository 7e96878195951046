"""Every Prometheus metric of ledger-cluster, named in one place, and the `/metrics` endpoint.

Each process (gateway, standalone server, node) serves the default registry, which also carries
the process collector (`process_cpu_seconds_total`, memory, open files) that `ledger-dev bench`
reads to report CPU per write. Hot paths only touch pre-labelled children; figures that exist
anyway (Raft indices, LMDB sizes) are read at scrape time by collectors instead of being pushed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Where the gateway (or ledger-standalone) serves /metrics by default; the nodes' addresses are in
# the cluster config (9101, 9102, ... as `seed-cluster-config` writes them).
DEFAULT_METRICS_PORT = 9100
LATENCY_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
ITEM_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)

PROCESS_INFO = Info("ledger_process", "Which ledger-cluster process serves these metrics.")

RPC_REQUESTS = Counter(
    "ledger_rpc_requests",
    "RPCs answered, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "ledger_rpc_latency_seconds",
    "Time from an RPC's arrival to its answer, by service and method.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
RPC_IN_FLIGHT = Gauge("ledger_rpc_in_flight", "RPCs being served now, by service.", ["service"])
COALESCED_ITEMS = Histogram(
    "ledger_coalesced_batch_items",
    "Writes sent together: items per node call (gateway) or per LMDB write transaction (standalone).",
    buckets=ITEM_COUNT_BUCKETS,
)
GROUP_COMMIT_ITEMS = Histogram(
    "ledger_group_commit_items",
    "Items per Raft entry a shard leader proposed (node group commit).",
    buckets=ITEM_COUNT_BUCKETS,
)
GROUP_COMMIT_FAILED_IN_FLIGHT = Counter(
    "ledger_group_commit_failed_in_flight_total",
    "Proposals answered OUTCOME_UNKNOWN because Raft would not answer them (a snapshot installed"
    " past them, or leadership lost).",
)
RAFT_FRAMES_REJECTED = Counter(
    "ledger_raft_frames_rejected_total",
    "Raft transport input refused, by reason: a bad handshake, a frame that fails authentication"
    " (the connection is closed), a malformed message, or a message for a shard this node lacks.",
    ["reason"],
)
# Exported at 0 from the start, so a first rejection shows as a change.
for _reason in ("handshake", "frame", "message", "shard"):
    RAFT_FRAMES_REJECTED.labels(reason=_reason)
APPLY_REFUSED_COMMANDS = Counter(
    "ledger_apply_refused_commands_total",
    "Commands whose apply raised a deterministic error (a corrupt stored record, or a bug), by"
    " shard: rolled back and answered CORRUPT_RECORD or APPLY_FAILED alike on every replica.",
    ["shard"],
)
APPLY_LATENCY = Histogram(
    "ledger_apply_latency_seconds",
    "Time to apply one log entry or standalone write: one LMDB write transaction and its fsync.",
    buckets=LATENCY_BUCKETS_SECONDS,
)


@dataclass(frozen=True)
class ShardFigures:
    """What a shard's replica (or standalone shard) reports at scrape time."""

    shard_id: str
    applied_index: int
    lmdb_used_bytes: int
    lmdb_map_bytes: int
    # Raft state; None in standalone mode, which has no Raft.
    term: int | None = None
    commit_index: int | None = None
    is_leader: bool | None = None


class ShardCollector(Collector):
    """Per-shard gauges, read from the shards when /metrics is scraped."""

    def __init__(self, figures: Callable[[], Iterable[ShardFigures]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "applied": GaugeMetricFamily(
                "ledger_raft_applied_index", "Last log index applied to the shard's state.", labels=["shard"]
            ),
            "term": GaugeMetricFamily("ledger_raft_term", "The replica's Raft term.", labels=["shard"]),
            "commit": GaugeMetricFamily(
                "ledger_raft_commit_index", "The replica's Raft commit index.", labels=["shard"]
            ),
            "leader": GaugeMetricFamily(
                "ledger_raft_is_leader", "1 while this replica leads its shard.", labels=["shard"]
            ),
            "lmdb": GaugeMetricFamily(
                "ledger_lmdb_bytes",
                "LMDB environment size: `used` pages written so far, `map` the reserved map.",
                labels=["shard", "kind"],
            ),
        }
        for shard in self._figures():
            families["applied"].add_metric([shard.shard_id], shard.applied_index)
            families["lmdb"].add_metric([shard.shard_id, "used"], shard.lmdb_used_bytes)
            families["lmdb"].add_metric([shard.shard_id, "map"], shard.lmdb_map_bytes)
            if shard.term is not None:
                families["term"].add_metric([shard.shard_id], shard.term)
            if shard.commit_index is not None:
                families["commit"].add_metric([shard.shard_id], shard.commit_index)
            if shard.is_leader is not None:
                families["leader"].add_metric([shard.shard_id], int(shard.is_leader))
        yield from families.values()


@dataclass
class MetricsServer:
    """`GET /metrics` of this process's default registry, on its own thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_metrics(
    host: str,
    port: int,
    role: str,
    name: str,
    shards: Callable[[], Iterable[ShardFigures]] | None = None,
) -> MetricsServer:
    """Start the endpoint (port 0 picks a free one); raises OSError when the port is taken.
    Called once per process: the metrics live in the process-wide default registry."""
    PROCESS_INFO.info({"role": role, "name": name})
    if shards is not None:
        REGISTRY.register(ShardCollector(shards))
    server, thread = start_http_server(port, addr=host)
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return MetricsServer(server, thread)
