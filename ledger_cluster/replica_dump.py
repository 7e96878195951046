"""A shard replica's compaction dumps: PySyncObj's serializer, checker and deserializer for the
core's snapshot stream (DESIGN §3), with the Raft position (the last two log entries) in its
checksummed metadata. Used only by `replica`.

PySyncObj asks for a dump on the Raft loop, naming the applied entry it must hold. The read
view is opened on the shard's applier thread right after that entry is applied (so the dump
holds exactly it), the records are streamed to a file by a background thread, and the checker
tells PySyncObj when the file is durable: the journal is truncated only after that.

A snapshot sent by the leader is written by PySyncObj (closed and renamed, never fsynced); the
deserializer fsyncs it and its directory before it returns, because PySyncObj then replaces
the journal with the snapshot's two entries, and that journal may reach the disk first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from google.protobuf.message import DecodeError
from pysyncobj.config import SERIALIZER_STATE

from ledger_cluster.core import AccountsCore
from ledger_cluster.errors import ReplicaBrokenError, SnapshotError
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.replica_apply import ShardApplier
from ledger_cluster.storage import fsync_directory, fsync_file, read_snapshot_header

logger = logging.getLogger(__name__)

RAFT_POSITION_FORMAT_VERSION = 1
# A snapshot waiting for the applier to restore it is kept under this name (hard link + number).
PINNED_DUMP_PREFIX = "dump.installing."
Entry = tuple[bytes, int, int]


def _encode_entry(entry: Any) -> core_pb2.RaftEntry:
    command, index, term = entry
    return core_pb2.RaftEntry(command=bytes(command), index=int(index), term=int(term))


def _decode_entry(entry: core_pb2.RaftEntry) -> Entry:
    return (entry.command, entry.index, entry.term)


class CompactionDump:
    def __init__(
        self,
        shard_id: str,
        core: AccountsCore,
        applier: ShardApplier,
        raft_dir: Path,
        *,
        on_broken: Callable[[BaseException], NoReturn],
        on_snapshot_installed: Callable[[], None],
        journal: Callable[[], Sequence[Any]],
        durable: bool,
    ) -> None:
        self._shard_id = shard_id
        self._core = core
        self._applier = applier
        self._on_broken = on_broken
        self._on_snapshot_installed = on_snapshot_installed
        self._journal = journal
        self._durable = durable
        self.path = raft_dir / "dump"
        self._next_path = raft_dir / "dump.next"
        self._next_path.unlink(missing_ok=True)  # an unfinished one from before a crash
        self._pin_directory = raft_dir
        self._pins_made = 0
        for stale in raft_dir.glob(f"{PINNED_DUMP_PREFIX}*"):
            stale.unlink()  # pinned for an install a crash interrupted; the log brings it again
        self._install_generation = 0
        self._dump_generation = 0
        self._lock = threading.Lock()
        self._state: int = SERIALIZER_STATE.NOT_SERIALIZING
        self._thread: threading.Thread | None = None
        self.last_dump_stall_ms = 0.0
        # PySyncObj loads its dump on the first tick; a dump present now is our own, written
        # at a compaction before the restart (later loads are snapshots sent by the leader).
        self._startup_pending = self.path.is_file()

    # -- writing (PySyncObj's serializer and checker, on the Raft loop) ------------------------

    def write(self, path: str, raft_data: Any) -> None:
        """The background thread writes (and fsyncs) a separate file; `progress` renames it
        over the dump only if no snapshot from the leader was installed meanwhile (that one is
        newer). PySyncObj's own rename of `path`, its temp name, finds no file and fails
        harmlessly; the checker's answer is what counts. Any failure is reported as FAILED
        once, which also resets PySyncObj's serializer."""
        last_entry, previous_entry, _cluster = raft_data
        try:
            # A temp file left by a crash would otherwise be renamed over the dump.
            Path(path).unlink(missing_ok=True)
            if self._thread is not None and self._thread.is_alive():
                raise SnapshotError(f"shard {self._shard_id}: the previous dump is still being written")
            position = core_pb2.RaftPosition(
                format_version=RAFT_POSITION_FORMAT_VERSION,
                last_entry=_encode_entry(last_entry),
                previous_entry=_encode_entry(previous_entry),
            )
            with self._lock:
                self._state = SERIALIZER_STATE.SERIALIZING
                self._dump_generation = self._install_generation
            self._applier.after_applied(lambda: self._begin(position))
        except BaseException:
            self._finish(SERIALIZER_STATE.FAILED)  # report once, so PySyncObj resets
            raise

    def _begin(self, position: core_pb2.RaftPosition) -> None:
        """On the applier thread, right after the entry the dump must hold: open the view,
        then let the applier go on while a background thread writes the records."""
        try:
            applied_index = self._core.applied_index()
            if applied_index > position.last_entry.index:
                # Still replaying the journal after a restart: the state is ahead of the Raft
                # position, and a replica restored from such a dump would hold state its log
                # does not reach. PySyncObj tries again later.
                logger.info(
                    "shard %s: compaction deferred while replaying (state at %d, raft at %d)",
                    self._shard_id,
                    applied_index,
                    position.last_entry.index,
                )
                self._finish(SERIALIZER_STATE.FAILED)
                return
            view_open = threading.Event()
            self._thread = threading.Thread(
                target=self._write_in_background,
                args=(position, view_open),
                name=f"dump-{self._shard_id}",
                daemon=True,
            )
            started_seconds = time.monotonic()
            self._thread.start()
            view_open.wait()  # no apply may happen before the view is open
            self.last_dump_stall_ms = (time.monotonic() - started_seconds) * 1000
        except Exception:
            logger.exception("shard %s: starting the compaction dump failed", self._shard_id)
            self._finish(SERIALIZER_STATE.FAILED)

    def _write_in_background(self, position: core_pb2.RaftPosition, view_open: threading.Event) -> None:
        state = SERIALIZER_STATE.FAILED
        started_seconds = time.monotonic()
        try:
            header = self._core.write_snapshot(
                self._next_path,
                metadata=position.SerializeToString(),
                on_view_open=lambda applied_index: view_open.set(),
            )
            state = SERIALIZER_STATE.SUCCESS
            logger.info(
                "shard %s: snapshot at applied index %d, raft index %d, %d records in %.0f ms"
                " (applier held %.1f ms)",
                self._shard_id,
                header.applied_index,
                position.last_entry.index,
                header.record_count,
                (time.monotonic() - started_seconds) * 1000,
                self.last_dump_stall_ms,
            )
        except Exception:
            logger.exception("shard %s: writing the compaction dump failed", self._shard_id)
        finally:
            view_open.set()
            self._finish(state)

    def _finish(self, state: int) -> None:
        with self._lock:
            self._state = state

    def progress(self) -> int:
        """PySyncObj's serializeChecker: SERIALIZING while the dump is being written, then
        SUCCESS or FAILED exactly once, then NOT_SERIALIZING."""
        with self._lock:
            state = self._state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._state = SERIALIZER_STATE.NOT_SERIALIZING
            superseded = self._install_generation != self._dump_generation
        if state == SERIALIZER_STATE.SUCCESS:
            state = self._publish(superseded)
        return int(state)

    def _publish(self, superseded: bool) -> int:
        if superseded:
            # The leader's snapshot, installed while ours was written, is newer: keep it.
            logger.info("shard %s: dropping a dump older than the installed snapshot", self._shard_id)
            self._next_path.unlink(missing_ok=True)
            return int(SERIALIZER_STATE.FAILED)
        try:
            os.replace(self._next_path, self.path)
            fsync_directory(self.path.parent)
        except OSError:
            logger.exception("shard %s: publishing the compaction dump failed", self._shard_id)
            return int(SERIALIZER_STATE.FAILED)
        return int(SERIALIZER_STATE.SUCCESS)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()  # its read view must close before the environment does

    # -- loading (PySyncObj's deserializer, on the Raft loop) ----------------------------------

    def read(self, path: str) -> tuple[Any, Any, Any]:
        """Called at start-up (our own dump) and when the leader sent a snapshot.

        PySyncObj swallows any exception from here and carries on with a replica that can
        never apply again, so every failure stops the process instead."""
        try:
            return self._load(path)
        except BaseException as error:
            self._on_broken(error)

    def _load(self, path: str) -> tuple[Any, Any, Any]:
        startup = self._startup_pending
        self._startup_pending = False
        if not startup:
            with self._lock:
                self._install_generation += 1  # a dump of ours still being written is now stale
            if self._durable:
                fsync_file(Path(path))
                fsync_directory(Path(path).parent)
        header = read_snapshot_header(path)
        position = core_pb2.RaftPosition.FromString(header.metadata)
        if position.format_version != RAFT_POSITION_FORMAT_VERSION:
            raise ReplicaBrokenError(f"unknown raft position version {position.format_version}")
        # Restored on the applier, in log order: after the entries handed over before it (older
        # than the snapshot), before every later one. The Raft loop goes on ticking the node's
        # other groups meanwhile. The file is pinned: a later snapshot or dump may replace it.
        pinned = self._pin(path)
        self._applier.after_applied(lambda: self._install(pinned, header.applied_index))
        last_entry = _decode_entry(position.last_entry)
        previous_entry = _decode_entry(position.previous_entry)
        if startup:
            kept = self._journal_start_if_it_holds(last_entry)
            if kept is not None:
                return kept
        else:
            # PySyncObj never answers a proposal whose index the snapshot skipped.
            self._on_snapshot_installed()
        return (last_entry, previous_entry, None)

    def _pin(self, path: str) -> Path:
        self._pins_made += 1
        pinned = self._pin_directory / f"{PINNED_DUMP_PREFIX}{self._pins_made}"
        pinned.unlink(missing_ok=True)
        os.link(path, pinned)
        return pinned

    def _install(self, pinned: Path, snapshot_index: int) -> None:
        """On the applier thread (a failure here stops the process, as any apply's does)."""
        try:
            local_index = self._core.applied_index()
            if local_index < snapshot_index:
                self._core.restore_snapshot(pinned)  # checks the checksum and every row
                logger.info(
                    "shard %s: restored snapshot at applied index %d (was %d)",
                    self._shard_id,
                    snapshot_index,
                    local_index,
                )
            else:
                # The LMDB state is durable on its own and already at or past the dump; still,
                # trust nothing of a file that fails its checksum.
                self._core.check_snapshot(pinned)
        finally:
            pinned.unlink(missing_ok=True)

    def _journal_start_if_it_holds(self, entry: Entry) -> tuple[Any, Any, Any] | None:
        """PySyncObj truncates the journal one tick after the dump is written. A crash in between
        leaves a journal that still holds the dump's position but starts earlier, and PySyncObj
        would clear it down to the dump's two entries, dropping every later entry this replica
        had acknowledged. Answering with the journal's own first two entries keeps it whole."""
        journal = self._journal()
        if len(journal) < 2:
            return None
        first_index = int(journal[0][1])
        offset = entry[1] - first_index
        if 0 <= offset < len(journal) and tuple(journal[offset]) == entry:
            logger.info(
                "shard %s: journal not yet truncated after the last dump; keeping it from index %d",
                self._shard_id,
                first_index,
            )
            return (tuple(journal[1]), tuple(journal[0]), None)
        return None


def dump_raft_index(path: Path) -> int:
    """The Raft index of the last entry a compaction dump holds; 0 without a readable dump (the
    start-up's load of it says what is wrong with it)."""
    if not path.is_file():
        return 0
    try:
        position = core_pb2.RaftPosition.FromString(read_snapshot_header(path).metadata)
    except (SnapshotError, DecodeError):
        return 0
    return int(position.last_entry.index)
