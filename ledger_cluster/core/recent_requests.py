"""The `recent_requests` table (tables.py says why it exists): reading its rows, and moving
their request ids into `requests`. Shared by apply, restore and verification."""

from __future__ import annotations

from ledger_cluster.core import tables
from ledger_cluster.storage import ReadTransaction, WriteTransaction


def move_recent_requests(transaction: WriteTransaction) -> int:
    """Every id of `recent_requests` into `requests`, in key order; returns how many moved."""
    entries = sorted(read_recent_requests(transaction).items())
    put = transaction.putter(tables.REQUESTS)
    for key, number in entries:
        put(key, tables.encode_u64(number))
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
