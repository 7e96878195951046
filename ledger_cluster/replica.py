"""One shard replica: a PySyncObj Raft group member driving an AccountsCore. With the modules
beside it that only it uses (`raft_loop`, `raft_codec`, `replica_apply`, `replica_dump`,
`replica_leadership`), the only code that touches pysyncobj.

A log entry is PySyncObj's command-type byte followed by the encoded CommandEnvelope, never a
pickle. The index of the entry being applied is `raftLastApplied + 1`, which the core stores with
its effects, so the journal replay after every restart is skipped entry by entry (exactly once).
Every group of the node is driven by the node's one Raft loop (`NodeRaft`); committed entries
are applied on the shard's applier thread.

Durability (`ReplicaOptions.durability`, default `Durability.POWER_LOSS`): an acknowledged
write survives a power loss of every node at once. What has to be on disk, and when:
- the Raft journal and its meta (term, vote): fsynced before any message that relies on them
  leaves and before a tick counts or applies an entry (raft_loop.py and replica_journal.py
  give the argument against PySyncObj's code);
- the LMDB state: an entry is applied only after the journal that holds it was synced, so the
  state is never ahead of the journal (`_check_journal_covers_state` refuses to start
  otherwise), and whatever the state lacks after a power loss the journal replays. So LMDB runs
  with `sync` but without `metasync`: one fsync per commit instead of two, and a power loss may
  undo the last commit (LMDB keeps its integrity), which the journal replays at start-up
  (each entry's index is stored with its effects, so nothing is applied twice). The journal
  is trimmed only after the compaction dump that replaces the trimmed entries was fsynced and
  renamed into place with its directory synced (replica_dump.py); the dump is read from the
  applied state, and a replica whose state is behind its own dump restores it at start-up;
- a snapshot installed from the leader: fsynced with its directory before PySyncObj replaces
  the journal with the snapshot's two entries, so the journal on disk never starts after a
  state that is not on disk.
`Durability.PROCESS_CRASH` fsyncs none of the journal or meta changes (LMDB commits keep both
fsyncs, as before the journal was made durable): every acknowledged write survives kill -9 of
any or all processes, none is promised to survive a power loss or a kernel crash.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj.node import Node
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

from ledger_cluster import replica_journal
from ledger_cluster.config import ClusterConfig, ShardConfig
from ledger_cluster.core import AccountsCore, commands
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import (
    LeadershipTransferDeniedError,
    LeadershipTransferIncompleteError,
    LedgerError,
    NotLeaderError,
    ProposalDeniedError,
    QueueFullError,
    ReplicaBrokenError,
    UnknownOutcomeError,
)
from ledger_cluster.group_commit import Answer, GroupCommit
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import NODE_MESSAGE_BYTES_MAX
from ledger_cluster.process import stop_broken_process
from ledger_cluster.raft_codec import master_key
from ledger_cluster.raft_loop import RaftLoop
from ledger_cluster.replica_apply import PendingApply, ShardApplier
from ledger_cluster.replica_dump import CompactionDump, dump_raft_index
from ledger_cluster.replica_journal import AtomicTrimJournal, Durability
from ledger_cluster.replica_leadership import LeadershipTransfer
from ledger_cluster.sharding import SHARD_KEY_MAX
from ledger_cluster.storage import make_private_directory

logger = logging.getLogger(__name__)
# Every journal this process opens trims atomically (replica_journal.py).
replica_journal.install()

# Raft timing, chosen by measurement (docs/performance.md): heartbeats every 0.2 s keep an idle
# 16-shard cluster near 1% of a core per node, and elections start after 0.7-1.4 s without one
# (PySyncObj requires the minimum to exceed 3 heartbeat periods), so a dead leader is replaced
# within 2 s.
RAFT_MIN_TIMEOUT_SECONDS = 0.7
RAFT_MAX_TIMEOUT_SECONDS = 1.4
APPEND_ENTRIES_PERIOD_SECONDS = 0.2
# A leader that hears from no majority for this long steps down, so a partitioned old leader
# stops taking writes within seconds instead of the default 30 s.
LEADER_FALLBACK_TIMEOUT_SECONDS = 3.0
# Bounded queue of proposals waiting for the Raft loop; beyond it, RESOURCE_EXHAUSTED.
COMMANDS_QUEUE_SIZE_MAX = 10_000
# Above any legal entry (one node command), so PySyncObj never splits an entry into pickled
# 'transmission' chunks, which the transport refuses.
APPEND_ENTRIES_BATCH_BYTES_MAX = 2 * NODE_MESSAGE_BYTES_MAX
SNAPSHOT_TRANSFER_BATCH_BYTES = 2**20
LOG_COMPACTION_MIN_ENTRIES_DEFAULT = 50_000
LOG_COMPACTION_MIN_SECONDS_DEFAULT = 600.0
# Shards compact every 600 to 900 s by default, spread by their place in the key space.
COMPACTION_INTERVAL_SPREAD = 0.5
RAFT_PASSWORD_ENVIRONMENT_VARIABLE = "LEDGER_RAFT_PASSWORD"
# Logged once per term in which a replica, as leader, saw its proposals commit; the nemesis reads
# it back.
ACKNOWLEDGING_TERM_LOG = "acknowledging as leader: shard %s term %d node %s"
# Preferred leaders: how often each node looks for shards to hand back, how long the preferred
# replica must have been connected and caught up first (a node that just came back may go
# again), and how long one hand-back may take.
LEADER_BALANCE_PERIOD_SECONDS = 1.0
PREFERRED_HEALTHY_SECONDS = 3.0
HAND_BACK_TIMEOUT_SECONDS = 1.0
# A node that stops gracefully gives its leaderships away first, each within this time.
HAND_OFF_TIMEOUT_SECONDS = 2.0
# The first bytes of a pickle (protocol 2 and later): entries written by the first wave.
_PICKLE_PROTOCOL_MARKER = b"\x80"

_ANSWER_SUCCESS = FAIL_REASON.SUCCESS
# Never appended to the log: the command is known not to be applied.
_NOT_APPLIED = {
    FAIL_REASON.QUEUE_FULL: "the shard's proposal queue is full",
    FAIL_REASON.MISSING_LEADER: "the shard has no leader",
    FAIL_REASON.NOT_LEADER: "this replica is not the leader",
    FAIL_REASON.REQUEST_DENIED: "the proposal was denied",
}


@dataclass(frozen=True)
class ReplicaOptions:
    raft_password: str
    log_compaction_min_entries: int = LOG_COMPACTION_MIN_ENTRIES_DEFAULT
    log_compaction_min_seconds: float = LOG_COMPACTION_MIN_SECONDS_DEFAULT
    durability: Durability = Durability.POWER_LOSS


@dataclass(frozen=True)
class ReplicaStatus:
    shard_id: str
    node_id: str
    is_leader: bool
    leader_node_id: str
    term: int
    commit_index: int
    last_applied: int
    core_applied_index: int
    has_quorum: bool
    log_entries: int


class _NoPoller:
    """Stands in for a group's own poller: the node's Raft loop does all the waiting."""

    def subscribe(self, descriptor: Any, callback: Any, event_mask: int) -> None:
        pass

    def unsubscribe(self, descriptor: Any) -> None:
        pass

    def poll(self, timeout: float) -> None:
        pass


class _LoopNotifier:
    """Stands in for a group's pipe notifier: a proposal wakes the node's Raft loop."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.notify = wake


def _close_pipe_notifier(notifier: Any) -> None:
    """The pipe PySyncObj opened for its own poller; nothing reads it once the loop wakes
    the group instead."""
    for descriptor in (notifier._PipeNotifier__pipeR, notifier._PipeNotifier__pipeW):
        os.close(descriptor)


class _LedgerSyncObj(SyncObj):  # type: ignore[misc]  # pysyncobj ships no type information
    def __init__(
        self,
        self_node: Node,
        partners: list[Node],
        conf: SyncObjConf,
        transport: Any,
        apply_entry: Callable[[bytes, int], Any],
    ) -> None:
        self._apply_entry = apply_entry
        super().__init__(self_node, partners, conf, transport=transport)

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:  # replaces PySyncObj's
        # PySyncObj's own version unpickles every entry; this one hands the envelope to the
        # applier and answers with its PendingApply.
        return self._apply_entry(command, self.raftLastApplied + 1)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2, which PySyncObj used, rebuilds bytes with codecs.encode(text, "latin1");
        # nothing else may be named.
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise ReplicaBrokenError(f"a first-wave log entry names {module}.{name}")


def _first_wave_envelope(payload: bytes) -> bytes:
    """The envelope of an entry the first wave wrote: a pickled (method id, (envelope,), kwargs)
    tuple. Read with no class allowed, so it can only yield plain values."""
    decoded = _RestrictedUnpickler(io.BytesIO(payload)).load()
    if not (isinstance(decoded, tuple) and len(decoded) >= 2 and isinstance(decoded[1], tuple)):
        raise ReplicaBrokenError("a first-wave log entry of an unknown shape")
    arguments = decoded[1]
    if len(arguments) != 1 or not isinstance(arguments[0], bytes):
        raise ReplicaBrokenError("a first-wave log entry without its envelope")
    return arguments[0]


class NodeRaft:
    """The node's Raft side: one loop and connection set for every shard replica on the node,
    the hand-back of leaderships to their preferred replicas, and the hand-off at a stop."""

    def __init__(
        self,
        config: ClusterConfig,
        node_id: str,
        options: ReplicaOptions,
        *,
        on_broken: Callable[[BaseException], NoReturn] = stop_broken_process,
    ) -> None:
        self.node_id = node_id
        peers = {node.node_id: node.raft_address for node in config.nodes if node.node_id != node_id}
        key = master_key(options.raft_password, config.cluster_id)
        self.loop = RaftLoop(node_id, config.node(node_id).raft_address, peers, key, on_broken)
        self._replicas: dict[str, ShardReplica] = {}
        self._balancing = threading.Event()
        self._balancer: threading.Thread | None = None

    def add(self, replica: ShardReplica) -> None:
        self._replicas[replica.shard.shard_id] = replica

    def start(self) -> None:
        self.loop.start()
        self._balancing.set()
        self._balancer = threading.Thread(target=self._balance, name="leader-balancer", daemon=True)
        self._balancer.start()

    def _balance(self) -> None:
        while self._balancing.is_set():
            for replica in list(self._replicas.values()):
                if not self._balancing.is_set():
                    return
                try:
                    replica.hand_back_leadership()
                except LedgerError as error:
                    logger.info(
                        "shard %s: hand-back to the preferred leader: %s", replica.shard.shard_id, error
                    )
                except Exception:
                    logger.exception(
                        "shard %s: hand-back to the preferred leader failed", replica.shard.shard_id
                    )
            time.sleep(LEADER_BALANCE_PERIOD_SECONDS)

    def hand_off_leaderships(self) -> None:
        """Give every leadership of this node to a peer, all at once (a graceful stop)."""
        self._stop_balancing()
        leading = [replica for replica in self._replicas.values() if replica.is_leader()]
        threads = [
            threading.Thread(target=replica.hand_off_leadership, name=f"hand-off-{replica.shard.shard_id}")
            for replica in leading
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _stop_balancing(self) -> None:
        self._balancing.clear()
        if self._balancer is not None:
            self._balancer.join()
            self._balancer = None

    def stop(self) -> None:
        self._stop_balancing()
        self.loop.stop()


class ShardReplica:
    """This node's replica of one shard: LMDB under <data>/replicas/<shard>/, the Raft journal
    and dump under <data>/raft/<shard>/."""

    def __init__(
        self,
        config: ClusterConfig,
        shard: ShardConfig,
        node_id: str,
        data_dir: Path,
        options: ReplicaOptions,
        *,
        raft: NodeRaft,
        on_broken: Callable[[BaseException], NoReturn] = stop_broken_process,
    ) -> None:
        self.shard = shard
        self.node_id = node_id
        self._raft = raft
        self._on_broken = on_broken
        self._acknowledging_term = 0
        self.core = AccountsCore.open(
            data_dir / "replicas" / shard.shard_id,
            shard.lower_bound,
            shard.upper_bound,
            # The synced journal holds every entry the state has applied (see the docstring).
            metasync=options.durability is not Durability.POWER_LOSS,
        )
        try:
            self._open(data_dir / "raft" / shard.shard_id, options)
        except BaseException:
            self.core.close()  # whatever step failed, the node releases the directory next
            raise

    def _open(self, raft_dir: Path, options: ReplicaOptions) -> None:
        make_private_directory(raft_dir)
        _check_journal_covers_state(raft_dir, self.core.applied_index(), self.shard.shard_id)
        self._applier = ShardApplier(self.shard.shard_id, self.core, self._on_broken)
        try:
            self._open_group(raft_dir, options)
        except BaseException:
            self._applier.close()
            raise

    def _open_group(self, raft_dir: Path, options: ReplicaOptions) -> None:
        self._dump = CompactionDump(
            self.shard.shard_id,
            self.core,
            self._applier,
            raft_dir,
            on_broken=self._on_broken,
            on_snapshot_installed=self._on_snapshot_installed,
            journal=lambda: self._sync_obj._SyncObj__raftLog,  # pinned pysyncobj: no accessor
            durable=options.durability is Durability.POWER_LOSS,
        )
        # Before the Raft group, which asks it at every apply.
        self._group_commit = GroupCommit(self.shard.shard_id, self._propose, self._translate_answer)
        loop = self._raft.loop
        partners = [
            Node(replica.node_id) for replica in self.shard.replicas if replica.node_id != self.node_id
        ]
        transport = loop.new_transport(self.shard.shard_id, partners)
        self._sync_obj = _LedgerSyncObj(
            Node(self.node_id), partners, self._conf(raft_dir, options), transport, self._apply_entry
        )
        journal: AtomicTrimJournal = self._sync_obj._SyncObj__raftLog  # replica_journal.install()
        journal.durability = options.durability
        # The node's loop does the waiting and the waking for every group.
        _close_pipe_notifier(self._sync_obj._SyncObj__pipeNotifier)
        self._sync_obj._poller = _NoPoller()
        self._sync_obj._SyncObj__pipeNotifier = _LoopNotifier(lambda: loop.wake(self.shard.shard_id))
        self._transfer = LeadershipTransfer(
            self.shard.shard_id,
            self.node_id,
            run_on_loop=loop.call_soon,
            start_transfer=self._start_transfer,
            leader_node_id=self.leader_node_id,
            is_leader=self.is_leader,
        )
        self._preferred_healthy_since: float | None = None
        loop.add_group(transport, lambda: self._sync_obj.doTick(0.0), journal.needs_sync, journal.begin_sync)
        self._raft.add(self)

    def _start_transfer(self, target: Node | None, on_answer: Callable[[Any, int], None]) -> None:
        self._sync_obj.transferLeadership(target, callback=on_answer)

    def _compaction_interval_seconds(self, options: ReplicaOptions) -> float:
        """The interval stretched by up to COMPACTION_INTERVAL_SPREAD by where the shard's keys
        start. PySyncObj aligns each group's compactions to multiples of its interval, so with
        one interval for all, every shard of a node dumped its whole state in the same minute;
        a dump of a shard of a million transactions costs seconds of CPU."""
        position = self.shard.lower_bound / (SHARD_KEY_MAX + 1)
        return options.log_compaction_min_seconds * (1 + COMPACTION_INTERVAL_SPREAD * position)

    def _conf(self, raft_dir: Path, options: ReplicaOptions) -> SyncObjConf:
        return SyncObjConf(
            # The node's Raft loop ticks the group: applies, heartbeats, elections.
            autoTick=False,
            commandsQueueSize=COMMANDS_QUEUE_SIZE_MAX,
            raftMinTimeout=RAFT_MIN_TIMEOUT_SECONDS,
            raftMaxTimeout=RAFT_MAX_TIMEOUT_SECONDS,
            appendEntriesPeriod=APPEND_ENTRIES_PERIOD_SECONDS,
            leaderFallbackTimeout=LEADER_FALLBACK_TIMEOUT_SECONDS,
            # Each proposal is sent to followers at once (sub-millisecond sequential writes);
            # group commit already gathers concurrent writes into one entry.
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=APPEND_ENTRIES_BATCH_BYTES_MAX,
            logCompactionMinEntries=options.log_compaction_min_entries,
            logCompactionMinTime=self._compaction_interval_seconds(options),
            # Each replica compacts on its own schedule, writing its dump in the background.
            logCompactionSplit=False,
            logCompactionBatchSize=SNAPSHOT_TRANSFER_BATCH_BYTES,
            # Without a leader, fail fast (UNAVAILABLE) instead of queueing writes unseen.
            commandsWaitLeader=False,
            # Durable log (the default keeps it in memory only) and the compaction dump.
            journalFile=str(raft_dir / "journal"),
            fullDumpFile=str(raft_dir / "dump"),
            # Our own serializer writes the LMDB snapshot stream instead of pickling this object,
            # and it also turns off PySyncObj's fork.
            serializer=self._dump.write,
            deserializer=self._dump.read,
            serializeChecker=self._dump.progress,
            useFork=False,
            # Membership is the config file's; no runtime changes.
            dynamicMembershipChange=False,
            onReady=None,
            # Raft answers no proposal of a term this replica stopped leading in until (and
            # unless) the entry is applied here later; its writers must not wait for that.
            onStateChanged=self._on_raft_state_changed,
            onCodeVersionChanged=None,
        )

    # -- the log -------------------------------------------------------------------------------

    def _propose(self, entry: bytes, on_answer: Callable[[Any, int], None]) -> None:
        def answered(result: Any, error: int) -> None:
            # On the Raft loop: the entry committed; its answer comes once the applier has it.
            if error == _ANSWER_SUCCESS:
                self._note_acknowledging_term()
            if isinstance(result, PendingApply):
                result.when_applied(lambda applied: on_answer(applied, error))
            else:
                on_answer(result, error)

        self._sync_obj._applyCommand(entry, answered, _COMMAND_TYPE.REGULAR)

    def _note_acknowledging_term(self) -> None:
        """Log the first commit this replica saw as leader in each term (the nemesis checks that
        no two replicas of a shard did so in one term). Only on the Raft loop, the one thread
        that changes the term and the state: elsewhere a new term can be read while the state
        still says leader."""
        term = int(self._sync_obj.raftCurrentTerm)
        if term != self._acknowledging_term and self.is_leader():
            self._acknowledging_term = term
            logger.info(ACKNOWLEDGING_TERM_LOG, self.shard.shard_id, term, self.node_id)

    def _apply_entry(self, command: bytes, index: int) -> PendingApply | None:
        """On the Raft loop, for each committed entry in log order."""
        try:
            kind = command[0] if command else None
            if kind == _COMMAND_TYPE.NO_OP:
                return None  # a new leader's first entry
            if kind != _COMMAND_TYPE.REGULAR:
                raise ReplicaBrokenError(f"log entry {index} has command type {kind!r}")
            envelope = command[1:]
            if envelope[:1] == _PICKLE_PROTOCOL_MARKER:
                envelope = _first_wave_envelope(envelope)
            return self._applier.apply(envelope, index, answering=self._group_commit.has_proposal_in_flight())
        except BaseException as error:  # an apply that raises would be retried forever
            self._on_broken(error)

    def _on_raft_state_changed(self, old_state: int, new_state: int) -> None:
        if new_state == _RAFT_STATE.LEADER:
            # Tests read these lines: no two replicas may lead one shard in the same term.
            logger.info(
                "shard %s: %s leads in term %d",
                self.shard.shard_id,
                self.node_id,
                self._sync_obj.raftCurrentTerm,
            )
        if old_state == _RAFT_STATE.LEADER and new_state != _RAFT_STATE.LEADER:
            self._group_commit.fail_in_flight("this replica stopped leading with the write in flight")

    def _on_snapshot_installed(self) -> None:
        self._group_commit.fail_in_flight("a snapshot from the leader replaced the log past the write")

    # -- requests ------------------------------------------------------------------------------

    def leader_node_id(self) -> str | None:
        leader = self._sync_obj._getLeader()
        return None if leader is None else str(leader.id)

    def is_leader(self) -> bool:
        return bool(self._sync_obj._isLeader())

    def _require_leader(self) -> None:
        if not self.is_leader():
            leader = self.leader_node_id()
            raise NotLeaderError(
                f"node {self.node_id} does not lead shard {self.shard.shard_id}"
                + (f"; node {leader} does" if leader else "; no leader is known"),
                leader,
            )

    def submit(self, command: bytes, timeout_seconds: float) -> core_pb2.CommandResult:
        """Propose `command` and wait (blocking) until this leader applied it; for tools that
        run without an event loop. Errors as `submit_async`."""
        self._require_leader()
        answered = threading.Event()
        answers: list[Answer | LedgerError] = []

        def on_answer(answer: Answer | LedgerError) -> None:
            answers.append(answer)
            answered.set()

        waiter = self._group_commit.submit(command, Deadline.after(timeout_seconds), (), on_answer)
        if not answered.wait(timeout_seconds):
            raise self._group_commit.withdraw(waiter)
        if isinstance(answers[0], LedgerError):
            raise answers[0]
        return answers[0].result

    async def submit_async(
        self, command: bytes, deadline: Deadline, item_budgets_us: Sequence[int] = ()
    ) -> Answer:
        """Propose `command` and wait until this (leader) replica applied it, at most until
        `deadline`; a batch's items each until their own budget runs out.

        Raises NotLeaderError / QueueFullError / ProposalDeniedError / BackendTimeoutError
        when the command was not appended, UnknownOutcomeError when it was but its fate is
        unknown (it may still commit), and ValueError for budgets that do not fit the
        command."""
        self._require_leader()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer | LedgerError] = loop.create_future()

        def on_answer(outcome: Answer | LedgerError) -> None:
            loop.call_soon_threadsafe(_resolve, answer, outcome)

        waiter = self._group_commit.submit(command, deadline, item_budgets_us, on_answer)
        try:
            async with asyncio.timeout_at(deadline.monotonic_seconds):
                outcome = await answer
        except TimeoutError:
            raise self._group_commit.withdraw(waiter) from None
        except asyncio.CancelledError:
            # The call went away (its caller's deadline, a cancel, the server stopping): a
            # write not yet proposed must not be proposed for nobody.
            self._group_commit.withdraw(waiter)
            raise
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    def _translate_answer(self, result: Any, error: int) -> core_pb2.CommandResult | LedgerError:
        """A PySyncObj answer to one proposal: its result, or the error to raise."""
        if error == _ANSWER_SUCCESS:
            if not isinstance(result, core_pb2.CommandResult):
                return UnknownOutcomeError(f"applied, but answered with {type(result).__name__}")
            return result
        if error in _NOT_APPLIED:
            if error in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER):
                return NotLeaderError(_NOT_APPLIED[error], self.leader_node_id())
            if error == FAIL_REASON.QUEUE_FULL:
                return QueueFullError(_NOT_APPLIED[error])
            return ProposalDeniedError(_NOT_APPLIED[error])
        return UnknownOutcomeError(f"proposal ended with PySyncObj reason {error}; it may still commit")

    async def read(
        self, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult:
        self._require_leader()
        if consistent:
            # A no-op through the log: once it is applied here, so is every write acknowledged
            # before this read started, and this replica was leader when it committed.
            await self.submit_async(commands.noop(), deadline)
        return self.core.read(query)

    def transfer_leadership(self, target_node_id: str | None, timeout_seconds: float) -> str:
        """Hand this shard's leadership to `target_node_id` (None: the most caught-up connected
        follower) with Raft's TimeoutNow, and wait until another replica leads. Returns the new
        leader's node id: usually the target, but when another follower's election timer fires
        in the same moment that one may win instead.

        The target must have the leader's whole log; under write load it rarely has at the
        instant of asking, so a denied request is asked again until the deadline (writes wait
        meanwhile). Raises NotLeaderError when this replica does not lead,
        LeadershipTransferDeniedError when the target never caught up in time (nothing
        changed), and LeadershipTransferIncompleteError when no other leader was seen within
        the timeout."""
        self._require_leader()
        target = None
        if target_node_id is not None:
            partners = {replica.node_id for replica in self.shard.replicas} - {self.node_id}
            if target_node_id not in partners:
                raise ValueError(f"{target_node_id!r} is not another replica of shard {self.shard.shard_id}")
            target = Node(target_node_id)
        deadline = time.monotonic() + timeout_seconds
        with self._group_commit.held():
            return self._transfer.run(target, deadline, timeout_seconds)

    def hand_back_leadership(self) -> None:
        """Called every LEADER_BALANCE_PERIOD_SECONDS: while this replica leads a shard whose
        preferred leader is another replica, hand the shard back once that replica has been
        connected and caught up for PREFERRED_HEALTHY_SECONDS."""
        preferred = self.shard.preferred_leader
        if preferred == self.node_id or not self.is_leader():
            self._preferred_healthy_since = None
            return
        now = time.monotonic()
        if not self._preferred_caught_up(preferred):
            self._preferred_healthy_since = None
            return
        if self._preferred_healthy_since is None:
            self._preferred_healthy_since = now
        if now - self._preferred_healthy_since < PREFERRED_HEALTHY_SECONDS:
            return
        # A hand-back holds this shard's writes while it runs; after one that failed, wait as
        # long again before the next.
        self._preferred_healthy_since = now
        new_leader = self.transfer_leadership(preferred, HAND_BACK_TIMEOUT_SECONDS)
        logger.info("shard %s: leadership handed back to %s", self.shard.shard_id, new_leader)

    def _preferred_caught_up(self, preferred: str) -> bool:
        node = Node(preferred)
        if not self._sync_obj.isNodeConnected(node):
            return False
        match_index = dict(self._sync_obj._SyncObj__raftMatchIndex).get(node, 0)  # pinned pysyncobj
        return bool(match_index >= self._sync_obj.raftCommitIndex)

    def hand_off_leadership(self) -> None:
        """Give this shard's leadership to another replica before the node stops."""
        try:
            new_leader = self.transfer_leadership(None, HAND_OFF_TIMEOUT_SECONDS)
            logger.info("shard %s: leadership handed off to %s", self.shard.shard_id, new_leader)
        except (LeadershipTransferDeniedError, LeadershipTransferIncompleteError, NotLeaderError) as error:
            logger.info("shard %s: no hand-off before stopping: %s", self.shard.shard_id, error)

    def status(self) -> ReplicaStatus:
        sync_obj = self._sync_obj
        return ReplicaStatus(
            shard_id=self.shard.shard_id,
            node_id=self.node_id,
            is_leader=self.is_leader(),
            leader_node_id=self.leader_node_id() or "",
            term=int(sync_obj.raftCurrentTerm),
            commit_index=int(sync_obj.raftCommitIndex),
            last_applied=int(sync_obj.raftLastApplied),
            core_applied_index=self.core.applied_index(),
            has_quorum=bool(sync_obj.hasQuorum),
            log_entries=int(sync_obj._getRaftLogSize()),
        )

    @property
    def last_dump_stall_ms(self) -> float:
        return self._dump.last_dump_stall_ms

    def force_log_compaction(self) -> None:
        self._sync_obj.forceLogCompaction()

    def close(self) -> None:
        """After the node's Raft loop stopped: nothing ticks the group any more."""
        self._sync_obj.destroy()
        self._applier.close()
        self._dump.join()
        self.core.close()


def _check_journal_covers_state(raft_dir: Path, applied_index: int, shard_id: str) -> None:
    """The LMDB state must never be ahead of the Raft log: the core would take the entries it
    lacks for replays of ones it applied, and the replica would diverge silently. That happens
    when a journal lost its tail (deleted, or a power loss without fsync, as in
    `Durability.PROCESS_CRASH`). The log reaches as far as the journal or the compaction dump:
    a power loss right after a snapshot from the leader was restored can leave the journal from
    before it, which PySyncObj replaces with the dump's position at start-up."""
    if applied_index == 0:
        return
    journal_path = raft_dir / "journal"
    # Opened with this replica's own journal code, which also cuts a torn tail.
    journal = AtomicTrimJournal(str(journal_path)) if journal_path.is_file() else None
    try:
        last_index = int(journal[len(journal) - 1][1]) if journal is not None and len(journal) else 0
    finally:
        if journal is not None:
            journal._destroy()
    last_index = max(last_index, dump_raft_index(raft_dir / "dump"))
    if last_index < applied_index:
        raise ReplicaBrokenError(
            f"shard {shard_id}: the stored state is at log index {applied_index} but the Raft "
            f"journal ends at {last_index}; this replica must be rebuilt from the others "
            "(stop the node, delete its replicas/ and raft/ directories for this shard, restart)"
        )


def _resolve(future: asyncio.Future[Answer | LedgerError], outcome: Answer | LedgerError) -> None:
    if not future.done():  # a caller that stopped waiting cancelled it
        future.set_result(outcome)
