"""Benchmark states built offline with the core alone (no Raft, no gRPC), and the core's own cost
measured on them: what `scripts/bench-core` and `scripts/preload-state` run.

These tools use only the core's stable surface (`AccountsCore.open`, `apply`, `write_snapshot`,
`close`, the constructors of `core.commands` and `tables.STATE_FORMAT_VERSION`) and count what a
state holds from LMDB's own table statistics, not from the core's key layout, so the same
method measures the state format of issue 13 as it did the one before it.

A preload writes what `ledger-dev bench --mix create` makes a cluster write: accounts created
with a request id (the account id derived from it, as the gateway does), one top-up of
SETUP_BALANCE each, then top-ups and purchases of one unit, settled, each with its own request id
and a time-ordered transaction number, in entries of up to BATCH_ITEMS_MAX items.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ledger_cluster.backup import (
    FILE_MODE,
    MANIFEST_FILE_NAME,
    MANIFEST_FORMAT_VERSION,
    SNAPSHOT_FILE_SUFFIX,
    Manifest,
    ShardBackup,
    file_sha256,
    prepare_backup_directory,
    validate_backup,
)
from ledger_cluster.bench import (
    CREATE_MIX_AMOUNTS,
    SETUP_BALANCE,
    account_request_in_shard,
    new_request_id,
)
from ledger_cluster.config import ClusterConfig, write_json_atomic
from ledger_cluster.core import AccountsCore, commands, tables
from ledger_cluster.errors import LedgerError
from ledger_cluster.gateway import time_ordered_transaction_number
from ledger_cluster.gateway.service import TRANSACTION_NUMBER_RANDOM_BITS
from ledger_cluster.ids import format_account_id
from ledger_cluster.limits import BATCH_ITEMS_MAX
from ledger_cluster.storage import Storage, fsync_directory

Progress = Callable[[str], None]

PRELOAD_TRANSACTIONS_DEFAULT = 1_000_000
ACCOUNTS_DEFAULT = 60
ITEM_DESCRIPTION = "bench"
SETUP_DESCRIPTION = "bench setup"
PROGRESS_EVERY_TRANSACTIONS = 100_000
# Bumped whenever what a preload writes changes (the mix, descriptions, top-ups), so a cached
# state of the old recipe is never measured as if it were the new one.
PRELOAD_RECIPE_VERSION = 1
LMDB_LOCK_FILE_NAME = "lock.mdb"
PROC_IO_PATH = Path("/proc/self/io")
# /sys/dev/block/<major>:<minor>/stat: the seventh field counts 512-byte sectors written.
DEVICE_STAT_SECTORS_WRITTEN_FIELD = 6
DEVICE_SECTOR_BYTES = 512
BYTES_PER_KIB = 1024
MICROSECONDS_PER_SECOND = 1_000_000
# What a backup manifest names as the node a snapshot came from: this one came from no node.
PRELOAD_SOURCE_NODE_ID = "preload-state"
ACCOUNTS_FILE_NAME = "accounts.txt"
WORK_DIRECTORY_NAME = ".work"
CACHE_STATE_DIRECTORY_NAME = "lmdb"
CACHE_DESCRIPTION_FILE_NAME = "preload.json"
PARTIAL_SUFFIX = ".partial"


class BenchStateError(LedgerError):
    """A state could not be built or measured as asked; the message says why."""


# -- commands as a client and the gateway make them --------------------------------------------


class TransactionNumbers:
    """Time-ordered transaction numbers drawn as the gateway draws them, never the same
    (account, number) twice. The gateway draws again when the core answers a collision; an
    offline load has nobody to retry, so it avoids them instead: the numbers of the current
    window of `now` (about 4 ms) are remembered until the clock leaves it."""

    def __init__(self) -> None:
        self._window = -1
        self._drawn: set[tuple[int, int]] = set()

    def draw(self, account_id: int, now_ns: int) -> int:
        window = now_ns >> TRANSACTION_NUMBER_RANDOM_BITS
        if window != self._window:
            self._window = window
            self._drawn.clear()
        while True:
            number = time_ordered_transaction_number(now_ns)
            if (account_id, number) not in self._drawn:
                self._drawn.add((account_id, number))
                return number


def create_accounts_entries(
    lower_bound: int, upper_bound: int, count: int, batch_items: int
) -> tuple[list[int], list[bytes]]:
    """`count` new account ids of the shard and the batch entries that create them."""
    requests = [account_request_in_shard(lower_bound, upper_bound) for _ in range(count)]
    entries = []
    for start in range(0, count, batch_items):
        now = time.time_ns()
        chunk = requests[start : start + batch_items]
        entries.append(
            commands.batch(
                [commands.create_account(account_id, request, now) for account_id, request in chunk]
            )
        )
    return [account_id for account_id, _ in requests], entries


class EntryMaker:
    """Batch entries of CreateTransaction commands over a fixed set of accounts. Items of one
    entry share `now`, like the items of one gateway batch call."""

    def __init__(self, account_ids: Sequence[int], rng: random.Random) -> None:
        self._account_ids = list(account_ids)
        self._rng = rng
        self._numbers = TransactionNumbers()

    def _item(self, account_id: int, amount: int, description: str, now: int) -> bytes:
        return commands.create_transaction(
            account_id=account_id,
            transaction_number=self._numbers.draw(account_id, now),
            amount=amount,
            description=description,
            settled=True,
            request_id=new_request_id(),
            now=now,
        )

    def top_ups(self, batch_items: int) -> Iterator[bytes]:
        """One settled top-up of SETUP_BALANCE per account, as the bench's setup gives each."""
        for start in range(0, len(self._account_ids), batch_items):
            now = time.time_ns()
            chunk = self._account_ids[start : start + batch_items]
            yield commands.batch(
                [self._item(account, SETUP_BALANCE, SETUP_DESCRIPTION, now) for account in chunk]
            )

    def mixed(self, items: int) -> bytes:
        """`items` settled top-ups and purchases of one unit on random accounts (`--mix create`)."""
        now = time.time_ns()
        return commands.batch(
            [
                self._item(
                    self._rng.choice(self._account_ids),
                    self._rng.choice(CREATE_MIX_AMOUNTS),
                    ITEM_DESCRIPTION,
                    now,
                )
                for _ in range(items)
            ]
        )


# -- applying -----------------------------------------------------------------------------------


class ShardLog:
    """A core and the log index its next entry gets: entries apply in log order from 1, as a
    replica applies its Raft log."""

    def __init__(self, core: AccountsCore, next_index: int = 1) -> None:
        self.core = core
        self.next_index = next_index

    def append(self, entry: bytes, answering: bool) -> None:
        self.core.apply(entry, self.next_index, answering=answering)
        self.next_index += 1


@dataclass(frozen=True)
class Preloaded:
    """What a preload left in a shard."""

    account_ids: tuple[int, ...]
    transactions: int
    next_log_index: int
    seconds: float


def preload(
    log: ShardLog,
    lower_bound: int,
    upper_bound: int,
    *,
    accounts: int,
    transactions: int,
    rng: random.Random,
    progress: Progress,
    batch_items: int = BATCH_ITEMS_MAX,
) -> Preloaded:
    """Create `accounts` accounts and `transactions` transactions in the shard: each account's
    top-up first, then the mix. Applied without answers, as a follower applies."""
    if accounts < 1 or transactions < accounts:
        raise BenchStateError(
            f"{transactions} transactions over {accounts} accounts: every account needs at least one"
            " (its top-up)"
        )
    started = time.monotonic()
    account_ids, account_entries = create_accounts_entries(lower_bound, upper_bound, accounts, batch_items)
    for entry in account_entries:
        log.append(entry, answering=False)
    maker = EntryMaker(account_ids, rng)
    for entry in maker.top_ups(batch_items):
        log.append(entry, answering=False)
    done = accounts
    next_report = PROGRESS_EVERY_TRANSACTIONS
    while done < transactions:
        items = min(batch_items, transactions - done)
        log.append(maker.mixed(items), answering=False)
        done += items
        if done >= next_report:
            elapsed = time.monotonic() - started
            progress(f"preloaded {done:,}/{transactions:,} transactions ({done / elapsed:,.0f}/s)")
            next_report += PROGRESS_EVERY_TRANSACTIONS
    return Preloaded(tuple(account_ids), transactions, log.next_index, time.monotonic() - started)


# -- counting -----------------------------------------------------------------------------------


def table_rows(directory: Path) -> dict[str, int]:
    """Rows of every table of the core's closed environment in `directory` (LMDB allows one
    handle on an environment per process, so the core must be closed)."""
    storage = Storage(directory, tables.TABLE_NAMES)
    try:
        with storage.read() as view:
            return {name: view.count(name) for name in tables.TABLE_NAMES}
    finally:
        storage.close()


def state_file_bytes(directory: Path) -> int:
    """Bytes of the environment's data files (LMDB's lock file is no state)."""
    return sum(path.stat().st_size for path in directory.iterdir() if path.name != LMDB_LOCK_FILE_NAME)


@dataclass(frozen=True)
class WriteCounters:
    """Three views of what a process writes, read before and after a measured loop.

    - `write_bytes` (`/proc/self/io`): what the kernel charges the process for dirtying the
      page cache. Kernels with large folios (ext4 since 6.16) charge the whole folio, up to
      2 MiB, for a 4 KiB write into it: on this machine 1000 random 4 KiB writes into a cached
      200 MiB file count 200 MiB. So it overstates the writes of a B-tree that touches pages
      all over its file, by about 10x for LMDB here.
    - `wchar` (`/proc/self/io`): bytes handed to write calls. During the loop only LMDB writes,
      whole 4 KiB pages, so this is what LMDB writes.
    - `device_bytes`: sectors written by the block device holding the state
      (`/sys/dev/block/<dev>/stat`), journal included, but also every other process's writes
      to that device: exact on a quiet machine only. None where the device is not found.
    """

    write_bytes: int
    wchar: int
    device_bytes: int | None

    @classmethod
    def read(cls, device_stat: Path | None) -> WriteCounters:
        try:
            text = PROC_IO_PATH.read_text(encoding="ascii")
        except OSError as error:
            raise BenchStateError(
                f"cannot read {PROC_IO_PATH} ({error.strerror}): Linux I/O accounting is needed"
            ) from error
        fields = {name: value for name, _, value in (line.partition(":") for line in text.splitlines())}
        device_bytes = None
        if device_stat is not None:
            sectors = int(device_stat.read_text(encoding="ascii").split()[DEVICE_STAT_SECTORS_WRITTEN_FIELD])
            device_bytes = sectors * DEVICE_SECTOR_BYTES
        return cls(int(fields["write_bytes"]), int(fields["wchar"]), device_bytes)

    def __sub__(self, earlier: WriteCounters) -> WriteCounters:
        device_bytes = None
        if self.device_bytes is not None and earlier.device_bytes is not None:
            device_bytes = self.device_bytes - earlier.device_bytes
        return WriteCounters(self.write_bytes - earlier.write_bytes, self.wchar - earlier.wchar, device_bytes)


def device_stat_of(directory: Path) -> Path | None:
    """The statistics file of the block device that holds `directory`; None when it has none
    (tmpfs, overlay)."""
    device = directory.stat().st_dev
    path = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat")
    return path if path.is_file() else None


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundFigures:
    """One measured round: entries applied with answers, as a leader applies."""

    items: int
    entries: int
    seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    writes: WriteCounters

    def summary(self) -> dict[str, float | None]:
        items = max(self.items, 1)

        def per_item_us(seconds: float) -> float:
            return round(seconds * MICROSECONDS_PER_SECOND / items, 2)

        def per_item_kib(written: int | None) -> float | None:
            return None if written is None else round(written / BYTES_PER_KIB / items, 3)

        return {
            "items_per_s": round(self.items / max(self.seconds, 1e-9), 1),
            "cpu_us_per_item": per_item_us(self.cpu_user_seconds + self.cpu_system_seconds),
            "cpu_user_us_per_item": per_item_us(self.cpu_user_seconds),
            "cpu_system_us_per_item": per_item_us(self.cpu_system_seconds),
            "wall_us_per_item": per_item_us(self.seconds),
            "kib_written_per_item": per_item_kib(self.writes.write_bytes),
            "kib_write_calls_per_item": per_item_kib(self.writes.wchar),
            "kib_device_written_per_item": per_item_kib(self.writes.device_bytes),
        }


def measure_round(
    log: ShardLog, entries: Sequence[bytes], items: int, device_stat: Path | None
) -> RoundFigures:
    """Apply `entries` (built beforehand: making commands is the client's and the gateway's
    work, not the core's) and read wall time, this process's CPU and the bytes written around
    exactly that loop. Every entry's commit is synced, so its writes are done when it returns."""
    writes_before = WriteCounters.read(device_stat)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for entry in entries:
        log.append(entry, answering=True)
    seconds = time.perf_counter() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    writes = WriteCounters.read(device_stat) - writes_before
    return RoundFigures(
        items=items,
        entries=len(entries),
        seconds=seconds,
        cpu_user_seconds=usage_after.ru_utime - usage_before.ru_utime,
        cpu_system_seconds=usage_after.ru_stime - usage_before.ru_stime,
        writes=writes,
    )


def median_figures(rounds: Sequence[RoundFigures]) -> dict[str, float | None]:
    """Each figure's median over the rounds; None for a figure some round lacks."""
    summaries = [figures.summary() for figures in rounds]
    medians: dict[str, float | None] = {}
    for name in summaries[0]:
        values = [summary[name] for summary in summaries]
        numbers = [value for value in values if value is not None]
        medians[name] = round(statistics.median(numbers), 3) if len(numbers) == len(values) else None
    return medians


def require_rows_added(before: dict[str, int], after: dict[str, int], items: int, what: str) -> None:
    """Every applied item must have stored at least one row, in any state format: fewer means
    items were refused (a wrong shard, a missing account, a taken id) and the figures would
    measure refusals."""
    added = sum(after.values()) - sum(before.values())
    if added < items:
        raise BenchStateError(
            f"{what}: {items:,} items applied but only {added:,} rows added: items were refused"
        )


# -- the state cache of scripts/bench-core ------------------------------------------------------


def cache_key(transactions: int, accounts: int, lower_bound: int, upper_bound: int) -> str:
    """Names a preloaded state by everything that shapes it, the core's state format first: a
    core that changes its format finds no state of the old one."""
    return (
        f"format{tables.STATE_FORMAT_VERSION}-recipe{PRELOAD_RECIPE_VERSION}"
        f"-{transactions}tx-{accounts}accounts-keys{lower_bound:08x}-{upper_bound:08x}"
    )


def load_cached_state(cache_dir: Path, key: str, data_dir: Path) -> Preloaded | None:
    """Copy the cached state `key` into the empty `data_dir`; None when the cache has none."""
    entry = cache_dir / key
    description = entry / CACHE_DESCRIPTION_FILE_NAME
    if not description.is_file():
        return None
    for source in sorted((entry / CACHE_STATE_DIRECTORY_NAME).iterdir()):
        target = data_dir / source.name
        shutil.copyfile(source, target)
        # On disk before the first round: otherwise the copy's writeback runs during it and
        # counts as the round's device writes.
        with open(target, "rb") as file:
            os.fsync(file.fileno())
    obj = json.loads(description.read_text(encoding="utf-8"))
    return Preloaded(
        account_ids=tuple(int(account_id, 16) for account_id in obj["account_ids"]),
        transactions=int(obj["transactions"]),
        next_log_index=int(obj["next_log_index"]),
        seconds=float(obj["seconds"]),
    )


def store_cached_state(cache_dir: Path, key: str, data_dir: Path, preloaded: Preloaded) -> None:
    """Copy the closed state in `data_dir` into the cache as `key`; it appears complete or not
    at all."""
    entry = cache_dir / key
    partial = cache_dir / f".{key}{PARTIAL_SUFFIX}"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / CACHE_STATE_DIRECTORY_NAME).mkdir(parents=True)
    for source in sorted(data_dir.iterdir()):
        if source.name != LMDB_LOCK_FILE_NAME:
            shutil.copyfile(source, partial / CACHE_STATE_DIRECTORY_NAME / source.name)
    description = {
        "state_format_version": tables.STATE_FORMAT_VERSION,
        "preload_recipe_version": PRELOAD_RECIPE_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "transactions": preloaded.transactions,
        "next_log_index": preloaded.next_log_index,
        "seconds": preloaded.seconds,
        "account_ids": [format_account_id(account_id) for account_id in preloaded.account_ids],
    }
    (partial / CACHE_DESCRIPTION_FILE_NAME).write_text(json.dumps(description, indent=1), encoding="utf-8")
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(partial, entry)


# -- a whole cluster's state as a backup (scripts/preload-state) --------------------------------


@dataclass(frozen=True)
class ShardJob:
    """One shard to build; plain fields, so it crosses into a worker process."""

    shard_id: str
    lower_bound: int
    upper_bound: int
    transactions: int
    accounts: int
    work_dir: str
    snapshot_path: str


@dataclass(frozen=True)
class BuiltShard:
    backup: ShardBackup
    account_ids: tuple[int, ...]
    seconds: float


def build_shard_snapshot(job: ShardJob) -> BuiltShard:
    """Preload one shard in its own LMDB environment under `work_dir`, write its snapshot, and
    describe the file as `ledger-dev backup` would. Runs in a worker process."""

    def progress(line: str) -> None:
        print(f"{job.shard_id}: {line}", file=sys.stderr, flush=True)

    directory = Path(job.work_dir) / job.shard_id
    snapshot = Path(job.snapshot_path)
    core = AccountsCore.open(directory, job.lower_bound, job.upper_bound)
    try:
        preloaded = preload(
            ShardLog(core),
            job.lower_bound,
            job.upper_bound,
            accounts=job.accounts,
            transactions=job.transactions,
            rng=random.Random(),
            progress=progress,
        )
        header = core.write_snapshot(snapshot)
    finally:
        core.close()
    shutil.rmtree(directory)
    os.chmod(snapshot, FILE_MODE)  # private, as `ledger-dev backup` writes its files
    backup = ShardBackup(
        shard_id=job.shard_id,
        file=snapshot.name,
        sha256=file_sha256(snapshot),
        size_bytes=snapshot.stat().st_size,
        applied_index=header.applied_index,
        record_count=header.record_count,
        lower_bound=job.lower_bound,
        upper_bound=job.upper_bound,
        leader_node_id=PRELOAD_SOURCE_NODE_ID,
    )
    progress(
        f"{job.transactions:,} transactions in {preloaded.seconds:.1f} s, snapshot of"
        f" {backup.record_count:,} records, {backup.size_bytes / 1e6:,.1f} MB"
    )
    return BuiltShard(backup, preloaded.account_ids, preloaded.seconds)


def interleaved(groups: Sequence[Sequence[int]]) -> list[int]:
    """The first of every group, then the second of every group, ...: any prefix of the result
    spreads over all groups (a bench using the first N accounts loads every shard)."""
    longest = max((len(group) for group in groups), default=0)
    return [group[index] for index in range(longest) for group in groups if index < len(group)]


def build_backup(
    config: ClusterConfig,
    out_dir: Path,
    *,
    transactions_per_shard: int,
    accounts_per_shard: int,
    jobs: int,
    progress: Progress,
) -> Manifest:
    """A backup directory of `config`'s shards, each preloaded offline, in `ledger-dev backup`'s
    format (checked with its own validation at the end), and ACCOUNTS_FILE_NAME listing the
    accounts shard by shard in turn. `jobs` shards are built at once, each in its own process."""
    prepare_backup_directory(out_dir)
    work_dir = out_dir / WORK_DIRECTORY_NAME
    shard_jobs = [
        ShardJob(
            shard_id=shard.shard_id,
            lower_bound=shard.lower_bound,
            upper_bound=shard.upper_bound,
            transactions=transactions_per_shard,
            accounts=accounts_per_shard,
            work_dir=str(work_dir),
            snapshot_path=str(out_dir / f"{shard.shard_id}{SNAPSHOT_FILE_SUFFIX}"),
        )
        for shard in config.shards
    ]
    try:
        if jobs == 1:
            built = [build_shard_snapshot(job) for job in shard_jobs]
        else:
            # Spawned, not forked: the parent has imported grpc, whose threads do not survive a fork.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                built = list(pool.map(build_shard_snapshot, shard_jobs))
        shutil.rmtree(work_dir)
        accounts = interleaved([shard.account_ids for shard in built])
        accounts_file = out_dir / ACCOUNTS_FILE_NAME
        accounts_file.write_text(
            "".join(f"{format_account_id(account)}\n" for account in accounts), encoding="ascii"
        )
        os.chmod(accounts_file, FILE_MODE)
        fsync_directory(out_dir)
        manifest = Manifest(
            format_version=MANIFEST_FORMAT_VERSION,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            config=config.to_json_object(),
            shards=tuple(shard.backup for shard in built),
        )
        # Last, as `ledger-dev backup` does: a directory without a manifest is no backup.
        write_json_atomic(manifest.to_json_object(), out_dir / MANIFEST_FILE_NAME)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        for job in shard_jobs:
            Path(job.snapshot_path).unlink(missing_ok=True)
        (out_dir / ACCOUNTS_FILE_NAME).unlink(missing_ok=True)
        raise
    validate_backup(out_dir, progress)
    return manifest
