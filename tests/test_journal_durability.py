"""The Raft journal's durability on real files: which changes wait for a sync, what the test-only
copy of the synced state holds, a torn tail cut back to its whole records, and a meta that no
longer reads stopping the replica instead of forgetting its vote."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pysyncobj import journal as pysyncobj_journal
from pysyncobj.pickle import loads

from ledger_cluster.errors import ReplicaBrokenError
from ledger_cluster.replica_journal import (
    META_SUFFIX,
    SYNCED_COPIES_ENVIRONMENT_VARIABLE,
    SYNCED_COPY_SUFFIX,
    AtomicTrimJournal,
    Durability,
)

ENTRIES = [(f"command-{index}".encode() * 10, index, 1 + index // 4) for index in range(1, 11)]
TERM = 7
VOTED_FOR = "node02"


def positions(journal: AtomicTrimJournal) -> list[int]:
    return [int(journal[i][1]) for i in range(len(journal))]


def end_of_records(path: Path) -> int:
    """The header's end-of-records mark."""
    return int(struct.unpack_from("<I", path.read_bytes(), pysyncobj_journal.LAST_RECORD_OFFSET_OFFSET)[0])


@contextmanager
def opened(path: Path, durability: Durability = Durability.POWER_LOSS) -> Iterator[AtomicTrimJournal]:
    """The journal at `path`, closed (its files kept) however the block ends."""
    journal = AtomicTrimJournal(str(path), durability)
    try:
        yield journal
    finally:
        journal._destroy()


def test_changes_wait_for_a_sync_only_in_power_loss_mode(tmp_path: Path) -> None:
    with opened(tmp_path / "journal") as journal:
        journal.sync()
        assert not journal.needs_sync()
        journal.add(*ENTRIES[0])
        assert journal.needs_sync()
        journal.sync()
        assert not journal.needs_sync()
        journal.deleteEntriesFrom(0)
        assert journal.needs_sync()
        journal.durability = Durability.PROCESS_CRASH
        assert not journal.needs_sync()


def test_the_synced_copy_holds_exactly_what_the_last_sync_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SYNCED_COPIES_ENVIRONMENT_VARIABLE, "1")
    path = tmp_path / "journal"
    with opened(path) as journal:
        for entry in ENTRIES[:6]:
            journal.add(*entry)
        journal.sync()
        journal.setCurrentTerm(TERM, VOTED_FOR)  # stored (and copied) at once
        for entry in ENTRIES[6:]:
            journal.add(*entry)  # never synced
    copy = tmp_path / ("journal" + SYNCED_COPY_SUFFIX)
    with opened(copy) as reopened:
        assert positions(reopened) == [1, 2, 3, 4, 5, 6]
    meta = loads((tmp_path / ("journal" + META_SUFFIX + SYNCED_COPY_SUFFIX)).read_bytes())
    assert (meta["currentTerm"], meta["votedForNodeId"]) == (TERM, VOTED_FOR)


def test_process_crash_mode_keeps_no_synced_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SYNCED_COPIES_ENVIRONMENT_VARIABLE, "1")
    with opened(tmp_path / "journal", Durability.PROCESS_CRASH) as journal:
        journal.add(*ENTRIES[0])
        journal.sync()
        journal.setCurrentTerm(TERM, VOTED_FOR)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["journal", "journal" + META_SUFFIX]


def test_a_torn_tail_is_cut_to_the_whole_records(tmp_path: Path) -> None:
    """The header's end-of-records mark reached the disk, the last records' pages did not."""
    path = tmp_path / "journal"
    with opened(path) as journal:
        for entry in ENTRIES[:7]:
            journal.add(*entry)
        whole_end = end_of_records(path)
        for entry in ENTRIES[7:]:
            journal.add(*entry)
    data = bytearray(path.read_bytes())
    mark = end_of_records(path)
    data[whole_end + 10 : mark] = bytes(mark - whole_end - 10)  # the 8th record torn, 9 and 10 lost
    path.write_bytes(bytes(data))
    with opened(path) as reopened:
        assert positions(reopened) == [1, 2, 3, 4, 5, 6, 7]
        reopened.add(*ENTRIES[7])
    with opened(path) as again:
        assert positions(again) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_record_out_of_sequence_ends_the_journal(tmp_path: Path) -> None:
    """Well-formed records of an older run (here: index 5 after 3) are never taken as the log."""
    path = tmp_path / "journal"
    with opened(path) as journal:
        for entry in [*ENTRIES[:3], ENTRIES[4]]:
            journal.add(*entry)
    with opened(path) as reopened:
        assert positions(reopened) == [1, 2, 3]


def test_an_unreadable_meta_stops_the_replica(tmp_path: Path) -> None:
    """PySyncObj's own reader takes it for no meta at all: term 0 and no vote."""
    (tmp_path / ("journal" + META_SUFFIX)).write_bytes(b"\x00 not a pickle")
    with pytest.raises(ReplicaBrokenError, match=r"Raft meta .* is unreadable"), opened(tmp_path / "journal"):
        pass
