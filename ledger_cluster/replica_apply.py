"""A shard replica's applier: committed entries are applied to the core on the shard's own
thread, in log order, so the synced LMDB commit never holds up the node's Raft loop. Used only
by `replica`.

An exception out of the core's apply stops the process (`on_broken`): the core has already
turned every deterministic failure of a command into that command's answer
(core/apply_failures.py), so what is left depends on this machine (storage, memory) and must
not be answered differently here than on the other replicas.

The Raft loop hands over each committed entry and gets a `PendingApply` back at once; the
proposer's answer waits for it. The core stores each entry's index with its effects, so an
entry handed over but not yet applied when the process dies is applied again from the journal
after the restart, exactly once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from ledger_cluster import metrics
from ledger_cluster.core import AccountsCore

logger = logging.getLogger(__name__)

# Entries handed over and not yet applied. When it is full the Raft loop waits (the back
# pressure of a disk slower than the log); a compaction leaves at most a journal's worth.
APPLY_QUEUE_ENTRIES_MAX = 100_000
APPLIER_JOIN_TIMEOUT_SECONDS = 30.0


class PendingApply:
    """The result of one entry's apply, once the applier has it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._result: Any = None
        self._callbacks: list[Callable[[Any], None]] = []

    def when_applied(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(result)` once applied: now, or later on the applier's thread."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self._result)

    def resolve(self, result: Any) -> None:
        with self._lock:
            self._done = True
            self._result = result
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(result)


@dataclass(frozen=True)
class _Entry:
    envelope: bytes
    index: int
    answering: bool
    pending: PendingApply


_Job = _Entry | Callable[[], None] | None


class ShardApplier:
    def __init__(
        self, shard_id: str, core: AccountsCore, on_broken: Callable[[BaseException], NoReturn]
    ) -> None:
        self._shard_id = shard_id
        self._core = core
        self._on_broken = on_broken
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=APPLY_QUEUE_ENTRIES_MAX)
        self._thread = threading.Thread(target=self._run, name=f"apply-{shard_id}", daemon=True)
        self._thread.start()

    def apply(self, envelope: bytes, index: int, answering: bool) -> PendingApply:
        pending = PendingApply()
        self._jobs.put(_Entry(envelope, index, answering, pending))
        return pending

    def after_applied(self, task: Callable[[], None]) -> None:
        """Run `task` on the applier's thread once every entry handed over so far is applied
        (and before any later one)."""
        self._jobs.put(task)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(APPLIER_JOIN_TIMEOUT_SECONDS)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if isinstance(job, _Entry):
                    self._apply(job)
                else:
                    job()
            except BaseException as error:  # an apply that fails must not be skipped
                self._on_broken(error)

    def _apply(self, entry: _Entry) -> None:
        refused_before = self._core.refused_commands
        with metrics.APPLY_LATENCY.time():
            result = self._core.apply(entry.envelope, entry.index, answering=entry.answering)
        refused = self._core.refused_commands - refused_before
        if refused:
            # The core answered them (core/apply_failures.py); the count is what alerts.
            metrics.APPLY_REFUSED_COMMANDS.labels(shard=self._shard_id).inc(refused)
        entry.pending.resolve(result)
