"""The Raft journal file, with a trim that survives a crash at any step.

PySyncObj's `FileJournal.deleteEntriesTo` (called after every log compaction) clears the file
and re-adds the kept entries one at a time, moving the end-of-records mark after each: a crash
in the middle leaves a journal that holds only some of them (entries 1-10 trimmed to 6-10 and
killed after three re-adds reopen as 6-8). The replica then either refuses to start or
forgets entries it acknowledged.

This journal trims by writing the kept entries to a new file beside the old one, syncing it,
and renaming it over the old one (then syncing the directory). Before the rename the old
journal is whole; after it the new one is. The file format is PySyncObj's, so either journal
opens with the other's code.

Only the replica layer uses this module (it subclasses PySyncObj's journal)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysyncobj.syncobj
from pysyncobj import journal as pysyncobj_journal

from ledger_cluster.storage import fsync_directory

TRIM_SUFFIX = ".trim"
# The steps of a trim, in order, each reported to `after_step` (tests kill the process there).
TRIM_STEPS = ("written", "synced", "renamed", "directory-synced")
_RECORD_SIZE = struct.Struct("<I")
_RECORD_HEAD = struct.Struct("<QQ")


def _header(last_record_offset: int) -> bytes:
    name = pysyncobj_journal.APP_NAME
    version = pysyncobj_journal.APP_VERSION
    return bytes(
        name
        + b"\0" * (pysyncobj_journal.NAME_SIZE - len(name))
        + version
        + b"\0" * (pysyncobj_journal.VERSION_SIZE - len(version))
        + struct.pack("<II", pysyncobj_journal.JOURNAL_FORMAT_VERSION, last_record_offset)
    )


def _record(command: Any, index: int, term: int) -> bytes:
    data = _RECORD_HEAD.pack(index, term) + bytes(pysyncobj_journal.to_bytes(command))
    size = _RECORD_SIZE.pack(len(data))
    return size + data + size


class AtomicTrimJournal(pysyncobj_journal.FileJournal):  # type: ignore[misc]
    """PySyncObj's file journal whose trim replaces the file atomically."""

    # Called with each step's name as a trim passes it; a test's hook, None otherwise.
    after_step: Callable[[str], None] | None = None

    def __init__(self, journal_file: str) -> None:
        self._path = Path(journal_file)
        # A trim that crashed before its rename left its new file: the old journal is whole.
        self._path.with_name(self._path.name + TRIM_SUFFIX).unlink(missing_ok=True)
        super().__init__(journal_file)

    def _step(self, name: str) -> None:
        if self.after_step is not None:
            self.after_step(name)

    def deleteEntriesTo(self, entry_to: int) -> None:
        # FileJournal's state is name-mangled private: reached through the instance dict.
        state: dict[str, Any] = self.__dict__
        kept = list(state["_FileJournal__journal"][entry_to:])
        records = b"".join(_record(command, index, term) for command, index, term in kept)
        end = pysyncobj_journal.FIRST_RECORD_OFFSET + len(records)
        temporary = self._path.with_name(self._path.name + TRIM_SUFFIX)
        with open(temporary, "wb") as file:
            file.write(_header(end) + records)
            self._step("written")
            file.flush()
            os.fsync(file.fileno())
        self._step("synced")
        state["_FileJournal__journalFile"]._destroy()  # flushes and unmaps the old file
        os.replace(temporary, self._path)
        self._step("renamed")
        fsync_directory(self._path.parent)
        self._step("directory-synced")
        state["_FileJournal__journalFile"] = pysyncobj_journal.ResizableFile(
            str(self._path), defaultContent=_header(pysyncobj_journal.FIRST_RECORD_OFFSET)
        )
        state["_FileJournal__journal"] = kept
        state["_FileJournal__currentOffset"] = end


def create_journal(journal_file: str | None = None) -> Any:
    """PySyncObj's `createJournal`, with this module's file journal."""
    if journal_file:
        return AtomicTrimJournal(journal_file)
    return pysyncobj_journal.MemoryJournal()


def install() -> None:
    """Make every SyncObj created from here on use `create_journal` (PySyncObj 0.3.x builds its
    journal in `SyncObj.__init__` from the module's `createJournal`, with no option for it)."""
    pysyncobj.syncobj.createJournal = create_journal
