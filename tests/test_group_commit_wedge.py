"""The group-commit wedge, reproduced on a real cluster (3 node processes, 1 shard, PySyncObj,
gRPC, LMDB on loopback), and writes through the once-wedged replica afterwards.

A shard leader proposes one entry at a time (GROUP_COMMIT_IN_FLIGHT_MAX = 1) and used to free
that slot only in the proposal's PySyncObj callback. PySyncObj calls it when the entry's index
is applied on this replica, and never for an index that a snapshot install skips. So: leader A
proposes entry i and is paused; B takes over, commits and compacts its log past i; A returns and
installs B's snapshot; from then on, whenever A led the shard, every write and consistent read
waited behind the dead slot and failed as not proposed until the process restarted.

The sequence is driven step by step, each step checked before the next: A appended i while it
led and could not commit it (both followers paused), B and C hold no entry at or before i once
they compacted (NodeService.Status), so A can only catch up from a snapshot, and A's log says it
restored one. Then A leads again and must answer writes and a consistent read within seconds.
Last, the stranded write, which never committed, must have been answered OUTCOME_UNKNOWN (the
reason says which path freed the slot), never OK.

Without the fix the test fails every time, for one of two reasons, decided by a race inside A
that no outside step controls. A PySyncObj follower raises its commit index to
min(leader's commit, own last index) on every append_entries it does not reject, and it rejects
no chunk of a snapshot transfer (they carry no log position to check); so when A ticks between
the first chunk and the last, it applies its own uncommitted entry i just before the snapshot
replaces its state. Then the callback does
run (the slot is freed) and answers OK for a write the ledger never holds: "the stranded write
was acknowledged OK, yet the ledger does not hold it". When both chunks are read together, the
callback never runs and A wedges: "a write to node01 failed: DEADLINE_EXCEEDED NOT_PROPOSED".
The fix answers the stranded write OUTCOME_UNKNOWN when A stops leading, before either can
happen, so with it the outcome is the same every run.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.gateway import views
from ledger_cluster.ids import parse_account_id
from ledger_cluster.internal.v1 import core_pb2, node_pb2
from ledger_cluster.node_protocol import NodeReason
from ledger_cluster.replica import LEADER_FALLBACK_TIMEOUT_SECONDS
from ledger_cluster.status import error_details
from tests.cluster import Cluster, running_cluster
from tests.processes import POLL_INTERVAL_SECONDS, scrape, value_of
from tests.test_cluster import (
    RETRYABLE_CODES,
    RPC_TIMEOUT_SECONDS,
    create_transaction_command,
    get_account,
    new_record,
    send_until_answered,
)

Value = TypeVar("Value")

# Compact a replica's log once it holds more entries than this: well above what a fresh
# cluster's log holds when A proposes (so A's own log cannot be compacted under the test's
# feet), small enough that the writes of the second step compact B and C past A's entry.
COMPACTION_MIN_ENTRIES = 20
WRITES_TO_COMPACT = 3 * COMPACTION_MIN_ENTRIES
# The stranded write's deadline: longer than the whole test, so only the replica can end it.
STRANDED_CALL_TIMEOUT_SECONDS = 120.0
# A write or consistent read sent to A once it leads again must be answered within this.
ANSWER_TIMEOUT_SECONDS = 5.0
WRITES_AFTER_RETURN = 3
WRITE_ATTEMPT_TIMEOUT_SECONDS = 3.0
TRANSFER_TIMEOUT_SECONDS = 5.0
STEP_TIMEOUT_SECONDS = 30.0
# A leader that hears from no majority steps down after LEADER_FALLBACK_TIMEOUT_SECONDS; A must
# be paused while it still leads, with this much to spare.
STILL_LEADING_MARGIN_SECONDS = 1.0
FIRST_AMOUNT = 100_000
STRANDED_AMOUNT = 1_000_000
# What fail_in_flight tells the stranded writer, by the path that freed the slot.
FREED_BY_LEADERSHIP_LOSS = "stopped leading"
FREED_BY_SNAPSHOT = "snapshot from the leader"


def poll(cluster: Cluster, what: str, probe: Callable[[], Value | None], timeout_seconds: float) -> Value:
    """`probe()` every poll interval until it returns something other than None."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            cluster.fail(f"not within {timeout_seconds} s: {what}")
        time.sleep(POLL_INTERVAL_SECONDS)


def replica_status(cluster: Cluster, node_id: str, shard_id: str) -> node_pb2.ReplicaStatus:
    replicas = [replica for replica in cluster.status(node_id).replicas if replica.shard_id == shard_id]
    assert len(replicas) == 1, f"{node_id}: {replicas}"
    return replicas[0]


def leader_among(cluster: Cluster, shard_id: str, node_ids: Sequence[str]) -> str | None:
    """The one replica among `node_ids` that leads with a quorum and that the others follow at
    its term; None while that is not so (or one of them does not answer)."""
    try:
        views = [replica_status(cluster, node_id, shard_id) for node_id in node_ids]
    except grpc.RpcError:
        return None
    leading = [view for view in views if view.is_leader and view.has_quorum]
    if len(leading) != 1:
        return None
    leader = leading[0]
    if all(view.leader_node_id == leader.node_id and view.term == leader.term for view in views):
        return leader.node_id
    return None


def log_grown(
    cluster: Cluster, shard_id: str, node_id: str, log_entries: int
) -> node_pb2.ReplicaStatus | None:
    status = replica_status(cluster, node_id, shard_id)
    return status if status.log_entries > log_entries else None


def first_log_index_at_least(status: node_pb2.ReplicaStatus) -> int:
    """A lower bound of the first index in a replica's Raft log: its last index is at least its
    commit index, and the log holds `log_entries` consecutive entries up to the last."""
    return status.commit_index - status.log_entries + 1


def compacted_past(
    cluster: Cluster, shard_id: str, node_ids: Sequence[str], index: int
) -> dict[str, int] | None:
    """node id -> a lower bound of its log's first index, once every one is past `index`."""
    starts = {
        node_id: first_log_index_at_least(replica_status(cluster, node_id, shard_id)) for node_id in node_ids
    }
    return starts if all(start > index for start in starts.values()) else None


def lead_with(cluster: Cluster, shard_id: str, node_id: str) -> None:
    """Transfer the shard's leadership to `node_id` until it leads (a transfer is denied while
    the target catches up, and another follower may win the election it starts)."""
    deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
    while (leader := cluster.leader_of(shard_id)) != node_id:
        if time.monotonic() > deadline:
            cluster.fail(f"{node_id} did not take over {shard_id} from {leader}")
        try:
            cluster.transfer_leadership(shard_id, leader, node_id, TRANSFER_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            details = error_details(error)
            print(f"transfer {shard_id} {leader} -> {node_id}: {details.code.name} {details.reason}")


def write_through_leader(
    cluster: Cluster, shard_id: str, node_ids: Sequence[str], command: bytes
) -> core_pb2.CommandResult:
    """One write sent to whichever of `node_ids` leads, the same bytes again after every open
    outcome (a replica applies the same command once)."""
    deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
    errors: list[str] = []
    while time.monotonic() < deadline:
        leader = leader_among(cluster, shard_id, node_ids)
        if leader is not None:
            request = node_pb2.UpdateRequest(shard_id=shard_id, command=command)
            try:
                return cluster.node_stub(leader).Update(request, timeout=WRITE_ATTEMPT_TIMEOUT_SECONDS).result
            except grpc.RpcError as error:
                details = error_details(error)
                errors.append(f"{leader}: {details.code.name} {details.reason}")
                if details.code not in RETRYABLE_CODES and details.reason != NodeReason.NOT_LEADER:
                    raise
        time.sleep(POLL_INTERVAL_SECONDS)
    cluster.fail(f"a write through {node_ids} was not answered in {STEP_TIMEOUT_SECONDS} s: {errors}")


def node_failure(cluster: Cluster, node_id: str, what: str, error: grpc.RpcError) -> NoReturn:
    details = error_details(error)
    cluster.fail(f"{what} to {node_id} failed: {details.code.name} {details.reason}: {details.message}")


def update_on(
    cluster: Cluster, node_id: str, shard_id: str, command: bytes, what: str
) -> core_pb2.CommandResult:
    """One NodeService.Update to `node_id`, answered within ANSWER_TIMEOUT_SECONDS."""
    request = node_pb2.UpdateRequest(shard_id=shard_id, command=command)
    try:
        return cluster.node_stub(node_id).Update(request, timeout=ANSWER_TIMEOUT_SECONDS).result
    except grpc.RpcError as error:
        node_failure(cluster, node_id, what, error)


def consistent_balance(cluster: Cluster, node_id: str, shard_id: str, account_id: str) -> int:
    """The account's settled balance by a consistent NodeService.Read on `node_id` (a no-op
    through the log first), answered within ANSWER_TIMEOUT_SECONDS."""
    query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=parse_account_id(account_id)))
    request = node_pb2.ReadRequest(shard_id=shard_id, query=query, consistent=True)
    try:
        result = cluster.node_stub(node_id).Read(request, timeout=ANSWER_TIMEOUT_SECONDS).result
    except grpc.RpcError as error:
        node_failure(cluster, node_id, "a consistent read", error)
    return views.account_view(result.account).settled_balance


def test_a_leader_that_installed_a_snapshot_past_its_proposal_takes_writes_again(tmp_path: Path) -> None:
    started = time.monotonic()
    with running_cluster(tmp_path, shards=1, log_compaction_min_entries=COMPACTION_MIN_ENTRIES) as cluster:
        shard_id = cluster.config.shards[0].shard_id
        stub = cluster.ledger_stub()
        account_id = stub.CreateAccount(
            ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS
        ).account.id
        a, b, c = sorted(replica.node_id for replica in cluster.config.shards[0].replicas)
        lead_with(cluster, shard_id, a)
        # Acknowledged by A, so A committed and applied every entry up to it; none comes after.
        first = update_on(
            cluster, a, shard_id, create_transaction_command(account_id, FIRST_AMOUNT), "a write"
        )
        before = replica_status(cluster, a, shard_id)
        assert before.is_leader and before.commit_index == before.last_applied == first.log_index, before
        assert before.log_entries + 1 <= COMPACTION_MIN_ENTRIES, f"{a} may compact during the test: {before}"

        # 1. A proposes entry i, which cannot commit (both followers are paused), then is paused
        # while it still leads.
        cluster.pause_node(b)
        cluster.pause_node(c)
        followers_paused = time.monotonic()
        stranded_command = create_transaction_command(
            account_id, STRANDED_AMOUNT, f"stranded-{uuid.uuid4().hex}"
        )
        stranded = cluster.node_stub(a).Update.future(
            node_pb2.UpdateRequest(shard_id=shard_id, command=stranded_command),
            timeout=STRANDED_CALL_TIMEOUT_SECONDS,
        )
        try:
            proposed = poll(
                cluster,
                f"{a} appending the write to its log",
                lambda: log_grown(cluster, shard_id, a, before.log_entries),
                LEADER_FALLBACK_TIMEOUT_SECONDS - STILL_LEADING_MARGIN_SECONDS,
            )
            cluster.pause_node(a)
            paused_after = time.monotonic() - followers_paused
            assert paused_after < LEADER_FALLBACK_TIMEOUT_SECONDS - STILL_LEADING_MARGIN_SECONDS, paused_after
            assert proposed.is_leader, proposed
            assert proposed.log_entries == before.log_entries + 1, (before, proposed)
            assert proposed.commit_index == before.commit_index, (before, proposed)
            stranded_index = first.log_index + 1
            assert not stranded.done(), "the stranded write was answered before A was paused"
            print(f"{a} proposed entry {stranded_index} and was paused {paused_after:.2f} s into the step")

            # 2. B or C takes over, commits and compacts past i, so A can only catch up from a
            # snapshot. The paused followers are killed and restarted rather than resumed: on
            # SIGCONT each would first read what A's kernel had queued for it (entry i), and the
            # new leader, still holding its old connection to the paused A for the Raft
            # connection timeout, would queue what it appends into A's socket, from which A would
            # catch up without a snapshot. A restarted follower cannot reach the paused A (the
            # Raft transport's key exchange needs A to answer), so nothing is queued for it.
            for node_id in (b, c):
                assert cluster.kill_node(node_id) == -signal.SIGKILL
            for node_id in (b, c):
                cluster.start_node(node_id)
            for node_id in (b, c):
                cluster.wait_node_serving(node_id)
            successor = poll(
                cluster,
                f"{b} or {c} leading",
                lambda: leader_among(cluster, shard_id, [b, c]),
                STEP_TIMEOUT_SECONDS,
            )
            for number in range(WRITES_TO_COMPACT):
                command = create_transaction_command(account_id, 1 + number)
                result = write_through_leader(cluster, shard_id, [b, c], command)
                assert result.outcome == core_pb2.OUTCOME_OK, result
            compacted = poll(
                cluster,
                f"{b} and {c} compacting their logs past entry {stranded_index}",
                lambda: compacted_past(cluster, shard_id, [b, c], stranded_index),
                STEP_TIMEOUT_SECONDS,
            )
            print(f"{successor} took over; logs start at or after {compacted}")

            # 3. A returns and installs the snapshot (it may apply its stale entry i just before,
            # see above; the restore replaces that state).
            a_log = cluster.nodes[a].log_path
            log_before_resume = len(a_log.read_bytes())
            cluster.resume_node(a)
            cluster.wait_leaders(STEP_TIMEOUT_SECONDS)
            converged = cluster.wait_converged([shard_id], STEP_TIMEOUT_SECONDS)[shard_id]
            assert converged.applied_index > stranded_index
            since_resume = a_log.read_bytes()[log_before_resume:].decode(errors="replace")
            assert f"shard {shard_id}: restored snapshot" in since_resume, (
                f"{a} caught up without a snapshot:\n{cluster.logs()}"
            )
            # A never applied its own uncommitted entry i: snapshot chunks do not move a
            # follower's commit index (PySyncObj would raise it to the follower's last entry).
            assert f"(was {stranded_index - 1})" in since_resume, since_resume[-3000:]

            # 4. A leads again: writes and a consistent read through it are answered (before the
            # fix they waited behind the dead slot and failed as DEADLINE_EXCEEDED NOT_PROPOSED).
            lead_with(cluster, shard_id, a)
            amounts = [10_000 + number for number in range(WRITES_AFTER_RETURN)]
            for amount in amounts:
                command = create_transaction_command(account_id, amount)
                result = update_on(cluster, a, shard_id, command, "a write")
                assert result.outcome == core_pb2.OUTCOME_OK, result
            committed = FIRST_AMOUNT + sum(range(1, WRITES_TO_COMPACT + 1)) + sum(amounts)
            # The stranded write never committed: B and C never saw it, and the snapshot replaced
            # A's log and state.
            assert consistent_balance(cluster, a, shard_id, account_id) == committed

            # 5. So its writer must have been told OUTCOME_UNKNOWN, never OK; the reason says which
            # path freed the slot, and A counted it.
            failure = stranded.exception(timeout=ANSWER_TIMEOUT_SECONDS)
            if failure is None:
                answer = stranded.result()
                cluster.fail(
                    f"the stranded write was acknowledged OK, yet the ledger does not hold it: {answer}"
                )
            assert isinstance(failure, grpc.RpcError), failure
            details = error_details(failure)
            assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, NodeReason.OUTCOME_UNKNOWN)
            paths = [
                path for path in (FREED_BY_LEADERSHIP_LOSS, FREED_BY_SNAPSHOT) if path in details.message
            ]
            assert len(paths) == 1, details.message
            print(f"the stranded write was answered: {details.message}")
            metrics_address = cluster.config.node(a).metrics_address
            assert metrics_address is not None
            assert value_of(scrape(metrics_address), "ledger_group_commit_failed_in_flight_total") == 1
            # Its writer retries the same bytes, which apply once; and the gateway reaches A too.
            result = update_on(cluster, a, shard_id, stranded_command, "the stranded write's retry")
            assert result.outcome == core_pb2.OUTCOME_OK, result
            assert consistent_balance(cluster, a, shard_id, account_id) == committed + STRANDED_AMOUNT
            record = new_record(account_id, 7)
            assert send_until_answered(stub, record), record.errors
            assert get_account(stub, account_id).settled_balance == committed + STRANDED_AMOUNT + 7
        finally:
            stranded.cancel()
        cluster.wait_converged([shard_id], STEP_TIMEOUT_SECONDS)
    print(f"took {time.monotonic() - started:.1f} s")
