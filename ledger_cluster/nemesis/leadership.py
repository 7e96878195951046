"""Who leads each shard, as the nodes that answer see it: one definition for the nemesis (how
long elections take after a fault) and the progress check (whether a shard that had a leader
kept acknowledging writes), and a sampler that records it once a second during a run.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from ledger_cluster.internal.v1 import node_pb2, node_pb2_grpc
from ledger_cluster.replica import ACKNOWLEDGING_TERM_LOG
from ledger_cluster.security import ClientCredentials

# ACKNOWLEDGING_TERM_LOG's line, its %s and %d fields captured.
_ACKNOWLEDGING_TERM_PATTERN = re.compile(
    re.escape(ACKNOWLEDGING_TERM_LOG).replace("%s", r"(\S+)").replace("%d", r"(\d+)")
)

SAMPLE_INTERVAL_SECONDS = 1.0
# Short: a paused node never answers, and a sample must not wait long for it.
SAMPLE_STATUS_TIMEOUT_SECONDS = 0.5
# More than a day of samples at one a second (a run lasts at most a day); sampling stops there
# rather than growing without bound.
SAMPLES_MAX = 100_000
# A restarted node is asked again soon, not after gRPC's default reconnect backoff of seconds.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


@dataclass(frozen=True)
class ShardLeader:
    """A shard's leader and the term it leads in: every election, even one that re-elects the
    same node, starts a new term."""

    node_id: str
    term: int


@dataclass(frozen=True)
class LeadershipSample:
    """The leaders seen by one round of Status calls started at `at_seconds`; a shard without
    a leader is absent."""

    at_seconds: float
    leaders: dict[str, ShardLeader]


def shard_leaders(statuses: Iterable[node_pb2.StatusResponse]) -> dict[str, ShardLeader]:
    """Shard id -> the replica that claims leadership with a quorum, at the highest term any
    answering replica of the shard reports (a replica at a higher term means an election is
    under way, and the old leader's claim is stale)."""
    claims: dict[str, list[node_pb2.ReplicaStatus]] = {}
    for status in statuses:
        for replica in status.replicas:
            claims.setdefault(replica.shard_id, []).append(replica)
    leaders: dict[str, ShardLeader] = {}
    for shard_id, views in claims.items():
        top_term = max(view.term for view in views)
        leading = [view for view in views if view.is_leader and view.has_quorum and view.term == top_term]
        if len(leading) == 1:
            leaders[shard_id] = ShardLeader(leading[0].node_id, leading[0].term)
    return leaders


class LeadershipSampler:
    """A thread that asks every node for its Status at once, every SAMPLE_INTERVAL_SECONDS, and
    appends what it saw to `samples` until `stop()`, which takes one last sample so the record
    reaches the moment the run stopped."""

    def __init__(
        self,
        node_addresses: Iterable[str],
        credentials: ClientCredentials,
        clock: Callable[[], float],
        samples: list[LeadershipSample],
    ) -> None:
        self._clock = clock
        self.samples = samples
        # Its own channels: the cluster's are created lazily by other threads without a lock.
        self._channels = [credentials.channel(address, options=CHANNEL_OPTIONS) for address in node_addresses]
        self._stubs = [node_pb2_grpc.NodeServiceStub(channel) for channel in self._channels]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis-leadership-sampler")
        # Why sampling ended early, if it did; the runner reports it.
        self.failure = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        try:
            if not self.failure:
                self._record()
        finally:
            for channel in self._channels:
                channel.close()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set() and self._record():
                started = self.samples[-1].at_seconds
                self._stopping.wait(max(started + SAMPLE_INTERVAL_SECONDS - self._clock(), 0.0))
        except Exception as error:  # the progress check then sees no leader; the report says why
            self.failure = f"leadership sampling stopped at {self._clock():.1f} s: {error!r}"

    def _record(self) -> bool:
        """Append one sample; False once the record is full."""
        if len(self.samples) >= SAMPLES_MAX:
            self.failure = f"leadership sampling stopped after {SAMPLES_MAX} samples"
            return False
        self.samples.append(self._sample())
        return True

    def _sample(self) -> LeadershipSample:
        started = self._clock()
        request = node_pb2.StatusRequest()
        calls = [stub.Status.future(request, timeout=SAMPLE_STATUS_TIMEOUT_SECONDS) for stub in self._stubs]
        answers = []
        for call in calls:
            try:
                answers.append(call.result())
            except grpc.RpcError:
                continue  # down or paused: it claims nothing
        return LeadershipSample(started, shard_leaders(answers))


@dataclass(frozen=True)
class AcknowledgingTerm:
    """A replica that, as its shard's leader, acknowledged a write (or a consistent read) in
    `term`: the first of that term, as its node logged it."""

    shard_id: str
    term: int
    node_id: str


def acknowledging_terms(log_paths: Iterable[Path]) -> list[AcknowledgingTerm]:
    """Every ACKNOWLEDGING_TERM_LOG line of the nodes' logs (which keep growing across
    restarts, so a killed or wiped node's earlier terms count too)."""
    found = []
    for path in log_paths:
        with path.open(encoding="utf-8", errors="replace") as log:
            for line in log:
                match = _ACKNOWLEDGING_TERM_PATTERN.search(line)
                if match:
                    found.append(AcknowledgingTerm(match[1], int(match[2]), match[3]))
    return found
