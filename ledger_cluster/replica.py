"""One shard replica: a PySyncObj Raft group member driving an AccountsCore. The only module
that imports pysyncobj.

The replicated method takes one `bytes` argument, the encoded CommandEnvelope; the index of the
entry being applied is `raftLastApplied + 1`, which the core stores with its effects, so the
journal replay after every restart is skipped entry by entry (exactly once). Log compaction
writes the core's snapshot stream (DESIGN §3) through our own serializer, with the Raft position
(the last two log entries) in its checksummed metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.journal import createJournal
from pysyncobj.syncobj import _RAFT_STATE

from ledger_cluster import metrics
from ledger_cluster.api.v1 import core_pb2
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
    SnapshotError,
    UnknownOutcomeError,
)
from ledger_cluster.group_commit import Answer, GroupCommit
from ledger_cluster.process import stop_broken_process
from ledger_cluster.storage import fsync_directory, make_private_directory, read_snapshot_header

logger = logging.getLogger(__name__)

# Raft timing. Elections start after 0.4-1.4 s without a heartbeat (PySyncObj's defaults, which
# it requires to exceed 3 heartbeat periods); heartbeats every 0.1 s.
RAFT_MIN_TIMEOUT_SECONDS = 0.4
RAFT_MAX_TIMEOUT_SECONDS = 1.4
APPEND_ENTRIES_PERIOD_SECONDS = 0.1
# A leader that hears from no majority for this long steps down, so a partitioned old leader
# stops taking writes within seconds instead of the default 30 s.
LEADER_FALLBACK_TIMEOUT_SECONDS = 3.0
CONNECTION_TIMEOUT_SECONDS = 3.5
CONNECTION_RETRY_SECONDS = 1.0
AUTO_TICK_PERIOD_SECONDS = 0.05
# Bounded queue of proposals waiting for the tick thread; beyond it, RESOURCE_EXHAUSTED.
COMMANDS_QUEUE_SIZE_MAX = 10_000
APPEND_ENTRIES_BATCH_BYTES_MAX = 2**16
SNAPSHOT_TRANSFER_BATCH_BYTES = 2**20
LOG_COMPACTION_MIN_ENTRIES_DEFAULT = 50_000
LOG_COMPACTION_MIN_SECONDS_DEFAULT = 600.0
BIND_RETRY_SECONDS = 0.5
SOCKET_BUFFER_BYTES = 2**16
DNS_CACHE_SECONDS = 600.0
DNS_FAILURE_CACHE_SECONDS = 30.0
TCP_KEEPALIVE = (16, 3, 5)
BIND_RETRIES_MAX = 20
RAFT_PASSWORD_ENVIRONMENT_VARIABLE = "LEDGER_RAFT_PASSWORD"
RAFT_POSITION_FORMAT_VERSION = 1
# Work handed to the tick thread (PySyncObj's state is only safe to touch there); a transfer is
# the only such work, and an admin asks for one at a time.
TICK_TASKS_MAX = 16
# How often a leadership transfer checks whether the new leader has taken over.
TRANSFER_POLL_SECONDS = 0.02

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
    # Off: each proposal is sent to followers at once (sub-millisecond sequential writes);
    # on: proposals wait for the next heartbeat batch (~100 ms each). Measured in the README.
    append_entries_use_batch: bool = False
    log_compaction_min_entries: int = LOG_COMPACTION_MIN_ENTRIES_DEFAULT
    log_compaction_min_seconds: float = LOG_COMPACTION_MIN_SECONDS_DEFAULT


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


def _encode_entry(entry: Any) -> core_pb2.RaftEntry:
    command, index, term = entry
    return core_pb2.RaftEntry(command=bytes(command), index=int(index), term=int(term))


def _decode_entry(entry: core_pb2.RaftEntry) -> tuple[bytes, int, int]:
    return (entry.command, entry.index, entry.term)


class _LedgerSyncObj(SyncObj):  # type: ignore[misc]  # pysyncobj ships no type information
    def __init__(
        self,
        self_address: str,
        partner_addresses: list[str],
        conf: SyncObjConf,
        core: AccountsCore,
        *,
        on_broken: Callable[[BaseException], NoReturn],
        answers_awaited: Callable[[], bool],
    ) -> None:
        self._core = core
        self._on_broken = on_broken
        self._answers_awaited = answers_awaited
        # Before super().__init__, which starts the tick thread.
        self._tick_tasks: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=TICK_TASKS_MAX)
        super().__init__(self_address, partner_addresses, conf)

    def run_on_tick_thread(self, task: Callable[[], None]) -> None:
        """Run `task` on the tick thread before its next tick (raises queue.Full when
        TICK_TASKS_MAX tasks are already waiting)."""
        self._tick_tasks.put_nowait(task)

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N803  # PySyncObj's names
        while True:
            try:
                task = self._tick_tasks.get_nowait()
            except queue.Empty:
                break
            try:
                task()
            except Exception:
                logger.exception("a task on the tick thread failed")
        super()._onTick(timeToWait)

    @replicated  # type: ignore[untyped-decorator]
    def apply_command(self, command: bytes) -> core_pb2.CommandResult:
        # Runs on PySyncObj's tick thread for each committed entry, in log order. The result
        # goes to this process's callback only, so it is handed over as it is, unserialized.
        try:
            if not isinstance(command, bytes):
                raise ReplicaBrokenError(f"log entry carries {type(command).__name__}, not bytes")
            started_seconds = time.perf_counter()
            result = self._core.apply(command, self.raftLastApplied + 1, answering=self._answers_awaited())
            metrics.APPLY_LATENCY.observe(time.perf_counter() - started_seconds)
            return result
        except BaseException as error:  # an apply that raises would be retried forever
            self._on_broken(error)


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
        on_broken: Callable[[BaseException], NoReturn] = stop_broken_process,
    ) -> None:
        self.shard = shard
        self.node_id = node_id
        self._address_to_node = {
            f"{config.node(replica.node_id).raft_host}:{replica.raft_port}": replica.node_id
            for replica in shard.replicas
        }
        self_address = next(address for address, owner in self._address_to_node.items() if owner == node_id)
        partners = sorted(address for address in self._address_to_node if address != self_address)
        self.core = AccountsCore.open(
            data_dir / "replicas" / shard.shard_id, shard.lower_bound, shard.upper_bound
        )
        raft_dir = data_dir / "raft" / shard.shard_id
        make_private_directory(raft_dir)
        self._on_broken = on_broken
        try:
            _check_journal_covers_state(raft_dir / "journal", self.core.applied_index(), shard.shard_id)
        except BaseException:
            self.core.close()
            raise
        self._dump_path = raft_dir / "dump"
        self._next_dump_path = raft_dir / "dump.next"
        self._next_dump_path.unlink(missing_ok=True)  # an unfinished one from before a crash
        self._install_generation = 0
        self._dump_generation = 0
        self._dump_lock = threading.Lock()
        self._dump_state: int = SERIALIZER_STATE.NOT_SERIALIZING
        self._dump_thread: threading.Thread | None = None
        self.last_dump_stall_ms = 0.0
        # PySyncObj loads its dump on the first tick; a dump present now is our own, written
        # at a compaction before the restart (later loads are snapshots sent by the leader).
        self._startup_dump_pending = (raft_dir / "dump").is_file()
        conf = self._conf(raft_dir, self_address, options)
        # Before the Raft group, whose tick thread asks it at every apply.
        self._group_commit = GroupCommit(shard.shard_id, self._propose, self._translate_answer)
        self._sync_obj = _LedgerSyncObj(
            self_address,
            partners,
            conf,
            self.core,
            on_broken=on_broken,
            answers_awaited=self._group_commit.has_proposal_in_flight,
        )

    def _propose(self, entry: bytes, on_answer: Callable[[Any, int], None]) -> None:
        self._sync_obj.apply_command(entry, callback=on_answer)

    def _conf(self, raft_dir: Path, self_address: str, options: ReplicaOptions) -> SyncObjConf:
        return SyncObjConf(
            # Encrypts and authenticates Raft traffic (Fernet); without it any peer that can
            # connect sends pickles that this process unpickles.
            password=options.raft_password,
            # PySyncObj's own thread ticks the group: applies, heartbeats, elections.
            autoTick=True,
            autoTickPeriod=AUTO_TICK_PERIOD_SECONDS,
            commandsQueueSize=COMMANDS_QUEUE_SIZE_MAX,
            raftMinTimeout=RAFT_MIN_TIMEOUT_SECONDS,
            raftMaxTimeout=RAFT_MAX_TIMEOUT_SECONDS,
            appendEntriesPeriod=APPEND_ENTRIES_PERIOD_SECONDS,
            connectionTimeout=CONNECTION_TIMEOUT_SECONDS,
            # Reconnect to a restarted peer within a second, not the default five.
            connectionRetryTime=CONNECTION_RETRY_SECONDS,
            leaderFallbackTimeout=LEADER_FALLBACK_TIMEOUT_SECONDS,
            appendEntriesUseBatch=options.append_entries_use_batch,
            appendEntriesBatchSizeBytes=APPEND_ENTRIES_BATCH_BYTES_MAX,
            # Bind exactly the configured host:port, never a wildcard.
            bindAddress=self_address,
            preferredAddrType="ipv4",
            # epoll where available.
            pollerType="auto",
            sendBufferSize=SOCKET_BUFFER_BYTES,
            recvBufferSize=SOCKET_BUFFER_BYTES,
            # Peers are configured as addresses; cached name lookups only matter for host names.
            dnsCacheTime=DNS_CACHE_SECONDS,
            dnsFailCacheTime=DNS_FAILURE_CACHE_SECONDS,
            # Detect a silently dead peer connection (seconds idle, probe interval, probes).
            tcp_keepalive=TCP_KEEPALIVE,
            logCompactionMinEntries=options.log_compaction_min_entries,
            logCompactionMinTime=options.log_compaction_min_seconds,
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
            serializer=self._write_dump,
            deserializer=self._read_dump,
            serializeChecker=self._dump_progress,
            useFork=False,
            bindRetryTime=BIND_RETRY_SECONDS,
            maxBindRetries=BIND_RETRIES_MAX,
            # Membership is the config file's; no runtime changes.
            dynamicMembershipChange=False,
            onReady=None,
            # Raft answers no proposal of a term this replica stopped leading in until (and
            # unless) the entry is applied here later; its writers must not wait for that.
            onStateChanged=self._on_raft_state_changed,
            onCodeVersionChanged=None,
        )

    def _on_raft_state_changed(self, old_state: int, new_state: int) -> None:
        if old_state == _RAFT_STATE.LEADER and new_state != _RAFT_STATE.LEADER:
            self._group_commit.fail_in_flight("this replica stopped leading with the write in flight")

    # -- log compaction ------------------------------------------------------------------------

    def _write_dump(self, path: str, raft_data: Any) -> None:
        """PySyncObj calls this on its tick thread, which also sends heartbeats: only the read
        view is opened here (instant, and exactly at the applied index PySyncObj names); the
        records are streamed to the dump by a background thread, and `_dump_progress` tells
        PySyncObj when it is done, so the journal is truncated only after the dump is durable.

        The background thread writes (and fsyncs) a separate file; `_dump_progress`, on the
        tick thread, renames it over the dump only if no snapshot from the leader was installed
        meanwhile (that one is newer). PySyncObj's own rename of `path`, its temp name, finds no
        file and fails harmlessly; the checker's answer is what counts. Any failure here is
        reported as FAILED once, which also resets PySyncObj's serializer."""
        last_entry, previous_entry, _cluster = raft_data
        try:
            # A temp file left by a crash would otherwise be renamed over the dump.
            Path(path).unlink(missing_ok=True)
            self._start_dump(last_entry, previous_entry)
        except BaseException:
            with self._dump_lock:
                self._dump_state = SERIALIZER_STATE.FAILED  # report once, so PySyncObj resets
            raise

    def _start_dump(self, last_entry: Any, previous_entry: Any) -> None:
        applied_index = self.core.applied_index()
        if applied_index > int(last_entry[1]):
            # Still replaying the journal after a restart: the state is ahead of the Raft
            # position, and a replica restored from such a dump would hold state its log does
            # not reach. PySyncObj tries again on a later tick.
            raise SnapshotError(
                f"shard {self.shard.shard_id}: compaction deferred while replaying"
                f" (state at {applied_index}, raft at {last_entry[1]})"
            )
        if self._dump_thread is not None and self._dump_thread.is_alive():
            raise SnapshotError(f"shard {self.shard.shard_id}: the previous dump is still being written")
        position = core_pb2.RaftPosition(
            format_version=RAFT_POSITION_FORMAT_VERSION,
            last_entry=_encode_entry(last_entry),
            previous_entry=_encode_entry(previous_entry),
        )
        view_open = threading.Event()
        with self._dump_lock:
            self._dump_state = SERIALIZER_STATE.SERIALIZING
            self._dump_generation = self._install_generation
        self._dump_thread = threading.Thread(
            target=self._write_dump_in_background,
            args=(position, view_open),
            name=f"dump-{self.shard.shard_id}",
            daemon=True,
        )
        started_seconds = time.monotonic()
        self._dump_thread.start()
        # Applies run on this thread: until the view is open, none may happen.
        view_open.wait()
        self.last_dump_stall_ms = (time.monotonic() - started_seconds) * 1000

    def _write_dump_in_background(self, position: core_pb2.RaftPosition, view_open: threading.Event) -> None:
        state = SERIALIZER_STATE.FAILED
        started_seconds = time.monotonic()
        try:
            header = self.core.write_snapshot(
                self._next_dump_path,
                metadata=position.SerializeToString(),
                on_view_open=lambda applied_index: view_open.set(),
            )
            state = SERIALIZER_STATE.SUCCESS
            logger.info(
                "shard %s: snapshot at applied index %d, raft index %d, %d records in %.0f ms"
                " (tick thread held %.1f ms)",
                self.shard.shard_id,
                header.applied_index,
                position.last_entry.index,
                header.record_count,
                (time.monotonic() - started_seconds) * 1000,
                self.last_dump_stall_ms,
            )
        except Exception:
            logger.exception("shard %s: writing the compaction dump failed", self.shard.shard_id)
        finally:
            view_open.set()
            with self._dump_lock:
                self._dump_state = state

    def _dump_progress(self) -> int:
        """PySyncObj's serializeChecker, on the tick thread: SERIALIZING while the background
        dump runs, then SUCCESS or FAILED exactly once, then NOT_SERIALIZING."""
        with self._dump_lock:
            state = self._dump_state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._dump_state = SERIALIZER_STATE.NOT_SERIALIZING
            superseded = self._install_generation != self._dump_generation
        if state == SERIALIZER_STATE.SUCCESS:
            state = self._publish_dump(superseded)
        return int(state)

    def _publish_dump(self, superseded: bool) -> int:
        if superseded:
            # The leader's snapshot, installed while ours was written, is newer: keep it.
            logger.info("shard %s: dropping a dump older than the installed snapshot", self.shard.shard_id)
            self._next_dump_path.unlink(missing_ok=True)
            return int(SERIALIZER_STATE.FAILED)
        try:
            os.replace(self._next_dump_path, self._dump_path)
            fsync_directory(self._dump_path.parent)
        except OSError:
            logger.exception("shard %s: publishing the compaction dump failed", self.shard.shard_id)
            return int(SERIALIZER_STATE.FAILED)
        return int(SERIALIZER_STATE.SUCCESS)

    def _read_dump(self, path: str) -> tuple[Any, Any, Any]:
        """Called at start-up (our own dump) and when the leader sent a snapshot.

        PySyncObj swallows any exception from here and carries on with a replica that can
        never apply again, so every failure stops the process instead."""
        try:
            return self._load_dump(path)
        except BaseException as error:
            self._on_broken(error)

    def _load_dump(self, path: str) -> tuple[Any, Any, Any]:
        startup = self._startup_dump_pending
        self._startup_dump_pending = False
        if not startup:
            with self._dump_lock:
                self._install_generation += 1  # a dump of ours still being written is now stale
        header = read_snapshot_header(path)
        position = core_pb2.RaftPosition.FromString(header.metadata)
        if position.format_version != RAFT_POSITION_FORMAT_VERSION:
            raise ReplicaBrokenError(f"unknown raft position version {position.format_version}")
        local_index = self.core.applied_index()
        if local_index < header.applied_index:
            self.core.restore_snapshot(path)  # checks the checksum and every row
            logger.info(
                "shard %s: restored snapshot at applied index %d (was %d)",
                self.shard.shard_id,
                header.applied_index,
                local_index,
            )
        else:
            # The LMDB state is durable on its own and already at or past the dump; still,
            # trust nothing of a file that fails its checksum.
            self.core.check_snapshot(path)
        last_entry = _decode_entry(position.last_entry)
        previous_entry = _decode_entry(position.previous_entry)
        if startup:
            kept = self._journal_start_if_it_holds(last_entry)
            if kept is not None:
                return kept
        else:
            # PySyncObj never answers a proposal whose index the snapshot skipped.
            self._group_commit.fail_in_flight("a snapshot from the leader replaced the log past the write")
        return (last_entry, previous_entry, None)

    def _journal_start_if_it_holds(self, entry: tuple[bytes, int, int]) -> tuple[Any, Any, Any] | None:
        """PySyncObj truncates the journal one tick after the dump is written. A crash in between
        leaves a journal that still holds the dump's position but starts earlier, and PySyncObj
        would clear it down to the dump's two entries, dropping every later entry this replica
        had acknowledged. Answering with the journal's own first two entries keeps it whole."""
        journal = self._sync_obj._SyncObj__raftLog  # pinned pysyncobj 0.3.17: no public accessor
        if len(journal) < 2:
            return None
        first_index = int(journal[0][1])
        offset = entry[1] - first_index
        if 0 <= offset < len(journal) and tuple(journal[offset]) == entry:
            logger.info(
                "shard %s: journal not yet truncated after the last dump; keeping it from index %d",
                self.shard.shard_id,
                first_index,
            )
            return (tuple(journal[1]), tuple(journal[0]), None)
        return None

    # -- requests ------------------------------------------------------------------------------

    def leader_node_id(self) -> str | None:
        leader = self._sync_obj._getLeader()
        return None if leader is None else self._address_to_node.get(str(leader.address))

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
        instant of asking, so a denied request is asked again until the deadline. Raises
        NotLeaderError when this replica does not lead, LeadershipTransferDeniedError when the
        target never caught up in time (nothing changed), and LeadershipTransferIncompleteError
        when no other leader was seen within the timeout."""
        self._require_leader()
        target_address = None
        if target_node_id is not None:
            addresses = [
                address for address, owner in self._address_to_node.items() if owner == target_node_id
            ]
            if not addresses or target_node_id == self.node_id:
                raise ValueError(f"{target_node_id!r} is not another replica of shard {self.shard.shard_id}")
            target_address = addresses[0]
        deadline = time.monotonic() + timeout_seconds
        with self._group_commit.held():
            return self._transfer(target_address, deadline, timeout_seconds)

    def _transfer(self, target_address: str | None, deadline: float, timeout_seconds: float) -> str:
        while True:
            answer = self._request_transfer(target_address, deadline)
            if answer == _ANSWER_SUCCESS:
                return self._wait_new_leader(deadline)
            if answer == FAIL_REASON.NOT_LEADER:
                raise NotLeaderError(
                    f"node {self.node_id} stopped leading shard {self.shard.shard_id}", self.leader_node_id()
                )
            if time.monotonic() + TRANSFER_POLL_SECONDS >= deadline:
                raise LeadershipTransferDeniedError(
                    f"shard {self.shard.shard_id}: the target is not connected or did not catch up with"
                    f" the leader's log within {timeout_seconds:.1f} s; nothing changed"
                )
            time.sleep(TRANSFER_POLL_SECONDS)

    def _request_transfer(self, target_address: str | None, deadline: float) -> int:
        """One TimeoutNow request, made on the tick thread; PySyncObj's answer code."""
        answered = threading.Event()
        answer: list[int] = []
        abandoned = threading.Event()

        def on_answer(_result: Any, error: int) -> None:
            answer.append(error)
            answered.set()

        def transfer() -> None:
            # A caller that stopped waiting was told "incomplete": it must not happen later.
            if abandoned.is_set():
                return
            try:
                self._sync_obj.transferLeadership(target_address, callback=on_answer)
            except Exception:
                on_answer(None, FAIL_REASON.REQUEST_DENIED)
                raise

        try:
            self._sync_obj.run_on_tick_thread(transfer)
        except queue.Full:
            raise QueueFullError("too many leadership transfers are waiting") from None
        if not answered.wait(max(deadline - time.monotonic(), 0.0)):
            abandoned.set()
            raise LeadershipTransferIncompleteError(
                f"shard {self.shard.shard_id}: no answer from the Raft group"
            )
        return answer[0]

    def _wait_new_leader(self, deadline: float) -> str:
        while True:
            leader = self.leader_node_id()
            if leader is not None and leader != self.node_id and not self.is_leader():
                return leader
            if time.monotonic() >= deadline:
                raise LeadershipTransferIncompleteError(
                    f"shard {self.shard.shard_id}: the target was asked to take over, but the leader"
                    f" is still {leader or 'unknown'}; the election may still finish"
                )
            time.sleep(TRANSFER_POLL_SECONDS)

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

    def wait_bound(self) -> None:
        self._sync_obj.waitBinded()

    def force_log_compaction(self) -> None:
        self._sync_obj.forceLogCompaction()

    def close(self) -> None:
        self._sync_obj.destroy_synchronous()
        if self._dump_thread is not None:
            self._dump_thread.join()  # its read view must close before the environment does
        self.core.close()


def _check_journal_covers_state(journal_path: Path, applied_index: int, shard_id: str) -> None:
    """The LMDB state must never be ahead of the Raft log: the core would take the entries it
    lacks for replays of ones it applied, and the replica would diverge silently. That happens
    when a journal lost its tail (deleted, or a power loss before the OS wrote it back)."""
    if applied_index == 0:
        return
    journal = createJournal(str(journal_path)) if journal_path.is_file() else None
    try:
        last_index = int(journal[len(journal) - 1][1]) if journal is not None and len(journal) else 0
    finally:
        if journal is not None:
            journal._destroy()
    if last_index < applied_index:
        raise ReplicaBrokenError(
            f"shard {shard_id}: the stored state is at log index {applied_index} but the Raft "
            f"journal ends at {last_index}; this replica must be rebuilt from the others "
            "(stop the node, delete its replicas/ and raft/ directories for this shard, restart)"
        )


def raft_password_from_environment() -> str | None:
    return os.environ.get(RAFT_PASSWORD_ENVIRONMENT_VARIABLE) or None


def _resolve(future: asyncio.Future[Answer | LedgerError], outcome: Answer | LedgerError) -> None:
    if not future.done():  # a caller that stopped waiting cancelled it
        future.set_result(outcome)
