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

Only the replica layer uses this module (it subclasses PySyncObj's journal)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysyncobj.syncobj
from pysyncobj import journal as pysyncobj_journal

from ledger_cluster.storage import fsync_directory

TRIM_SUFFIX = ".trim"
# The steps of a trim, in order, each reported to `after_step` (tests kill the process there).
TRIM_STEPS = ("written", "synced", "renamed", "directory-synced")


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
        # FileJournal's state is name-mangled private: reached through the instance dicts.
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
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
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


def create_journal(journal_file: str | None = None) -> Any:
    """PySyncObj's `createJournal`, with this module's file journal."""
    if journal_file:
        return AtomicTrimJournal(journal_file)
    return pysyncobj_journal.MemoryJournal()


def install() -> None:
    """Make every SyncObj created from here on use `create_journal` (PySyncObj 0.3.x builds its
    journal in `SyncObj.__init__` from the module's `createJournal`, with no option for it)."""
    pysyncobj.syncobj.createJournal = create_journal
