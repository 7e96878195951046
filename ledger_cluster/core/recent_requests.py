"""The `recent_requests` table (tables.py says why it exists): reading its rows, and moving
their request ids into `requests`. Shared by apply, restore and verification."""

from __future__ import annotations

from ledger_cluster.core import tables
from ledger_cluster.storage import ReadTransaction, WriteTransaction


def move_recent_requests(transaction: WriteTransaction) -> int:
    """Every id of `recent_requests` into `requests`, in key order; returns how many moved.
    Each id is moved once, so this runs per id: raw slices sorted as they are (a request key
    comes first in each, and no two are equal) and handed to LMDB in one call."""
    step = tables.RECENT_REQUEST.size
    size = tables.RECENT_REQUEST_KEY_BYTES
    entries = [
        value[start : start + step]
        for _, value in transaction.iterate(tables.RECENT_REQUESTS)
        for start in range(0, len(value), step)
    ]
    entries.sort()
    transaction.put_many(tables.REQUESTS, ((entry[:size], entry[size:]) for entry in entries))
    transaction.clear(tables.RECENT_REQUESTS)
    return len(entries)


def recent_request_entries(value: bytes) -> list[tuple[bytes, int]]:
    """(request key, transaction number) of each id in a recent_requests row."""
    size = tables.RECENT_REQUEST_KEY_BYTES
    step = tables.RECENT_REQUEST.size
    return [
        (value[start : start + size], tables.decode_u64(value[start + size : start + step]))
        for start in range(0, len(value), step)
    ]


def read_recent_requests(view: ReadTransaction) -> dict[bytes, int]:
    found: dict[bytes, int] = {}
    for _, value in view.iterate(tables.RECENT_REQUESTS):
        found.update(recent_request_entries(value))
    return found
