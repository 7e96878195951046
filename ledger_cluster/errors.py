"""The exception hierarchy of ledger-cluster.

Lower-layer errors (lmdb, grpc, pysyncobj) are translated into these at the module boundary
that owns the library, so callers catch one tree. A class marked with a module is defined
there, next to the only code that raises it or the types it carries (ApiError's gRPC code)::

    LedgerError
    ├── InvalidIdError            a malformed account or transaction id (also a ValueError)
    ├── ConfigError               a cluster config that is missing, unreadable or inconsistent
    ├── StorageError              the LMDB environment failed
    │   ├── StorageLayoutError    a data directory of other shard bounds or state format
    │   ├── RecordFormatError     a stored row that does not decode as its table's layout
    │   ├── DataDirectoryInUseError  another process holds the data directory
    │   └── SnapshotError         a snapshot that cannot be written or read
    │       └── SnapshotCorruptError   bad magic, truncated, or checksum mismatch
    ├── ReplicaBrokenError        state that must never happen; the process stops
    │   └── InvariantViolationError  a balance invariant failed after an apply
    ├── BackendUnavailableError   the owning shard cannot take the request now (retry)
    │   ├── NotLeaderError        this replica does not lead its shard; carries a leader hint
    │   ├── QueueFullError        the shard's queue of waiting writes is full
    │   └── ProposalDeniedError   the Raft group refused the proposal
    ├── BackendTimeoutError       the deadline passed before the shard took the request
    ├── UnknownOutcomeError       the command may or may not commit later; retry the same bytes
    ├── LeadershipTransferDeniedError      the leader refused to hand its shard over
    ├── LeadershipTransferIncompleteError  the handover was asked for; no new leader seen in time
    ├── BackupError               a backup, restore or backup verification that cannot complete
    ├── ApiError (status.py)      a request that fails with a precise gRPC status
    ├── LedgerApiError (sdk/errors.py)  a call the SDK's client saw fail; a subclass per code and reason
    ├── BenchError (bench.py)     a bench run that cannot finish
    ├── HandshakeError (raft_codec.py)  a Raft peer's hello is malformed or names the wrong nodes
    ├── FrameError (raft_codec.py)      a Raft frame fails authentication or is too long
    ├── MessageError (raft_codec.py)    an authenticated Raft frame that is no PySyncObj message
    └── LocalClusterError (localcluster/processes.py)  a local process did not do what was awaited

Domain outcomes (account not found, insufficient funds, ...) are never exceptions: the core
returns them as data.
"""


class LedgerError(Exception):
    """Root of every exception raised by ledger-cluster."""


class InvalidIdError(LedgerError, ValueError):
    """An account or transaction id that is not the fixed-width lowercase hex form."""


class ConfigError(LedgerError):
    """A cluster config that cannot be used."""


class StorageError(LedgerError):
    """The storage layer failed."""


class StorageLayoutError(StorageError):
    """A data directory opened with shard bounds other than the ones it was created with."""


class RecordFormatError(StorageError):
    """A stored row whose bytes are not a record of its table's layout."""


class DataDirectoryInUseError(StorageError):
    """Another live process holds the data directory's lock."""


class SnapshotError(StorageError):
    """A snapshot could not be written or restored."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot file is truncated, has a bad header, or fails its checksum."""


class ReplicaBrokenError(LedgerError):
    """The replica reached a state that must never happen; it has to stop."""


class InvariantViolationError(ReplicaBrokenError):
    """A balance invariant did not hold after an apply or a restore."""


class BackendUnavailableError(LedgerError):
    """The shard that owns a request cannot answer now (no leader, overloaded, shutting down).
    Nothing was applied; the same request may be retried."""


class QueueFullError(BackendUnavailableError):
    """The shard's queue of writes waiting to be proposed is full. Nothing was applied."""


class ProposalDeniedError(BackendUnavailableError):
    """The Raft group refused to append the proposal. Nothing was applied."""


class BackendTimeoutError(LedgerError):
    """The request's deadline passed before the shard accepted it. Nothing was applied."""


class NotLeaderError(BackendUnavailableError):
    """This replica does not lead its shard, so it did not take the command."""

    def __init__(self, message: str, leader_node_id: str | None) -> None:
        super().__init__(message)
        self.leader_node_id = leader_node_id


class UnknownOutcomeError(LedgerError):
    """The command was proposed but its fate is unknown (timeout, leader change, discarded
    entry): it may still commit. Never a failure of the operation; retry with the same bytes."""


class LeadershipTransferDeniedError(LedgerError):
    """The leader refused to hand over leadership: the target is not connected or not fully
    caught up with the leader's log. Nothing changed."""


class LeadershipTransferIncompleteError(LedgerError):
    """The leader asked the target to start an election, but no new leader was seen in time.
    The election may still finish; the shard elects a leader either way."""


class BackupError(LedgerError):
    """A backup, restore or verification that cannot be completed; the message says why."""
