"""The `recent_requests` table (tables.py says why it exists): reading its rows, and moving
their request ids into `requests`. Shared by apply, restore and verification."""

from __future__ import annotations

from ledger_cluster.core import tables
from ledger_cluster.storage import ReadTransaction, WriteTransaction

_ENTRY_BYTES = tables.RECENT_REQUEST.size
_KEY_BYTES = tables.RECENT_REQUEST_KEY_BYTES


def recent_request_slices(value: bytes) -> list[bytes]:
    """The ids of one recent_requests row, each as its raw bytes: request key (account id +
    digest), then the transaction number."""
    return [value[start : start + _ENTRY_BYTES] for start in range(0, len(value), _ENTRY_BYTES)]


def move_recent_requests(transaction: WriteTransaction) -> int:
    """Every id of `recent_requests` into `requests`, in key order; returns how many moved.
    Each id is moved once, so this runs per id: raw slices sorted as they are (a request key
    comes first in each, and no two are equal) and handed to LMDB in one call."""
    entries = [
        entry
        for _, value in transaction.iterate(tables.RECENT_REQUESTS)
        for entry in recent_request_slices(value)
    ]
    entries.sort()
    transaction.put_many(tables.REQUESTS, ((entry[:_KEY_BYTES], entry[_KEY_BYTES:]) for entry in entries))
    transaction.clear(tables.RECENT_REQUESTS)
    return len(entries)


def recent_request_entries(value: bytes) -> list[tuple[bytes, int]]:
    """(request key, transaction number) of each id in a recent_requests row."""
    return [
        (entry[:_KEY_BYTES], tables.decode_u64(entry[_KEY_BYTES:])) for entry in recent_request_slices(value)
    ]


def read_recent_requests(view: ReadTransaction) -> dict[bytes, int]:
    found: dict[bytes, int] = {}
    for _, value in view.iterate(tables.RECENT_REQUESTS):
        found.update(recent_request_entries(value))
    return found
