"""Handing a shard's leadership to another replica with Raft's TimeoutNow. Used only by
`replica`: a transfer an admin asks for, a node that stops gracefully, and the hand-back to the
shard's preferred leader that keeps leaders spread over the nodes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON

from ledger_cluster.errors import (
    LeadershipTransferDeniedError,
    LeadershipTransferIncompleteError,
    NotLeaderError,
    QueueFullError,
)

# How often a transfer checks whether the new leader has taken over.
TRANSFER_POLL_SECONDS = 0.02


class LeadershipTransfer:
    """One transfer attempt loop for one shard. `request` runs PySyncObj's transferLeadership
    on the Raft loop and reports its answer code through the callback."""

    def __init__(
        self,
        shard_id: str,
        node_id: str,
        *,
        run_on_loop: Callable[[Callable[[], None]], None],
        start_transfer: Callable[[Any, Callable[[Any, int], None]], None],
        leader_node_id: Callable[[], str | None],
        is_leader: Callable[[], bool],
    ) -> None:
        self._shard_id = shard_id
        self._node_id = node_id
        self._run_on_loop = run_on_loop
        self._start_transfer = start_transfer
        self._leader_node_id = leader_node_id
        self._is_leader = is_leader

    def run(self, target: Any, deadline: float, timeout_seconds: float) -> str:
        """Ask until the target took over or the deadline passed; the new leader's node id."""
        while True:
            answer = self._request(target, deadline)
            if answer == FAIL_REASON.SUCCESS:
                return self._wait_new_leader(deadline)
            if answer == FAIL_REASON.NOT_LEADER:
                raise NotLeaderError(
                    f"node {self._node_id} stopped leading shard {self._shard_id}", self._leader_node_id()
                )
            if time.monotonic() + TRANSFER_POLL_SECONDS >= deadline:
                raise LeadershipTransferDeniedError(
                    f"shard {self._shard_id}: the target is not connected or did not catch up with"
                    f" the leader's log within {timeout_seconds:.1f} s; nothing changed"
                )
            time.sleep(TRANSFER_POLL_SECONDS)

    def _request(self, target: Any, deadline: float) -> int:
        """One TimeoutNow request, made on the Raft loop; PySyncObj's answer code."""
        answered = threading.Event()
        answer: list[int] = []
        abandoned = threading.Event()

        def on_answer(_result: Any, error: int) -> None:
            answer.append(error)
            answered.set()

        def transfer() -> None:
            # A caller that stopped waiting was told "incomplete": it must not happen later.
            if abandoned.is_set():
                return
            try:
                self._start_transfer(target, on_answer)
            except Exception:
                on_answer(None, FAIL_REASON.REQUEST_DENIED)
                raise

        try:
            self._run_on_loop(transfer)
        except queue.Full:
            raise QueueFullError("too many leadership transfers are waiting") from None
        if not answered.wait(max(deadline - time.monotonic(), 0.0)):
            abandoned.set()
            raise LeadershipTransferIncompleteError(f"shard {self._shard_id}: no answer from the Raft group")
        return answer[0]

    def _wait_new_leader(self, deadline: float) -> str:
        while True:
            leader = self._leader_node_id()
            if leader is not None and leader != self._node_id and not self._is_leader():
                return leader
            if time.monotonic() >= deadline:
                raise LeadershipTransferIncompleteError(
                    f"shard {self._shard_id}: the target was asked to take over, but the leader"
                    f" is still {leader or 'unknown'}; the election may still finish"
                )
            time.sleep(TRANSFER_POLL_SECONDS)
