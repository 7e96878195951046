"""LMDB storage of one replica, and the snapshot stream. The only module that imports lmdb.

One environment per replica holds named tables. Only one thread writes (the replica's apply
thread, or the standalone shard lock holder); any number of threads read. The map grows on
MapFullError: the failed write transaction is aborted, the map doubled while no transaction of
this process is open, and the whole write is run again (writes are deterministic functions of
their input, so running one again is safe).

Snapshot stream (big-endian)::

    header   magic "LEDGSNAP" | u16 format version (of the rows: the caller's to interpret)
             | u32 shard lower bound | u32 shard upper bound | u64 applied index | u64 record count
             | u32 metadata length | metadata (opaque to storage: the replica keeps its Raft
             position there)
    record   u8 table id | u16 key length | u32 value length | key | value   (record count times)
    trailer  magic "LEDGEND!" | sha256 of every byte before the trailer

Records carry no shard prefix, so a snapshot of one shard can be restored into another layout:
restore hands every row to its caller, which keeps (or converts) the ones it wants.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import lmdb

from ledger_cluster.errors import (
    DataDirectoryInUseError,
    SnapshotCorruptError,
    SnapshotError,
    StorageError,
)

T = TypeVar("T")

# LMDB reserves address space only (the file grows with the data), so start large: growing means
# waiting for every open transaction, a background dump's long read view included.
INITIAL_MAP_SIZE_BYTES = 32 * 1024 * 1024 * 1024
MAP_SIZE_MAX_BYTES = 1024 * 1024 * 1024 * 1024
MAP_GROWTH_ATTEMPTS_MAX = 12
TABLES_MAX = 16
READERS_MAX = 512
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600

SNAPSHOT_MAGIC = b"LEDGSNAP"
SNAPSHOT_TRAILER_MAGIC = b"LEDGEND!"
SNAPSHOT_BUFFER_BYTES = 1024 * 1024
# Records per write (and hash update) of a snapshot stream: about 1 MiB of typical rows.
SNAPSHOT_CHUNK_RECORDS = 8192
_HEADER = struct.Struct(">8sHIIQQI")
METADATA_BYTES_MAX = 1024 * 1024
_RECORD = struct.Struct(">BHI")
_DIGEST_BYTES = 32
KEY_BYTES_MAX = 511  # LMDB's compiled-in maximum key size


@dataclass(frozen=True)
class SnapshotHeader:
    format_version: int
    shard_lower_bound: int
    shard_upper_bound: int
    applied_index: int
    record_count: int
    metadata: bytes = b""


class RowSink(Protocol):
    """Where restore sends each snapshot record: `table_ids` maps each format version the sink
    reads to the table ids it may hold; `put` writes what it keeps of a record."""

    @property
    def table_ids(self) -> Mapping[int, frozenset[int]]: ...

    def put(
        self, transaction: WriteTransaction, header: SnapshotHeader, table_id: int, key: bytes, value: bytes
    ) -> None: ...


class ReadTransaction:
    """A consistent view of every table at one moment."""

    # lmdb 1.x ships no type information; the handles are typed Any here, at the one boundary.
    def __init__(self, transaction: Any, tables: Mapping[str, Any]):
        self._transaction = transaction
        self._tables = tables

    def get(self, table: str, key: bytes) -> bytes | None:
        value: bytes | None = self._transaction.get(key, db=self._tables[table])
        return value

    def getter(self, table: str) -> Callable[[bytes], bytes | None]:
        """`get` of one table, bound once: for loops that read a row per item."""
        getter: Callable[[bytes], bytes | None] = functools.partial(
            self._transaction.get, db=self._tables[table]
        )
        return getter

    def scan(self, table: str, start_key: bytes, prefix: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` records whose key starts with `prefix`, from `start_key` on, in key order."""
        records: list[tuple[bytes, bytes]] = []
        with self._transaction.cursor(db=self._tables[table]) as cursor:
            if not cursor.set_range(start_key):
                return records
            for key, value in cursor:
                if not key.startswith(prefix) or len(records) >= limit:
                    break
                records.append((key, value))
        return records

    def iterate(self, table: str) -> Iterator[tuple[bytes, bytes]]:
        with self._transaction.cursor(db=self._tables[table]) as cursor:
            yield from cursor

    def count(self, table: str) -> int:
        return int(self._transaction.stat(self._tables[table])["entries"])


class WriteTransaction(ReadTransaction):
    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._transaction.put(key, value, db=self._tables[table])

    def putter(self, table: str) -> Callable[[bytes, bytes], bool]:
        """`put` of one table, bound once: for loops that write a row per item."""
        putter: Callable[[bytes, bytes], bool] = functools.partial(
            self._transaction.put, db=self._tables[table]
        )
        return putter

    def inserter(self, table: str) -> Callable[[bytes, bytes], bool]:
        """Like `putter`, but a key that exists keeps its value and the call returns False: the
        existence check and the write of a new row in one B-tree descent."""
        inserter: Callable[[bytes, bytes], bool] = functools.partial(
            self._transaction.put, db=self._tables[table], overwrite=False
        )
        return inserter

    def put_many(self, table: str, rows: Iterable[tuple[bytes, bytes]]) -> None:
        """Every (key, value) of `rows`, in one call into LMDB (rows in key order go fastest)."""
        with self._transaction.cursor(db=self._tables[table]) as cursor:
            cursor.putmulti(rows)

    def delete(self, table: str, key: bytes) -> None:
        self._transaction.delete(key, db=self._tables[table])

    def clear(self, table: str) -> None:
        self._transaction.drop(self._tables[table], delete=False)


class _ResizeGate:
    """Lets transactions run concurrently but holds them all off while the map is resized,
    because LMDB forbids set_mapsize while any transaction of the process is open."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._open_transactions = 0
        self._resizing = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._condition:
            while self._resizing:
                self._condition.wait()
            self._open_transactions += 1
        try:
            yield
        finally:
            with self._condition:
                self._open_transactions -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            while self._resizing:
                self._condition.wait()
            self._resizing = True
            while self._open_transactions:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._resizing = False
                self._condition.notify_all()


class Storage:
    """The LMDB environment of one replica under `directory`, with the given named tables."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        table_names: Sequence[str],
        map_size_bytes: int = INITIAL_MAP_SIZE_BYTES,
        sync: bool = True,
        metasync: bool = True,
    ) -> None:
        """With `sync` and `metasync` a committed write survives power loss, with `sync` alone
        every commit but the last one does (one fsync per commit instead of two; LMDB keeps
        its integrity either way): for a caller that can replay the last commit from a log of
        its own that is durable first."""
        if len(table_names) > TABLES_MAX:
            raise StorageError(f"at most {TABLES_MAX} tables, got {len(table_names)}")
        self.directory = Path(directory)
        make_private_directory(self.directory)
        self._gate = _ResizeGate()
        self._write_lock = threading.Lock()
        try:
            self._environment = lmdb.open(
                str(self.directory),
                map_size=map_size_bytes,
                subdir=True,
                max_dbs=TABLES_MAX,
                max_readers=READERS_MAX,
                sync=sync,
                metasync=sync and metasync,
                # Random access to a large map: read-ahead only wastes page cache.
                readahead=False,
                mode=FILE_MODE,
                lock=True,
            )
            with self._environment.begin(write=True) as transaction:
                self._tables = {
                    name: self._environment.open_db(name.encode(), txn=transaction, create=True)
                    for name in table_names
                }
        except lmdb.Error as error:
            raise StorageError(f"cannot open LMDB environment in {self.directory}: {error}") from error

    def close(self) -> None:
        with self._gate.exclusive():
            self._environment.close()

    @property
    def map_size_bytes(self) -> int:
        return int(self._environment.info()["map_size"])

    def used_bytes(self) -> int:
        """Bytes of the pages written so far (the file's high-water mark within the map)."""
        with self._gate.transaction():
            info = self._environment.info()
            page_bytes = self._environment.stat()["psize"]
        return (int(info["last_pgno"]) + 1) * int(page_bytes)

    @contextlib.contextmanager
    def read(self) -> Iterator[ReadTransaction]:
        with self._gate.transaction(), self._environment.begin(write=False) as transaction:
            yield ReadTransaction(transaction, self._tables)

    def write(self, operation: Callable[[WriteTransaction], T]) -> T:
        """Run `operation` in one write transaction and commit it.

        An exception from `operation` aborts the transaction and propagates."""
        with self._write_lock:
            for _ in range(MAP_GROWTH_ATTEMPTS_MAX):
                try:
                    return self._write_once(operation)
                except lmdb.MapFullError:
                    self._grow_map()
            raise StorageError(f"write still does not fit after {MAP_GROWTH_ATTEMPTS_MAX} map growths")

    def _write_once(self, operation: Callable[[WriteTransaction], T]) -> T:
        with self._gate.transaction():
            transaction = self._environment.begin(write=True)
            try:
                result = operation(WriteTransaction(transaction, self._tables))
            except BaseException:
                transaction.abort()
                raise
            try:
                transaction.commit()
            except lmdb.MapFullError:
                raise
            except lmdb.Error as error:
                raise StorageError(f"commit failed in {self.directory}: {error}") from error
            return result

    def _grow_map(self) -> None:
        with self._gate.exclusive():
            new_size = self.map_size_bytes * 2
            if new_size > MAP_SIZE_MAX_BYTES:
                raise StorageError(f"map of {self.directory} would exceed {MAP_SIZE_MAX_BYTES} bytes")
            self._environment.set_mapsize(new_size)

    # -- snapshots -------------------------------------------------------------------------

    def write_snapshot(
        self,
        path: str | os.PathLike[str],
        tables: Mapping[int, str],
        header_of: Callable[[ReadTransaction, int], SnapshotHeader],
    ) -> SnapshotHeader:
        """Write every record of `tables` (id -> name) from one read transaction, then fsync and
        atomically rename into place. `header_of(view, record_count)` supplies the header from
        the same view, so the applied index matches the records exactly."""
        target = Path(path)
        temporary = target.with_name(target.name + ".partial")
        with self.read() as view:
            record_count = sum(view.count(name) for name in tables.values())
            header = header_of(view, record_count)
            try:
                with open(temporary, "wb", buffering=SNAPSHOT_BUFFER_BYTES) as file:
                    _write_stream(file, view, tables, header)
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as error:
                temporary.unlink(missing_ok=True)
                raise SnapshotError(f"cannot write snapshot {target}: {error}") from error
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        os.replace(temporary, target)
        fsync_directory(target.parent)
        return header

    def restore_snapshot(
        self,
        path: str | os.PathLike[str],
        tables: Iterable[str],
        put_row: RowSink,
        finish: Callable[[WriteTransaction, SnapshotHeader], None],
        replace: bool = True,
    ) -> SnapshotHeader:
        """In one write transaction, clear `tables` and hand every record of the snapshot to
        `put_row`, which writes what it keeps. `finish` runs in the same transaction after the
        checksum was verified (to set metadata, check invariants); if anything fails, nothing
        changes. `put_row` also says which table ids each format version may hold.

        With `replace=False` nothing is cleared (a record with an existing key overwrites it):
        several snapshots merged into one state."""

        def restore(transaction: WriteTransaction) -> SnapshotHeader:
            if replace:
                for name in tables:
                    transaction.clear(name)
            try:
                with open(path, "rb", buffering=SNAPSHOT_BUFFER_BYTES) as file:
                    header = _read_stream(file, put_row.table_ids, put_row.put, transaction)
            except OSError as error:
                raise SnapshotError(f"cannot read snapshot {path}: {error}") from error
            finish(transaction, header)
            return header

        return self.write(restore)


def make_private_directory(directory: Path) -> None:
    """Create `directory` and any missing parents readable by this user only: ledger data
    (balances, descriptions) is nobody else's business."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(mode=DIRECTORY_MODE, exist_ok=True)


LOCK_FILE_NAME = "LOCK"
# Present in a node's data directory while `ledger-dev restore` fills it: a restore cut short
# leaves it behind, and a node refuses to start on a half-restored directory.
RESTORE_MARKER_FILE_NAME = "RESTORE-IN-PROGRESS"


class DirectoryLock:
    """An exclusive advisory lock on a data directory for the life of this process.

    Two processes applying to the same LMDB files would each hand out log indices the other
    already used, and the core would take the newer one's writes for replays. The kernel drops
    the lock when the process dies, kill -9 included, so a crash never leaves it stale."""

    def __init__(self, directory: Path) -> None:
        make_private_directory(directory)
        self.path = directory / LOCK_FILE_NAME
        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._descriptor)
            raise DataDirectoryInUseError(
                f"data directory {directory} is in use by another process"
            ) from None
        os.ftruncate(self._descriptor, 0)
        os.write(self._descriptor, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._descriptor < 0:
            return
        fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        os.close(self._descriptor)
        self._descriptor = -1


def check_snapshot(path: str | os.PathLike[str], table_ids: Mapping[int, frozenset[int]]) -> SnapshotHeader:
    """Read a whole snapshot and verify its structure and checksum without applying it.
    `table_ids` maps each format version the caller reads to the table ids it may hold."""
    try:
        with open(path, "rb", buffering=SNAPSHOT_BUFFER_BYTES) as file:
            return _read_stream(file, table_ids, None, None)
    except OSError as error:
        raise SnapshotError(f"cannot read snapshot {path}: {error}") from error


def read_snapshot_header(path: str | os.PathLike[str]) -> SnapshotHeader:
    """The header alone, without checking the records (restore checks everything)."""
    try:
        with open(path, "rb") as file:
            return _read_header(file, hashlib.sha256())
    except OSError as error:
        raise SnapshotError(f"cannot read snapshot {path}: {error}") from error


class _HashingWriter:
    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self._file.write(data)


def _write_stream(
    file: BinaryIO, view: ReadTransaction, tables: Mapping[int, str], header: SnapshotHeader
) -> None:
    writer = _HashingWriter(file)
    writer.write(
        _HEADER.pack(
            SNAPSHOT_MAGIC,
            header.format_version,
            header.shard_lower_bound,
            header.shard_upper_bound,
            header.applied_index,
            header.record_count,
            len(header.metadata),
        )
        + header.metadata
    )
    written = 0
    for table_id in sorted(tables):
        # Records gather into chunks that are hashed and written at once: per record, three
        # writes and three hash updates cost more than the record itself (a compaction dump
        # of a large shard is millions of them).
        pack = _RECORD.pack
        chunk: list[bytes] = []
        for key, value in view.iterate(tables[table_id]):
            chunk.append(pack(table_id, len(key), len(value)) + key + value)
            if len(chunk) >= SNAPSHOT_CHUNK_RECORDS:
                writer.write(b"".join(chunk))
                written += len(chunk)
                chunk = []
        writer.write(b"".join(chunk))
        written += len(chunk)
    if written != header.record_count:
        raise SnapshotError(f"wrote {written} records but the header says {header.record_count}")
    file.write(SNAPSHOT_TRAILER_MAGIC + writer.digest.digest())


def _read_exactly(file: BinaryIO, size: int, what: str) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise SnapshotCorruptError(f"snapshot is truncated: {what} cut short")
    return data


def _read_header(file: BinaryIO, digest: hashlib._Hash) -> SnapshotHeader:
    data = _read_exactly(file, _HEADER.size, "header")
    digest.update(data)
    magic, version, lower, upper, applied_index, record_count, metadata_length = _HEADER.unpack(data)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotCorruptError("not a ledger-cluster snapshot (bad magic)")
    if metadata_length > METADATA_BYTES_MAX:
        raise SnapshotCorruptError(f"snapshot metadata of {metadata_length} bytes is implausible")
    metadata = _read_exactly(file, metadata_length, "metadata")
    digest.update(metadata)
    return SnapshotHeader(version, lower, upper, applied_index, record_count, metadata)


def _read_stream(
    file: BinaryIO,
    table_ids: Mapping[int, frozenset[int]],
    put: Callable[[WriteTransaction, SnapshotHeader, int, bytes, bytes], None] | None,
    transaction: WriteTransaction | None,
) -> SnapshotHeader:
    digest = hashlib.sha256()
    header = _read_header(file, digest)
    known = table_ids.get(header.format_version)
    if known is None:
        raise SnapshotCorruptError(f"unsupported snapshot format version {header.format_version}")
    for index in range(header.record_count):
        record_header = _read_exactly(file, _RECORD.size, f"record {index}")
        table_id, key_length, value_length = _RECORD.unpack(record_header)
        if table_id not in known or not 0 < key_length <= KEY_BYTES_MAX:
            raise SnapshotCorruptError(f"record {index} has table {table_id}, key length {key_length}")
        body = _read_exactly(file, key_length + value_length, f"record {index}")
        digest.update(record_header)
        digest.update(body)
        if transaction is not None and put is not None:
            put(transaction, header, table_id, body[:key_length], body[key_length:])
    trailer = _read_exactly(file, len(SNAPSHOT_TRAILER_MAGIC) + _DIGEST_BYTES, "trailer")
    if trailer[: len(SNAPSHOT_TRAILER_MAGIC)] != SNAPSHOT_TRAILER_MAGIC:
        raise SnapshotCorruptError("snapshot trailer is missing or damaged")
    if trailer[len(SNAPSHOT_TRAILER_MAGIC) :] != digest.digest():
        raise SnapshotCorruptError("snapshot checksum mismatch")
    if file.read(1):
        raise SnapshotCorruptError("snapshot has bytes after its trailer")
    return header


def fsync_file(path: Path) -> None:
    """Make a file written (and closed) elsewhere durable, or a directory's entries."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(directory: Path) -> None:
    fsync_file(directory)  # a directory opens read-only like a file
