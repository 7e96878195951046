"""The nemesis: on a seeded schedule, one fault at a time against a running local cluster, each
followed by healing (restart, resume) and a quiet spell before the next.

Faults: kill -9 a shard's leader, kill -9 a follower, kill -9 every node, SIGSTOP a leader past
the election timeout then SIGCONT it, kill a follower and delete its whole data directory before
restarting it, and hand a shard's leadership to another replica. After every fault the nemesis
measures how long it took until every shard had a leader again among the reachable nodes.

Partition faults (only inside a private network namespace, see `network`): isolate a shard's
leader (its node, with its replicas of every shard) from the other nodes, split the cluster into
a majority and a one-node minority, drop one node's Raft packets to another but not the way
back, cut two nodes apart while both still see the third (a bridge), and drop Raft packets at
random on every link. Each holds for PARTITION_SECONDS and heals by flushing the rules. Only
Raft links are cut: clients (the gateway, the nemesis) reach every node throughout.

Faults never overlap: a wiped node has forgotten its Raft vote, which is only safe to lose while
no election is under way, and one fault at a time keeps a majority of every shard intact.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ledger_cluster.internal.v1 import node_pb2
from ledger_cluster.localcluster.cluster import Cluster
from ledger_cluster.localcluster.processes import LocalClusterError, log_tail
from ledger_cluster.nemesis.leadership import LeadershipSample, shard_leaders
from ledger_cluster.nemesis.network import Firewall, RaftEndpoint, cut_rules, drop_rule, raft_endpoint
from ledger_cluster.node_protocol import NodeReason
from ledger_cluster.status import error_details

KILL_LEADER = "kill-leader"
KILL_FOLLOWER = "kill-follower"
KILL_ALL = "kill-all"
PAUSE_LEADER = "pause-leader"
WIPE_FOLLOWER = "wipe-follower"
TRANSFER_LEADERSHIP = "transfer-leadership"
FAULT_KINDS = (KILL_LEADER, KILL_FOLLOWER, KILL_ALL, PAUSE_LEADER, WIPE_FOLLOWER, TRANSFER_LEADERSHIP)
ISOLATE_LEADER = "isolate-leader"
SPLIT_MAJORITY = "split-majority"
ONE_WAY_LOSS = "one-way-loss"
BRIDGE = "bridge"
PACKET_LOSS = "packet-loss"
# Faults that need a private network namespace (`ledger-dev nemesis --partitions`).
PARTITION_KINDS = (ISOLATE_LEADER, SPLIT_MAJORITY, ONE_WAY_LOSS, BRIDGE, PACKET_LOSS)
ALL_FAULT_KINDS = FAULT_KINDS + PARTITION_KINDS

# How long a killed node stays down, and how long a paused one stays paused (the election
# timeout is at most 1.4 s, so a pause always outlasts it).
DOWNTIME_SECONDS = (0.5, 3.0)
PAUSE_SECONDS = (2.0, 4.0)
# How long a partition holds: past the leader's fallback (3 s without a quorum, it steps down)
# and the followers' election timeout, so leaders change while it lasts.
PARTITION_SECONDS = (4.0, 7.0)
# Of each Raft packet, the share random loss drops.
PACKET_LOSS_PROBABILITY = (0.05, 0.3)
# Healthy operation between two faults.
QUIET_SECONDS = (1.0, 3.0)
# A shard without a leader for longer than this after a fault fails the check.
ELECTION_BOUND_SECONDS_DEFAULT = 10.0
# Waiting for leaders stops here (the check fails well before).
ELECTION_WAIT_SECONDS_MAX = 60.0
HEAL_TIMEOUT_SECONDS = 90.0
STATUS_TIMEOUT_SECONDS = 0.5
POLL_INTERVAL_SECONDS = 0.05
TRANSFER_TIMEOUT_SECONDS = 5.0
# Answers of a transfer that leave the cluster as it was (or with an election under way).
TRANSFER_REFUSALS = (
    NodeReason.TRANSFER_DENIED,
    NodeReason.TRANSFER_INCOMPLETE,
    NodeReason.NOT_LEADER,
    NodeReason.NO_LEADER,
)
PICK_LEADER_WAIT_SECONDS = 10.0
ERROR_TEXT_MAX = 4000
EXIT_LOG_TAIL_LINES = 40


@dataclass
class FaultRecord:
    kind: str
    target: str
    injected_seconds: float
    # Seconds from the moment leaders were lost (the fault, or the restart after kill-all) until
    # every shard had a leader among the reachable nodes; None if they never did.
    election_seconds: float | None = None
    healed_seconds: float = 0.0
    note: str = ""
    error: str = ""


@dataclass
class ProcessExit:
    """A process that ended without the nemesis stopping it: always a bug."""

    name: str
    exit_code: int | None
    at_seconds: float
    log_tail: str


@dataclass
class NemesisLog:
    faults: list[FaultRecord] = field(default_factory=list)
    unexpected_exits: list[ProcessExit] = field(default_factory=list)
    heal_failures: list[str] = field(default_factory=list)
    # Who led each shard, about once a second while the clients ran.
    leadership: list[LeadershipSample] = field(default_factory=list)


class Nemesis:
    def __init__(
        self,
        cluster: Cluster,
        clock: Callable[[], float],
        seed: int,
        faults: tuple[str, ...],
        log: NemesisLog,
        *,
        firewall: Firewall | None = None,
    ) -> None:
        self._cluster = cluster
        # Only for the partition faults; without it they fail as not injected.
        self._firewall = firewall
        self._clock = clock
        self._rng = random.Random(f"{seed}-nemesis")
        self._faults = faults
        self.log = log
        self._paused: set[str] = set()
        self._round: list[str] = []
        self._recorded_pids: set[int] = set()

    # -- the schedule --

    def run(self, until_seconds: float) -> None:
        """Inject faults one after another until the clock passes `until_seconds`."""
        actions: dict[str, Callable[[FaultRecord], None]] = {
            KILL_LEADER: self._kill_leader,
            KILL_FOLLOWER: self._kill_follower,
            KILL_ALL: self._kill_all,
            PAUSE_LEADER: self._pause_leader,
            WIPE_FOLLOWER: self._wipe_follower,
            TRANSFER_LEADERSHIP: self._transfer_leadership,
            ISOLATE_LEADER: self._isolate_leader,
            SPLIT_MAJORITY: self._split_majority,
            ONE_WAY_LOSS: self._one_way_loss,
            BRIDGE: self._bridge,
            PACKET_LOSS: self._packet_loss,
        }
        while self._clock() < until_seconds:
            self._sleep_until(min(until_seconds, self._clock() + self._rng.uniform(*QUIET_SECONDS)))
            if self._clock() >= until_seconds:
                break
            kind = self._next_kind()
            record = FaultRecord(kind=kind, target="", injected_seconds=self._clock())
            self.log.faults.append(record)
            try:
                actions[kind](record)
            except Exception as error:  # reported, and the run goes on to heal and check
                record.error = f"{type(error).__name__}: {error}"[:ERROR_TEXT_MAX]
            self.heal(record)

    def _next_kind(self) -> str:
        """Faults come in rounds, each a seeded shuffle of every chosen kind, so even a short
        run injects each kind once."""
        if not self._round:
            self._round = list(self._faults)
            self._rng.shuffle(self._round)
        return self._round.pop()

    def heal(self, record: FaultRecord | None = None) -> None:
        """Resume paused nodes, restart stopped ones (also those that ended on their own), and
        wait until the whole cluster is healthy."""
        self.collect_unexpected_exits()
        try:
            if self._firewall is not None:
                self._firewall.heal()
            self._restart_what_is_down()
            self._cluster.wait_healthy(HEAL_TIMEOUT_SECONDS)
        except Exception as error:  # reported, and the run goes on to the checks
            what = f"{record.kind} at {record.injected_seconds:.1f} s" if record else "the end of the run"
            self.log.heal_failures.append(
                f"not healthy {HEAL_TIMEOUT_SECONDS} s after {what}: {error}"[:ERROR_TEXT_MAX]
            )
            self.collect_unexpected_exits()
        if record is not None:
            record.healed_seconds = self._clock()

    def _restart_what_is_down(self) -> None:
        for node_id in sorted(self._paused):
            if self._cluster.nodes[node_id].is_running():
                self._cluster.resume_node(node_id)
        self._paused.clear()
        for node_id, node in self._cluster.nodes.items():
            if not node.is_running():
                self._cluster.start_node(node_id)
        if self._cluster.gateway is not None and not self._cluster.gateway.is_running():
            self._cluster.start_gateway()

    def collect_unexpected_exits(self) -> None:
        for node in self._cluster.nodes.values():
            process = node.process
            if process is not None and not node.down_on_purpose and not process.is_running():
                self._record_exit(process.describe(), process.exit_code(), process.log_path)
                node.down_on_purpose = True  # recorded once; `heal` restarts it
        gateway = self._cluster.gateway
        if gateway is not None and not gateway.is_running() and gateway.pid not in self._recorded_pids:
            self._recorded_pids.add(gateway.pid)
            self._record_exit(gateway.describe(), gateway.exit_code(), gateway.log_path)

    def _record_exit(self, name: str, exit_code: int | None, log_path: Path) -> None:
        tail = log_tail(log_path, EXIT_LOG_TAIL_LINES)
        self.log.unexpected_exits.append(ProcessExit(name, exit_code, self._clock(), tail))

    # -- faults --

    def _kill_leader(self, record: FaultRecord) -> None:
        shard_id, leader = self._pick_leader()
        record.target = f"{leader} (leader of {shard_id})"
        self._cluster.kill_node(leader)
        started = self._clock()
        record.election_seconds = self._wait_for_leaders(excluded={leader})
        self._sleep_until(started + self._rng.uniform(*DOWNTIME_SECONDS))

    def _kill_follower(self, record: FaultRecord) -> None:
        shard_id, follower = self._pick_follower()
        record.target = f"{follower} (follower of {shard_id})"
        self._cluster.kill_node(follower)
        started = self._clock()
        record.election_seconds = self._wait_for_leaders(excluded={follower})
        self._sleep_until(started + self._rng.uniform(*DOWNTIME_SECONDS))

    def _kill_all(self, record: FaultRecord) -> None:
        record.target = "every node"
        for node_id in self._cluster.nodes:
            self._cluster.kill_node(node_id)
        time.sleep(self._rng.uniform(*DOWNTIME_SECONDS))
        for node_id in self._cluster.nodes:
            self._cluster.start_node(node_id)
        record.note = "election measured from the restart"
        record.election_seconds = self._wait_for_leaders(excluded=set())

    def _pause_leader(self, record: FaultRecord) -> None:
        shard_id, leader = self._pick_leader()
        pause_seconds = self._rng.uniform(*PAUSE_SECONDS)
        record.target = f"{leader} (leader of {shard_id}) for {pause_seconds:.1f} s"
        self._cluster.pause_node(leader)
        self._paused.add(leader)
        started = self._clock()
        record.election_seconds = self._wait_for_leaders(excluded={leader})
        self._sleep_until(started + pause_seconds)
        self._cluster.resume_node(leader)
        self._paused.discard(leader)

    def _wipe_follower(self, record: FaultRecord) -> None:
        shard_id, follower = self._pick_follower()
        record.target = f"{follower} (follower of {shard_id})"
        self._cluster.kill_node(follower)
        started = self._clock()
        self._cluster.wipe_node_data(follower)
        record.election_seconds = self._wait_for_leaders(excluded={follower})
        self._sleep_until(started + self._rng.uniform(*DOWNTIME_SECONDS))

    def _transfer_leadership(self, record: FaultRecord) -> None:
        shard_id, leader = self._pick_leader()
        shard = next(shard for shard in self._cluster.config.shards if shard.shard_id == shard_id)
        target = self._rng.choice(sorted(r.node_id for r in shard.replicas if r.node_id != leader))
        record.target = f"{shard_id} from {leader} to {target}"
        started = self._clock()
        try:
            answer = self._cluster.transfer_leadership(shard_id, leader, target, TRANSFER_TIMEOUT_SECONDS)
            record.note = f"now led by {answer.leader_node_id}"
        except grpc.RpcError as error:
            details = error_details(error)
            if details.reason not in TRANSFER_REFUSALS and details.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            # Refused (target not caught up, or leadership moved meanwhile) or not finished in
            # time: either way the shard must settle on a leader, which is measured below.
            record.note = f"{details.code.name} {details.reason}: {details.message}"
        elapsed = self._wait_for_leaders(excluded=set())
        record.election_seconds = None if elapsed is None else self._clock() - started

    def _isolate_leader(self, record: FaultRecord) -> None:
        shard_id, leader = self._pick_leader()
        self._isolate(record, leader, f"{leader} (leader of {shard_id})")

    def _split_majority(self, record: FaultRecord) -> None:
        minority = self._rng.choice(sorted(self._cluster.nodes))
        self._isolate(record, minority, f"{minority} (the minority)")

    def _isolate(self, record: FaultRecord, node_id: str, description: str) -> None:
        """Cut every Raft link of `node_id`; the others, a majority of every shard, must elect
        leaders among themselves, and by the end the cut-off node must lead nothing with a
        quorum (it cannot commit: proof that the rules cut what they should)."""
        firewall = self._require_firewall()
        others = [self._endpoint(other) for other in sorted(self._cluster.nodes) if other != node_id]
        hold_seconds = self._rng.uniform(*PARTITION_SECONDS)
        record.target = (
            f"{description} cut off from {', '.join(e.node_id for e in others)} for {hold_seconds:.1f} s"
        )
        firewall.add(cut_rules([self._endpoint(node_id)], others))
        started = self._clock()
        record.election_seconds = self._wait_for_leaders(excluded={node_id})
        self._sleep_until(started + hold_seconds)
        still_leading = self._leading_with_quorum(node_id)
        if still_leading:
            raise LocalClusterError(
                f"{node_id} still leads {', '.join(still_leading)} with a quorum while cut off"
            )
        record.note = f"{node_id} led no shard with a quorum at the end of the partition"

    def _one_way_loss(self, record: FaultRecord) -> None:
        source, destination = self._rng.sample(sorted(self._cluster.nodes), 2)
        hold_seconds = self._rng.uniform(*PARTITION_SECONDS)
        record.target = f"{source} -> {destination} dropped, not the way back, for {hold_seconds:.1f} s"
        self._require_firewall().add([drop_rule(self._endpoint(source), self._endpoint(destination))])
        self._hold_partition(record, hold_seconds)

    def _bridge(self, record: FaultRecord) -> None:
        first, second, bridge = self._rng.sample(sorted(self._cluster.nodes), 3)
        hold_seconds = self._rng.uniform(*PARTITION_SECONDS)
        record.target = f"{first} and {second} cut apart, both still see {bridge}, for {hold_seconds:.1f} s"
        self._require_firewall().add(cut_rules([self._endpoint(first)], [self._endpoint(second)]))
        self._hold_partition(record, hold_seconds)

    def _packet_loss(self, record: FaultRecord) -> None:
        probability = self._rng.uniform(*PACKET_LOSS_PROBABILITY)
        hold_seconds = self._rng.uniform(*PARTITION_SECONDS)
        record.target = f"{probability:.0%} of Raft packets on every link for {hold_seconds:.1f} s"
        endpoints = [self._endpoint(node_id) for node_id in sorted(self._cluster.nodes)]
        rules = [
            drop_rule(source, destination, probability)
            for source in endpoints
            for destination in endpoints
            if source != destination
        ]
        self._require_firewall().add(rules)
        self._hold_partition(record, hold_seconds)

    def _hold_partition(self, record: FaultRecord, hold_seconds: float) -> None:
        """A partition that leaves a majority connected: every shard must have a leader while it
        holds (measured from its start), whichever node that is."""
        started = self._clock()
        record.election_seconds = self._wait_for_leaders(excluded=set())
        self._sleep_until(started + hold_seconds)

    def _require_firewall(self) -> Firewall:
        if self._firewall is None:
            raise LocalClusterError("partition faults need a private network namespace (--partitions)")
        return self._firewall

    def _endpoint(self, node_id: str) -> RaftEndpoint:
        node = next(node for node in self._cluster.config.nodes if node.node_id == node_id)
        return raft_endpoint(node_id, node.raft_address)

    def _leading_with_quorum(self, node_id: str) -> list[str]:
        """The shards `node_id` says it leads with a quorum (none if it does not answer)."""
        try:
            status = self._cluster.status(node_id, STATUS_TIMEOUT_SECONDS)
        except grpc.RpcError:
            return []
        return sorted(r.shard_id for r in status.replicas if r.is_leader and r.has_quorum)

    # -- targets and leaders --

    def _leaders(self, excluded: set[str]) -> dict[str, str]:
        """Shard id -> node id of its leader (`shard_leaders`) among the reachable nodes."""
        statuses: list[node_pb2.StatusResponse] = []
        for node_id in self._cluster.nodes:
            if (
                node_id in excluded
                or node_id in self._paused
                or not self._cluster.nodes[node_id].is_running()
            ):
                continue
            try:
                statuses.append(self._cluster.status(node_id, STATUS_TIMEOUT_SECONDS))
            except grpc.RpcError:
                continue
        return {shard_id: leader.node_id for shard_id, leader in shard_leaders(statuses).items()}

    def _wait_for_leaders(self, excluded: set[str]) -> float | None:
        """Seconds until every shard has a leader outside `excluded`; None past the wait bound."""
        started = self._clock()
        wanted = {shard.shard_id for shard in self._cluster.config.shards}
        while self._clock() - started < ELECTION_WAIT_SECONDS_MAX:
            leaders = self._leaders(excluded)
            if wanted <= leaders.keys() and not excluded.intersection(leaders.values()):
                return self._clock() - started
            time.sleep(POLL_INTERVAL_SECONDS)
        return None

    def _pick_leader(self) -> tuple[str, str]:
        """A shard with a settled leader, and that leader; waits out a spurious election."""
        deadline = self._clock() + PICK_LEADER_WAIT_SECONDS
        leaders = self._leaders(excluded=set())
        while not leaders and self._clock() < deadline:
            time.sleep(POLL_INTERVAL_SECONDS)
            leaders = self._leaders(excluded=set())
        shard_ids = sorted(leaders)
        if not shard_ids:
            raise LocalClusterError(f"no shard had a leader for {PICK_LEADER_WAIT_SECONDS} s")
        shard_id = self._rng.choice(shard_ids)
        return shard_id, leaders[shard_id]

    def _pick_follower(self) -> tuple[str, str]:
        shard_id, leader = self._pick_leader()
        shard = next(shard for shard in self._cluster.config.shards if shard.shard_id == shard_id)
        return shard_id, self._rng.choice(sorted(r.node_id for r in shard.replicas if r.node_id != leader))

    def _sleep_until(self, moment_seconds: float) -> None:
        remaining = moment_seconds - self._clock()
        if remaining > 0:
            time.sleep(remaining)
