"""Whole-cluster backup, restore and verification (the `ledger-dev backup`, `restore` and
`verify` commands).

Backup directory layout::

    <dir>/manifest.json        written last, atomically: a backup without it is incomplete
    <dir>/<shard id>.snapshot  one snapshot stream (storage.py format) per shard of the source

A backup is taken shard by shard from each shard's leader over NodeService.Snapshot; each file
is checked against the sha256 the leader sent and against its own trailer checksum before the
manifest names it. Restore checks the manifest and every file before it writes anything, then
builds each shard of the target config (any shard count) from every backup snapshot whose key
range overlaps it, keeping only the target's rows, with applied index 0: the restored cluster
starts a fresh Raft log on top of that state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from ledger_cluster.client import CHANNEL_OPTIONS, leaders_of, node_statuses_now
from ledger_cluster.config import ClusterConfig, ShardConfig, json_field, write_json_atomic
from ledger_cluster.core import SNAPSHOT_TABLE_IDS, AccountsCore
from ledger_cluster.errors import BackupError, ConfigError, SnapshotError, StorageError
from ledger_cluster.internal.v1 import node_pb2, node_pb2_grpc
from ledger_cluster.node_protocol import LEADER_HINT_METADATA_KEY, NodeReason
from ledger_cluster.security import ClientCredentials
from ledger_cluster.sharding import SHARD_KEY_MAX
from ledger_cluster.status import error_details
from ledger_cluster.storage import (
    RESTORE_MARKER_FILE_NAME,
    DirectoryLock,
    SnapshotHeader,
    check_snapshot,
    fsync_directory,
    make_private_directory,
)

MANIFEST_FORMAT_VERSION = 1
MANIFEST_FILE_NAME = "manifest.json"
SNAPSHOT_FILE_SUFFIX = ".snapshot"
PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o600
HASH_BLOCK_BYTES = 1024 * 1024
# Backup: how long one shard's whole snapshot stream may take, how often a shard is tried again
# (a leader that changed, died mid-stream, or is busy), and the pause between tries.
SNAPSHOT_STREAM_TIMEOUT_SECONDS_DEFAULT = 600.0
SNAPSHOT_ATTEMPTS_MAX = 8
SNAPSHOT_RETRY_PAUSE_SECONDS = 0.5
LEADER_DISCOVERY_TIMEOUT_SECONDS = 2.0
# Verify: one Verify call's deadline (it scans a whole replica), and how long replicas of one
# shard at different applied indexes are polled to reach the same one before that counts as a
# mismatch.
VERIFY_RPC_TIMEOUT_SECONDS_DEFAULT = 60.0
VERIFY_SETTLE_SECONDS_DEFAULT = 10.0
VERIFY_POLL_INTERVAL_SECONDS = 0.25
# Backup file names come from shard ids (config-validated); anything else in a manifest is
# refused, so a manifest cannot point restore outside its directory.
_FILE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}\.snapshot$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[str], None]


# -- manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardBackup:
    shard_id: str
    file: str
    sha256: str
    size_bytes: int
    applied_index: int
    record_count: int
    lower_bound: int
    upper_bound: int
    leader_node_id: str

    def to_json_object(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "file": self.file,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "applied_index": self.applied_index,
            "record_count": self.record_count,
            "lower_bound": self.lower_bound,
            "upper_bound": self.upper_bound,
            "leader_node_id": self.leader_node_id,
        }

    def overlaps(self, shard: ShardConfig) -> bool:
        return self.lower_bound <= shard.upper_bound and shard.lower_bound <= self.upper_bound


@dataclass(frozen=True)
class Manifest:
    format_version: int
    created_at: str
    config: dict[str, Any]
    shards: tuple[ShardBackup, ...]

    def to_json_object(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created_at": self.created_at,
            "config": self.config,
            "shards": [shard.to_json_object() for shard in self.shards],
        }


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BackupError(message)


def _manifest_field(obj: Any, name: str, kind: type, where: str) -> Any:
    return json_field(obj, name, kind, where, BackupError)


def _parse_shard_backup(obj: Any, index: int) -> ShardBackup:
    where = f"manifest shards[{index}]"

    def text(name: str) -> str:
        value: str = _manifest_field(obj, name, str, where)
        return value

    def number(name: str, maximum: int) -> int:
        value: int = _manifest_field(obj, name, int, where)
        _require(0 <= value <= maximum, f"{where}.{name} = {value} is out of range 0..{maximum}")
        return value

    shard = ShardBackup(
        shard_id=text("shard_id"),
        file=text("file"),
        sha256=text("sha256"),
        size_bytes=number("size_bytes", 2**63 - 1),
        applied_index=number("applied_index", 2**64 - 1),
        record_count=number("record_count", 2**64 - 1),
        lower_bound=number("lower_bound", SHARD_KEY_MAX),
        upper_bound=number("upper_bound", SHARD_KEY_MAX),
        leader_node_id=text("leader_node_id"),
    )
    _require(
        _FILE_NAME_PATTERN.match(shard.file) is not None,
        f"{where}.file {shard.file!r} is not a snapshot file name of this tool",
    )
    _require(_SHA256_PATTERN.match(shard.sha256) is not None, f"{where}.sha256 is not a lowercase hex sha256")
    return shard


def parse_manifest(obj: Any) -> Manifest:
    version = _manifest_field(obj, "format_version", int, "manifest")
    _require(version == MANIFEST_FORMAT_VERSION, f"unsupported manifest format_version {version}")
    shards = tuple(
        _parse_shard_backup(shard, index)
        for index, shard in enumerate(_manifest_field(obj, "shards", list, "manifest"))
    )
    _require(bool(shards), "manifest lists no shards")
    files = [shard.file for shard in shards]
    _require(len(set(files)) == len(files), "manifest names a file twice")
    expected_lower = 0
    for shard in shards:
        _require(
            shard.lower_bound == expected_lower and shard.lower_bound <= shard.upper_bound,
            f"manifest shard {shard.shard_id} covers keys {shard.lower_bound}..{shard.upper_bound}, "
            f"expected a range from {expected_lower}: shards must be sorted, contiguous, without overlap",
        )
        expected_lower = shard.upper_bound + 1
    _require(
        expected_lower == SHARD_KEY_MAX + 1,
        f"manifest shards end at key {expected_lower - 1}, not {SHARD_KEY_MAX}: the backup is incomplete",
    )
    return Manifest(
        format_version=version,
        created_at=_manifest_field(obj, "created_at", str, "manifest"),
        config=_manifest_field(obj, "config", dict, "manifest"),
        shards=shards,
    )


def load_manifest(backup_dir: Path) -> Manifest:
    path = backup_dir / MANIFEST_FILE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BackupError(f"{path} does not exist: not a backup, or an incomplete one") from None
    except OSError as error:
        raise BackupError(f"cannot read {path}: {error.strerror}") from error
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise BackupError(f"{path} is not valid JSON: {error}") from error
    return parse_manifest(obj)


# -- files --------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _check_snapshot_header(
    header: SnapshotHeader, what: str, *, lower: int, upper: int, applied_index: int, record_count: int
) -> None:
    expected = (lower, upper, applied_index, record_count)
    found = (header.shard_lower_bound, header.shard_upper_bound, header.applied_index, header.record_count)
    _require(
        found == expected,
        f"{what}: header says keys {found[0]}..{found[1]}, applied index {found[2]}, {found[3]} records; "
        f"expected keys {expected[0]}..{expected[1]}, applied index {expected[2]}, {expected[3]} records",
    )


# -- node stubs ---------------------------------------------------------------------------------


@contextmanager
def node_stubs(
    config: ClusterConfig, credentials: ClientCredentials
) -> Iterator[dict[str, node_pb2_grpc.NodeServiceStub]]:
    """A NodeService stub per node of the config, their channels closed afterwards."""
    with ExitStack() as stack:
        stubs = {}
        for node in config.nodes:
            channel = stack.enter_context(credentials.channel(node.grpc_address, options=CHANNEL_OPTIONS))
            stubs[node.node_id] = node_pb2_grpc.NodeServiceStub(channel)
        yield stubs


def _describe(error: grpc.RpcError) -> str:
    details = error_details(error)
    reason = f" {details.reason}" if details.reason else ""
    return f"{details.code.name}{reason}: {details.message}"


# -- backup -------------------------------------------------------------------------------------


def _receive_snapshot(
    stub: node_pb2_grpc.NodeServiceStub,
    shard: ShardConfig,
    node_id: str,
    target: Path,
    timeout_seconds: float,
) -> ShardBackup:
    """Stream one shard's snapshot from `node_id` into `target` and check it end to end."""
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    digest = hashlib.sha256()
    received = 0
    last: node_pb2.SnapshotChunk | None = None
    calls = stub.Snapshot(node_pb2.SnapshotRequest(shard_id=shard.shard_id), timeout=timeout_seconds)
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(descriptor, "wb") as file:
            for chunk in calls:
                _require(last is None, f"shard {shard.shard_id}: {node_id} sent chunks after the last one")
                _require(
                    chunk.offset == received,
                    f"shard {shard.shard_id}: {node_id} sent a chunk at offset {chunk.offset}, "
                    f"expected {received}",
                )
                file.write(chunk.data)
                digest.update(chunk.data)
                received += len(chunk.data)
                if chunk.last:
                    last = chunk
            _require(last is not None, f"shard {shard.shard_id}: the stream from {node_id} ended early")
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        calls.cancel()
        partial.unlink(missing_ok=True)
        raise
    assert last is not None  # narrowed for mypy; required just above
    try:
        _require(
            last.total_bytes == received,
            f"shard {shard.shard_id}: received {received} bytes, {node_id} sent {last.total_bytes}",
        )
        _require(
            digest.hexdigest() == last.sha256,
            f"shard {shard.shard_id}: sha256 of the received stream {digest.hexdigest()} differs from "
            f"the one {node_id} sent ({last.sha256}): damaged in transfer",
        )
        what = f"shard {shard.shard_id} snapshot from {node_id}"
        try:
            header = check_snapshot(partial, SNAPSHOT_TABLE_IDS)
        except SnapshotError as error:
            raise BackupError(f"{what} fails its own check: {error}") from error
        _check_snapshot_header(
            header,
            what,
            lower=shard.lower_bound,
            upper=shard.upper_bound,
            applied_index=last.applied_index,
            record_count=last.record_count,
        )
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return ShardBackup(
        shard_id=shard.shard_id,
        file=target.name,
        sha256=last.sha256,
        size_bytes=received,
        applied_index=header.applied_index,
        record_count=header.record_count,
        lower_bound=shard.lower_bound,
        upper_bound=shard.upper_bound,
        leader_node_id=last.node_id or node_id,
    )


def _backup_shard(
    stubs: dict[str, node_pb2_grpc.NodeServiceStub],
    shard: ShardConfig,
    target: Path,
    *,
    leader_hint: str | None,
    timeout_seconds: float,
    progress: Progress,
) -> ShardBackup:
    """Ask the leader (following hints; the replicas in turn while none is known)."""
    replica_ids = [replica.node_id for replica in shard.replicas]
    candidate = leader_hint if leader_hint is not None and leader_hint in replica_ids else replica_ids[0]
    problems: list[str] = []
    for attempt in range(SNAPSHOT_ATTEMPTS_MAX):
        try:
            return _receive_snapshot(stubs[candidate], shard, candidate, target, timeout_seconds)
        except grpc.RpcError as error:
            details = error_details(error)
            problems.append(f"{candidate}: {_describe(error)}")
            hint = details.metadata.get(LEADER_HINT_METADATA_KEY, "")
            if details.reason == NodeReason.NOT_LEADER and hint in replica_ids and hint != candidate:
                progress(f"shard {shard.shard_id}: {candidate} does not lead it; asking {hint}")
                candidate = hint
                continue
            candidate = replica_ids[(replica_ids.index(candidate) + 1) % len(replica_ids)]
        if attempt + 1 < SNAPSHOT_ATTEMPTS_MAX:
            time.sleep(SNAPSHOT_RETRY_PAUSE_SECONDS)
    raise BackupError(
        f"shard {shard.shard_id}: no snapshot after {SNAPSHOT_ATTEMPTS_MAX} attempts: {'; '.join(problems)}"
    )


def prepare_backup_directory(out_dir: Path) -> None:
    if out_dir.exists():
        _require(out_dir.is_dir(), f"{out_dir} exists and is not a directory")
        entries = sorted(entry.name for entry in out_dir.iterdir())
        _require(
            not entries,
            f"{out_dir} is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); "
            "a backup goes into a new or empty directory",
        )
    make_private_directory(out_dir)


def backup_cluster(
    config: ClusterConfig,
    credentials: ClientCredentials,
    out_dir: Path,
    progress: Progress,
    timeout_seconds: float = SNAPSHOT_STREAM_TIMEOUT_SECONDS_DEFAULT,
) -> Manifest:
    """Snapshot every shard from its leader into `out_dir`, then write the manifest. On any
    failure the files written so far are removed and no manifest exists."""
    prepare_backup_directory(out_dir)
    leaders = leaders_of(node_statuses_now(config, credentials, LEADER_DISCOVERY_TIMEOUT_SECONDS))
    written: list[Path] = []
    try:
        shards = []
        with node_stubs(config, credentials) as stubs:
            for index, shard in enumerate(config.shards):
                target = out_dir / f"{shard.shard_id}{SNAPSHOT_FILE_SUFFIX}"
                _require(not target.exists(), f"{target} appeared while the backup ran")
                written.append(target)
                backup = _backup_shard(
                    stubs,
                    shard,
                    target,
                    leader_hint=leaders.get(shard.shard_id),
                    timeout_seconds=timeout_seconds,
                    progress=progress,
                )
                shards.append(backup)
                progress(
                    f"[{index + 1}/{len(config.shards)}] {shard.shard_id}: applied index "
                    f"{backup.applied_index}, {backup.record_count} records, {backup.size_bytes} bytes "
                    f"from {backup.leader_node_id}"
                )
        fsync_directory(out_dir)
        manifest = Manifest(
            format_version=MANIFEST_FORMAT_VERSION,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            config=config.to_json_object(),
            shards=tuple(shards),
        )
        write_json_atomic(manifest.to_json_object(), out_dir / MANIFEST_FILE_NAME)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return manifest


# -- restore ------------------------------------------------------------------------------------


def validate_backup(backup_dir: Path, progress: Progress) -> Manifest:
    """The manifest, and every file it names: size, sha256, its own structure and checksum, and
    a header that agrees with the manifest. Reads only."""
    manifest = load_manifest(backup_dir)
    for shard in manifest.shards:
        path = backup_dir / shard.file
        what = f"backup file {path}"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BackupError(f"{what} is missing") from None
        _require(
            size == shard.size_bytes,
            f"{what} has {size} bytes, the manifest says {shard.size_bytes}: "
            + ("cut short" if size < shard.size_bytes else "grown"),
        )
        actual = file_sha256(path)
        _require(
            actual == shard.sha256,
            f"{what} is damaged: sha256 {actual}, the manifest says {shard.sha256}",
        )
        try:
            header = check_snapshot(path, SNAPSHOT_TABLE_IDS)
        except SnapshotError as error:
            raise BackupError(f"{what} fails its snapshot check: {error}") from error
        _check_snapshot_header(
            header,
            what,
            lower=shard.lower_bound,
            upper=shard.upper_bound,
            applied_index=shard.applied_index,
            record_count=shard.record_count,
        )
        progress(f"checked {path.name}: {shard.record_count} records, sha256 {shard.sha256[:12]}")
    return manifest


def _holds_data(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@dataclass(frozen=True)
class RestoredShard:
    shard_id: str
    source_shard_ids: tuple[str, ...]
    node_ids: tuple[str, ...]


def _build_shard(
    staging: Path, shard: ShardConfig, sources: list[tuple[ShardBackup, Path]], progress: Progress
) -> Path:
    """The shard's LMDB environment from its overlapping backup snapshots, checked."""
    directory = staging / shard.shard_id
    core = AccountsCore.open(directory, shard.lower_bound, shard.upper_bound)
    try:
        for source, path in sources:
            core.restore_snapshot(path, applied_index=lambda _header: 0, replace=False)
            progress(f"{shard.shard_id}: merged the rows of {source.shard_id} inside its bounds")
        applied_index, digest, problems, _ = core.verify_report()
    finally:
        core.close()
    _require(
        not problems,
        f"restored shard {shard.shard_id} fails verification: {'; '.join(problems[:3])}",
    )
    _require(applied_index == 0, f"restored shard {shard.shard_id} has applied index {applied_index}")
    progress(f"{shard.shard_id}: verified, state digest {digest[:12]}")
    return directory


def _install_replica(built: Path, destination: Path) -> None:
    """Copy a closed LMDB environment into place: a private directory that appears under its
    final name only once complete."""
    partial = destination.with_name(f".{destination.name}{PARTIAL_SUFFIX}")
    shutil.rmtree(partial, ignore_errors=True)
    make_private_directory(partial)
    for source in sorted(built.iterdir()):
        if source.name == "lock.mdb":
            continue  # LMDB's reader table; recreated by whoever opens the environment
        target = partial / source.name
        shutil.copyfile(source, target)
        os.chmod(target, FILE_MODE)
        with open(target, "rb") as file:
            os.fsync(file.fileno())
    os.replace(partial, destination)
    fsync_directory(destination.parent)


def restore_cluster(
    backup_dir: Path, config: ClusterConfig, data_root: Path, progress: Progress
) -> list[RestoredShard]:
    """Prepare `data_root/<node id>/` for every node of `config` from the backup. Checks the
    backup and refuses existing data before writing anything; on a later failure it removes
    every replica it installed."""
    manifest = validate_backup(backup_dir, progress)
    placements = [
        (node.node_id, shard)
        for node in config.nodes
        for shard in config.shards
        if any(replica.node_id == node.node_id for replica in shard.replicas)
    ]
    occupied = [
        str(path)
        for node_id, shard in placements
        for path in (
            data_root / node_id / "replicas" / shard.shard_id,
            data_root / node_id / "raft" / shard.shard_id,
        )
        if _holds_data(path)
    ]
    _require(not occupied, f"refusing to overwrite existing shard data: {', '.join(occupied)}")
    make_private_directory(data_root)
    installed: list[Path] = []
    locks: list[DirectoryLock] = []
    staging = Path(tempfile.mkdtemp(prefix=".restore-staging-", dir=data_root))
    try:
        for node in config.nodes:
            try:
                locks.append(DirectoryLock(data_root / node.node_id))
            except StorageError as error:
                raise BackupError(f"cannot restore node {node.node_id}: {error}") from error
        markers = [data_root / node.node_id / RESTORE_MARKER_FILE_NAME for node in config.nodes]
        for marker in markers:
            marker.write_text("ledger-dev restore has not finished\n")
            fsync_directory(marker.parent)
        restored = []
        for shard in config.shards:
            sources = [
                (backup, backup_dir / backup.file) for backup in manifest.shards if backup.overlaps(shard)
            ]
            built = _build_shard(staging, shard, sources, progress)
            node_ids = tuple(replica.node_id for replica in shard.replicas)
            for node_id in node_ids:
                destination = data_root / node_id / "replicas" / shard.shard_id
                make_private_directory(destination.parent)
                _install_replica(built, destination)
                installed.append(destination)
            progress(f"{shard.shard_id}: installed on {', '.join(node_ids)}")
            shutil.rmtree(built)
            restored.append(RestoredShard(shard.shard_id, tuple(s.shard_id for s, _ in sources), node_ids))
        for marker in markers:
            marker.unlink()
            fsync_directory(marker.parent)
        return restored
    except (SnapshotError, StorageError, ConfigError, OSError) as error:
        _remove(installed)
        _remove_markers(data_root, config)
        raise BackupError(f"restore failed, nothing kept: {error}") from error
    except BaseException:
        _remove(installed)
        _remove_markers(data_root, config)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for lock in locks:
            lock.release()


def _remove_markers(data_root: Path, config: ClusterConfig) -> None:
    for node in config.nodes:
        (data_root / node.node_id / RESTORE_MARKER_FILE_NAME).unlink(missing_ok=True)


def _remove(directories: list[Path]) -> None:
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


# -- verify -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaVerification:
    node_id: str
    answer: node_pb2.VerifyResponse | None
    error: str  # empty when the replica answered


@dataclass(frozen=True)
class ShardVerification:
    shard_id: str
    replicas: tuple[ReplicaVerification, ...]
    failures: tuple[str, ...]  # empty: clean

    @property
    def clean(self) -> bool:
        return not self.failures


def _verify_round(
    stubs: dict[str, node_pb2_grpc.NodeServiceStub], shard: ShardConfig, timeout_seconds: float
) -> tuple[ReplicaVerification, ...]:
    request = node_pb2.VerifyRequest(shard_id=shard.shard_id)
    calls = {
        replica.node_id: stubs[replica.node_id].Verify.future(request, timeout=timeout_seconds)
        for replica in shard.replicas
    }
    results = []
    for node_id, call in calls.items():
        try:
            results.append(ReplicaVerification(node_id, call.result(), ""))
        except grpc.RpcError as error:
            results.append(ReplicaVerification(node_id, None, _describe(error)))
    return tuple(results)


def _judge(replicas: tuple[ReplicaVerification, ...]) -> tuple[str, ...]:
    failures = [f"{r.node_id} did not answer: {r.error}" for r in replicas if r.answer is None]
    by_index: dict[int, dict[str, str]] = {}
    for replica in replicas:
        if replica.answer is None:
            continue
        answer = replica.answer
        if answer.problem_count:
            failures.append(
                f"{replica.node_id}: {answer.problem_count} problems, first: {'; '.join(answer.problems[:3])}"
            )
        by_index.setdefault(answer.applied_index, {})[replica.node_id] = answer.digest
    for applied_index, digests in sorted(by_index.items()):
        if len(set(digests.values())) > 1:
            described = ", ".join(f"{node} {digest[:12]}" for node, digest in sorted(digests.items()))
            failures.append(f"replicas differ at applied index {applied_index}: {described}")
    if len(by_index) > 1:
        described = ", ".join(
            f"{node} {index}" for index, digests in sorted(by_index.items()) for node in sorted(digests)
        )
        failures.append(f"replicas did not reach the same applied index: {described}")
    return tuple(failures)


@dataclass(frozen=True)
class TransferCheck:
    """The transfers of the whole cluster, from one replica of each shard."""

    debit_legs: int
    credit_legs: int
    unfinished: int
    failures: tuple[str, ...]  # empty: clean


_LEGS_HASH_MODULUS = 2**128


def check_transfers(shards: Sequence[ShardVerification]) -> TransferCheck:
    """Every transfer's legs agree (the sums of the debit legs' and the credit legs' hashes
    meet), nothing is unfinished, and per currency the legs' settled and pending amounts sum to
    zero: transfers move money and never make it. Meaningful once the cluster is quiet."""
    debit_hash = credit_hash = debit_legs = credit_legs = unfinished = 0
    settled: dict[str, int] = {}
    pending: dict[str, int] = {}
    failures = []
    for shard in shards:
        answers = [replica.answer for replica in shard.replicas if replica.answer is not None]
        if not answers:
            failures.append(f"{shard.shard_id}: no replica answered, so its transfers are not counted")
            continue
        summary = answers[0].transfers
        debit_hash += int.from_bytes(summary.debit_legs_hash, "big")
        credit_hash += int.from_bytes(summary.credit_legs_hash, "big")
        debit_legs += summary.debit_legs
        credit_legs += summary.credit_legs
        unfinished += summary.unfinished
        if summary.unfinished:
            failures.append(
                f"{shard.shard_id}: {summary.unfinished} transfers still owe their credit shard work"
            )
        for flow in summary.currencies:
            settled[flow.currency] = settled.get(flow.currency, 0) + int(flow.settled)
            pending[flow.currency] = pending.get(flow.currency, 0) + int(flow.pending)
    if (debit_hash - credit_hash) % _LEGS_HASH_MODULUS or debit_legs != credit_legs:
        failures.append(
            f"transfer legs disagree: {debit_legs} debit legs and {credit_legs} credit legs whose"
            " amounts, statuses or settled amounts do not all meet"
        )
    for currency in sorted(settled):
        name = currency or "(no currency)"
        if settled[currency]:
            failures.append(f"{name}: transfers created {settled[currency]} (settled legs do not sum to 0)")
        if pending[currency]:
            failures.append(f"{name}: pending transfer legs sum to {pending[currency]}, not 0")
    return TransferCheck(debit_legs, credit_legs, unfinished, tuple(failures))


def verify_cluster(
    config: ClusterConfig,
    credentials: ClientCredentials,
    progress: Progress,
    timeout_seconds: float = VERIFY_RPC_TIMEOUT_SECONDS_DEFAULT,
    settle_seconds: float = VERIFY_SETTLE_SECONDS_DEFAULT,
) -> list[ShardVerification]:
    """Verify every replica of every shard; replicas at different applied indexes are asked
    again until they meet or `settle_seconds` pass (replicas of a busy shard may never meet)."""
    results = []
    with node_stubs(config, credentials) as stubs:
        for shard in config.shards:
            deadline = time.monotonic() + settle_seconds
            while True:
                replicas = _verify_round(stubs, shard, timeout_seconds)
                indexes = {r.answer.applied_index for r in replicas if r.answer is not None}
                if len(indexes) <= 1 or time.monotonic() >= deadline:
                    break
                progress(f"{shard.shard_id}: replicas at applied indexes {sorted(indexes)}; asking again")
                time.sleep(VERIFY_POLL_INTERVAL_SECONDS)
            failures = _judge(replicas)
            results.append(ShardVerification(shard.shard_id, replicas, failures))
    return results
