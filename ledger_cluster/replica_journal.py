"""The Raft journal file, with a trim that survives a crash at any step.

PySyncObj's `FileJournal.deleteEntriesTo` (called after every log compaction) clears the file
and re-adds the kept entries one at a time, moving the end-of-records mark after each: a crash
in the middle leaves a journal that holds only some of them (entries 1-10 trimmed to 6-10 and
killed after three re-adds reopen as 6-8). The replica then either refuses to start or
forgets entries it acknowledged.

This journal trims by writing the kept entries to a new file beside the old one (with
PySyncObj's own journal code), syncing it, and renaming it over the old one (then syncing the
directory). Before the rename the old
journal is whole; after it the new one is. The file format is PySyncObj's, so either journal
opens with the other's code.

Durability. PySyncObj writes the journal through a memory map and its meta (term, vote, commit
index) by rename, and fsyncs neither: a replica that loses power forgets what it appended and
whom it voted for. In `Durability.POWER_LOSS` (the default) this journal:
- stores its meta by writing a new file, fsyncing it, renaming it over the old one and fsyncing
  the directory, before `setCurrentTerm` returns: a vote or a candidacy is on disk before the
  message that announces it is even queued;
- counts the changes of its records (`add`, `clear`, `deleteEntriesFrom`) and fsyncs them
  through `begin_sync()`: the node's Raft loop begins a sync of every changed journal after a
  turn's frames went out and waits for it, and syncs whatever changed since, before the next
  ticks (raft_loop.py says why that is enough); a trim syncs its new file anyway.
In `Durability.PROCESS_CRASH` nothing is fsynced but the trim: every write survives kill -9 of
the process (the page cache keeps it), none is promised to survive a power loss.

A power loss can also leave a torn tail: the header's end-of-records mark written back without
some record pages it covers. Opening a journal keeps the longest run of whole, consecutive
records and moves the mark back to its end (none of the rest was synced, so none was
acknowledged).

Tests simulate power loss with `SYNCED_COPIES_ENVIRONMENT_VARIABLE`: each journal then keeps a
copy of what its last fsync made durable beside each file (`SYNCED_COPY_SUFFIX`), which a test
puts in place of the files after killing every node.

Only the replica layer uses this module (it subclasses PySyncObj's journal)."""

from __future__ import annotations

import enum
import logging
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysyncobj.syncobj
from pysyncobj import journal as pysyncobj_journal
from pysyncobj.pickle import dumps as pysyncobj_dumps
from pysyncobj.pickle import loads as pysyncobj_loads

from ledger_cluster.errors import ReplicaBrokenError
from ledger_cluster.storage import fsync_directory, fsync_file

logger = logging.getLogger(__name__)

TRIM_SUFFIX = ".trim"
META_SUFFIX = ".meta"
META_TEMPORARY_SUFFIX = ".tmp"
# The steps of a trim, in order, each reported to `after_step` (tests kill the process there).
TRIM_STEPS = ("written", "synced", "renamed", "directory-synced")
# Test-only: set to "1" in a node's environment to keep copies of what was last made durable.
SYNCED_COPIES_ENVIRONMENT_VARIABLE = "TEST_POWER_LOSS_SYNCED_COPIES"
SYNCED_COPY_SUFFIX = ".synced"
# PySyncObj's record: u32 size | u64 index | u64 term | command | u32 size (little-endian).
_RECORD_SIZE = struct.Struct("<I")
_RECORD_POSITION = struct.Struct("<QQ")


class Durability(enum.Enum):
    """What an acknowledged write survives."""

    # Power loss of every node at once: journal and meta are fsynced before anything relies on
    # them (etcd's, TigerBeetle's and PostgreSQL's promise).
    POWER_LOSS = "power-loss"
    # kill -9 of any or all processes, not a power loss or a kernel crash.
    PROCESS_CRASH = "process-crash"


def _keep_synced_copy(path: Path, content: bytes) -> None:
    """Test-only: `content` is what `path` now holds on disk for sure. Written whole and renamed,
    so a kill -9 in the middle leaves the previous copy (a power loss a moment earlier)."""
    copy = path.with_name(path.name + SYNCED_COPY_SUFFIX)
    temporary = copy.with_name(copy.name + META_TEMPORARY_SUFFIX)
    temporary.write_bytes(content)
    os.replace(temporary, copy)


class _MetaStorer(pysyncobj_journal.MetaStorer):  # type: ignore[misc]
    """PySyncObj's term, vote and commit index, stored by rename like PySyncObj's own; in
    power-loss mode the new file is fsynced before the rename and the directory after it, so
    the meta on disk is always a whole one, and the new one once `storeMeta` returns."""

    def __init__(self, path: str, journal: AtomicTrimJournal) -> None:
        super().__init__(path)
        self._path = Path(path)
        self._journal = journal

    def getMeta(self) -> dict[str, Any]:
        # PySyncObj's own reads an unreadable file as empty: term 0 and no vote, so the
        # replica could vote a second time in a term it already voted in.
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            meta: dict[str, Any] = pysyncobj_loads(data)
        except Exception as error:
            raise ReplicaBrokenError(f"the Raft meta {self._path} is unreadable: {error}") from error
        return meta

    def storeMeta(self, meta: dict[str, Any]) -> None:
        content = pysyncobj_dumps(meta)
        durable = self._journal.durability is Durability.POWER_LOSS
        temporary = self._path.with_name(self._path.name + META_TEMPORARY_SUFFIX)
        with open(temporary, "wb") as file:
            file.write(content)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temporary, self._path)
        if durable:
            fsync_directory(self._path.parent)
            if self._journal.keeps_synced_copies:
                _keep_synced_copy(self._path, content)


class AtomicTrimJournal(pysyncobj_journal.FileJournal):  # type: ignore[misc]
    """PySyncObj's file journal whose trim replaces the file atomically, and which fsyncs its
    records and meta as its `durability` asks."""

    # Called with each step's name as a trim passes it; a test's hook, None otherwise.
    after_step: Callable[[str], None] | None = None

    def __init__(self, journal_file: str, durability: Durability = Durability.POWER_LOSS) -> None:
        self._path = Path(journal_file)
        self.durability = durability
        self.keeps_synced_copies = os.environ.get(SYNCED_COPIES_ENVIRONMENT_VARIABLE) == "1"
        # A trim that crashed before its rename left its new file: the old journal is whole.
        self._path.with_name(self._path.name + TRIM_SUFFIX).unlink(missing_ok=True)
        # The file's name is durable once its directory is synced, at the first sync (it may
        # have been created without, in process-crash mode).
        self._directory_synced = False
        if self._path.is_file():
            _cut_torn_tail(self._path)
        meta_storer = _MetaStorer(journal_file + META_SUFFIX, self)
        meta = meta_storer.getMeta()  # before any file is opened: it may refuse
        with warnings.catch_warnings():
            # PySyncObj reads the meta (again) without closing the file it opened.
            warnings.simplefilter("ignore", ResourceWarning)
            super().__init__(journal_file)
        state: dict[str, Any] = self.__dict__
        state["_FileJournal__metaStorer"] = meta_storer
        state["_FileJournal__meta"] = meta
        # Changes made (by the thread that drives the group) and changes known durable; whatever
        # was on disk before this process may never have been fsynced.
        self._changes = 1
        self._synced_changes = 0

    def _step(self, name: str) -> None:
        if self.after_step is not None:
            self.after_step(name)

    # -- changes, each to be synced --------------------------------------------------------------

    def add(self, command: bytes, index: int, term: int) -> None:
        super().add(command, index, term)
        self._changes += 1

    def clear(self) -> None:
        super().clear()
        self._changes += 1

    def deleteEntriesFrom(self, entry_from: int) -> None:
        super().deleteEntriesFrom(entry_from)
        self._changes += 1

    def needs_sync(self) -> bool:
        """Records changed and not yet known durable (a sync begun may still be running), and
        this journal's durability syncs them."""
        return self._changes != self._synced_changes and self.durability is Durability.POWER_LOSS

    def sync(self) -> None:
        """Make every record change so far durable, now. Raises OSError as `begin_sync`'s call."""
        if self.needs_sync():
            self.begin_sync()()

    def begin_sync(self) -> Callable[[], None]:
        """Called by the thread that changes the journal: returns the call (for any thread, once,
        and before the next `begin_sync`) that makes the changes so far durable. The journal may
        change meanwhile; those changes wait for the next sync. An OSError from the call means
        the disk may have dropped them: the caller must stop the replica, never retry (a second
        fsync can succeed without the lost pages)."""
        changes = self._changes
        # Its own descriptor: the file object is closed and reopened when the map must grow.
        descriptor = os.dup(self._mapped_file().fileno())
        new_name = not self._directory_synced
        synced_copy = self._records() if self.keeps_synced_copies else None

        def finish() -> None:
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            if new_name:
                fsync_directory(self._path.parent)
                self._directory_synced = True
            self._synced_changes = changes
            if synced_copy is not None:
                _keep_synced_copy(self._path, synced_copy)

        return finish

    def _mapped_file(self) -> Any:
        # FileJournal's state is name-mangled private: reached through the instance dicts. The
        # ResizableFile reopens its file when the map cannot grow in place, so ask every time.
        journal_file = self.__dict__["_FileJournal__journalFile"]
        return journal_file.__dict__["_ResizableFile__f"]

    def _records(self) -> bytes:
        """The header and every record, as the file holds them now."""
        state: dict[str, Any] = self.__dict__
        return bytes(state["_FileJournal__journalFile"].read(0, state["_FileJournal__currentOffset"]))

    # -- the trim ----------------------------------------------------------------------------------

    def deleteEntriesTo(self, entry_to: int) -> None:
        state: dict[str, Any] = self.__dict__
        kept = list(state["_FileJournal__journal"][entry_to:])
        temporary = self._path.with_name(self._path.name + TRIM_SUFFIX)
        temporary.unlink(missing_ok=True)
        # The kept entries written by PySyncObj's own journal code, into a file of their own.
        trimmed = pysyncobj_journal.FileJournal(str(temporary))
        for entry in kept:
            trimmed.add(*entry)
        self._step("written")
        trimmed.flush()
        fsync_file(temporary)
        self._step("synced")
        state["_FileJournal__journalFile"]._destroy()  # flushes and unmaps the old file
        os.replace(temporary, self._path)
        self._step("renamed")
        fsync_directory(self._path.parent)
        self._step("directory-synced")
        # The new file stays mapped: it is the same file under the journal's name now.
        adopted: dict[str, Any] = trimmed.__dict__
        journal_file = adopted["_FileJournal__journalFile"]
        # It reopens by name when it cannot grow its map in place: the name is the journal's now.
        journal_file.__dict__["_ResizableFile__fileName"] = str(self._path)
        state["_FileJournal__journalFile"] = journal_file
        state["_FileJournal__currentOffset"] = adopted["_FileJournal__currentOffset"]
        state["_FileJournal__journal"] = kept
        # Everything the journal holds is in the file just synced.
        self._synced_changes = self._changes
        self._directory_synced = True
        if self.keeps_synced_copies:
            _keep_synced_copy(self._path, self._records())


def _cut_torn_tail(path: Path) -> None:
    """Move the end-of-records mark back to the end of the last whole record of a run of
    consecutive indices, if a power loss left it past that (see the module docstring)."""
    data = path.read_bytes()
    if len(data) < pysyncobj_journal.FIRST_RECORD_OFFSET:
        return  # PySyncObj rewrites a header it cannot read
    (mark,) = _RECORD_SIZE.unpack_from(data, pysyncobj_journal.LAST_RECORD_OFFSET_OFFSET)
    end = _whole_records_end(data, min(mark, len(data)))
    if end == mark:
        return
    logger.warning(
        "Raft journal %s: records end at byte %d, not at %d as its header says (a torn tail of "
        "writes never synced); keeping the whole records",
        path,
        end,
        mark,
    )
    with open(path, "r+b") as file:
        file.seek(pysyncobj_journal.LAST_RECORD_OFFSET_OFFSET)
        file.write(_RECORD_SIZE.pack(end))
        file.flush()
        os.fsync(file.fileno())


def _whole_records_end(data: bytes, limit: int) -> int:
    """The offset after the last record, up to `limit`, whose two size fields agree and whose
    index follows its predecessor's with a term no lower."""
    offset = int(pysyncobj_journal.FIRST_RECORD_OFFSET)
    previous: tuple[int, int] | None = None
    while offset + _RECORD_SIZE.size <= limit:
        size = int(_RECORD_SIZE.unpack_from(data, offset)[0])
        record_end = offset + 2 * _RECORD_SIZE.size + size
        if size < _RECORD_POSITION.size or record_end > limit:
            break
        (trailing_size,) = _RECORD_SIZE.unpack_from(data, record_end - _RECORD_SIZE.size)
        index, term = _RECORD_POSITION.unpack_from(data, offset + _RECORD_SIZE.size)
        if trailing_size != size or (
            previous is not None and (index != previous[0] + 1 or term < previous[1])
        ):
            break
        previous = (index, term)
        offset = record_end
    return offset


def create_journal(journal_file: str | None = None) -> Any:
    """PySyncObj's `createJournal`, with this module's file journal."""
    if journal_file:
        return AtomicTrimJournal(journal_file)
    return pysyncobj_journal.MemoryJournal()


def install() -> None:
    """Make every SyncObj created from here on use `create_journal` (PySyncObj 0.3.x builds its
    journal in `SyncObj.__init__` from the module's `createJournal`, with no option for it)."""
    pysyncobj.syncobj.createJournal = create_journal
