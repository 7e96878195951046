"""The Raft journal's trim (after every log compaction) against a crash at every step: a real
process killed with SIGKILL right after each step of the trim leaves a journal that PySyncObj's
own code opens whole, either as it was or as trimmed, never with some kept entries missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pysyncobj.syncobj
import pytest
from pysyncobj.journal import FileJournal

from ledger_cluster import replica, replica_journal
from ledger_cluster.replica_journal import TRIM_STEPS, AtomicTrimJournal

ENTRIES = [(f"command-{index}".encode() * 20, index, 1 + index // 4) for index in range(1, 11)]
TRIM_TO = 5  # keep entries 6-10
CHILD_TIMEOUT_SECONDS = 30.0

# A child that opens the journal, kills itself right after `step` of a trim, and otherwise
# finishes the trim and adds one more entry.
_CHILD = f"""
import os, signal, sys
from ledger_cluster.replica_journal import AtomicTrimJournal
path, step = sys.argv[1], sys.argv[2]
def after(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
AtomicTrimJournal.after_step = staticmethod(after)
journal = AtomicTrimJournal(path)
journal.deleteEntriesTo({TRIM_TO})
journal.add(b"after-trim", 11, 3)
journal._destroy()
"""


def entries_of(path: Path) -> list[tuple[bytes, int, int]]:
    """The journal as PySyncObj's own file journal reads it."""
    journal = FileJournal(str(path))
    try:
        return [
            (bytes(command), index, term)
            for command, index, term in (journal[i] for i in range(len(journal)))
        ]
    finally:
        journal._destroy()


def written_journal(path: Path) -> Path:
    journal = FileJournal(str(path))
    for entry in ENTRIES:
        journal.add(*entry)
    journal._destroy()
    return path


def test_a_trim_keeps_the_entries_after_the_cut_and_appends_after_them(tmp_path: Path) -> None:
    path = written_journal(tmp_path / "journal")
    journal = AtomicTrimJournal(str(path))
    journal.deleteEntriesTo(TRIM_TO)
    assert [journal[i][1] for i in range(len(journal))] == [6, 7, 8, 9, 10]
    journal.add(b"more", 11, 3)
    journal._destroy()
    assert entries_of(path) == [*ENTRIES[TRIM_TO:], (b"more", 11, 3)]
    assert not (tmp_path / "journal.trim").exists()


@pytest.mark.parametrize("step", [*TRIM_STEPS, "never"])
def test_a_kill_at_any_step_of_a_trim_leaves_a_whole_journal(tmp_path: Path, step: str) -> None:
    path = written_journal(tmp_path / "journal")
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), step],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    killed = child.returncode == -signal.SIGKILL
    assert killed == (step != "never"), child.stderr.decode()
    found = entries_of(path)
    if step in ("written", "synced"):
        assert found == ENTRIES  # before the rename: the old journal, whole
    elif step == "never":
        assert found == [*ENTRIES[TRIM_TO:], (b"after-trim", 11, 3)]
    else:
        assert found == ENTRIES[TRIM_TO:]  # after the rename: the trimmed one, whole
    reopened = AtomicTrimJournal(str(path))  # and a replica opens it again, leftovers cleared
    assert len(reopened) == len(found)
    reopened._destroy()
    assert not (tmp_path / "journal.trim").exists()
    assert os.listdir(tmp_path) == ["journal"] or sorted(os.listdir(tmp_path)) == ["journal", "journal.meta"]


_PYSYNCOBJ_CHILD = f"""
import os, signal, sys
import pysyncobj.syncobj
from pysyncobj.journal import FileJournal
journal = FileJournal(sys.argv[1])
added = []
original_add = journal.add
def add(*entry):
    original_add(*entry)
    added.append(entry)
    if len(added) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
journal.add = add
journal.deleteEntriesTo({TRIM_TO})
"""


def test_pysyncobjs_own_trim_killed_midway_loses_kept_entries(tmp_path: Path) -> None:
    """Why the journal above exists: the library's trim, killed after three re-adds, reopens
    with two of the five kept entries missing (the scenario the test above rules out)."""
    path = written_journal(tmp_path / "journal")
    child = subprocess.run(
        [sys.executable, "-c", _PYSYNCOBJ_CHILD, str(path)],
        capture_output=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert entries_of(path) == ENTRIES[TRIM_TO : TRIM_TO + 3]


def test_every_replica_opens_this_journal() -> None:
    """PySyncObj builds a SyncObj's journal with its module's `createJournal`: importing the
    replica layer puts this one there."""
    assert replica.ShardReplica is not None  # the layer whose import installs it
    assert pysyncobj.syncobj.createJournal is replica_journal.create_journal
