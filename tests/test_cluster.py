"""Tests of the replicated cluster (issue 3) with real processes on loopback: three
`ledger-node` processes hosting four 3-replica shards, and a `ledger-gateway` in front.

The tests that leave the cluster as they found it share one cluster per module; the leader
failover and the minority/majority tests destroy theirs and start their own. Replicas are
compared through NodeService.Digest (a hash of every record at an applied index); balances and
listings through the public gateway, always with `consistent = true` reads.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.rpc import status_pb2

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.config import ClusterConfig
from ledger_cluster.core import commands
from ledger_cluster.gateway import views
from ledger_cluster.ids import parse_account_id
from ledger_cluster.internal.v1 import core_pb2, node_pb2
from ledger_cluster.node_protocol import LEADER_HINT_METADATA_KEY, UPDATE_MANY_UPDATES_MAX, NodeReason
from ledger_cluster.raft_codec import master_key
from ledger_cluster.status import error_details, status_details
from tests import test_raft_transport as transport
from tests.cluster import (
    CLUSTER_READY_TIMEOUT_SECONDS,
    NODE_RPC_TIMEOUT_SECONDS,
    PREFERRED_LEADERS_SECONDS,
    SMALL_LOG_COMPACTION_MIN_ENTRIES,
    Cluster,
    running_cluster,
    wait_for_preferred_leaders,
)
from tests.processes import LOOPBACK_HOST, POLL_INTERVAL_SECONDS, scrape, value_of

Stub = ledger_pb2_grpc.LedgerServiceStub

RPC_TIMEOUT_SECONDS = 10.0
# Each attempt of a retried write; a write is retried with the same request until this passes.
WRITE_ATTEMPT_TIMEOUT_SECONDS = 3.0
WRITE_DEADLINE_SECONDS = 30.0
WRITE_RETRY_PAUSE_SECONDS = 0.05
# Codes after which the outcome is open and the same request must be sent again.
RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ACCOUNT_ATTEMPTS_PER_SHARD_MAX = 64
# Writes must resume this soon after the leader of their shard is killed.
FAILOVER_BOUND_SECONDS = 10.0
WRITES_BEFORE_KILL = 30
KILL_ROUNDS = 2
FAILOVER_WRITE_ATTEMPT_TIMEOUT_SECONDS = 1.0
WRITES_AFTER_FAILOVER = 30
WRITER_ACK_TIMEOUT_SECONDS = 20.0
WRITER_JOIN_TIMEOUT_SECONDS = WRITE_DEADLINE_SECONDS + 5.0
# With a majority down, a write with this deadline must fail with UNAVAILABLE this soon.
MAJORITY_DOWN_DEADLINE_SECONDS = 3.0
MAJORITY_DOWN_ANSWER_BOUND_SECONDS = 5.0
NO_LEADER_TIMEOUT_SECONDS = 20.0
# Writes missed by a stopped follower: more than a compaction's worth, so the leader truncates
# its log past the follower's position and has to send it a snapshot.
FOLLOWER_MISSED_WRITES = SMALL_LOG_COMPACTION_MIN_ENTRIES + 100
GROUP_COMMIT_WRITES = 200
GROUP_COMMIT_CLIENTS = 16
GROUP_COMMIT_BATCH_CALLS = 24
GROUP_COMMIT_BATCH_ITEMS = 5

# The digest of a replica without a single record: sha256 of nothing.
EMPTY_STATE_DIGEST = hashlib.sha256().hexdigest()

SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
PENDING = ledger_pb2.TRANSACTION_STATUS_PENDING
CANCELLED = ledger_pb2.TRANSACTION_STATUS_CANCELLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the tests that leave it healthy, with a small log compaction threshold so
    snapshots happen."""
    with running_cluster(
        tmp_path_factory.mktemp("shared-cluster"),
        log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES,
    ) as running:
        yield running


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    """The shared cluster, once every node is up, every shard led and the gateway SERVING."""
    cluster.wait_healthy()
    return cluster


# -- public API helpers ---------------------------------------------------------------------------


def shard_of(config: ClusterConfig, account_id: str) -> str:
    return config.shard_for_account(parse_account_id(account_id)).shard_id


def accounts_by_shard(stub: Stub, config: ClusterConfig, per_shard: int) -> dict[str, list[str]]:
    """Create accounts through the gateway until every shard holds `per_shard` of them (account
    ids are random, so this takes a bounded number of tries)."""
    accounts: dict[str, list[str]] = {shard.shard_id: [] for shard in config.shards}
    for _ in range(ACCOUNT_ATTEMPTS_PER_SHARD_MAX * len(config.shards)):
        if all(len(ids) >= per_shard for ids in accounts.values()):
            return accounts
        account = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account
        shard_accounts = accounts[shard_of(config, account.id)]
        if len(shard_accounts) < per_shard:
            shard_accounts.append(account.id)
    raise AssertionError(f"accounts did not reach every shard: {accounts}")


def create(
    stub: Stub, account_id: str, amount: int, *, settled: bool = True, request_id: str = ""
) -> ledger_pb2.Transaction:
    request = ledger_pb2.CreateTransactionRequest(
        account_id=account_id,
        amount=amount,
        settled=settled,
        description=request_id,
        request_id=request_id,
    )
    return stub.CreateTransaction(request, timeout=RPC_TIMEOUT_SECONDS).transaction


def get_account(stub: Stub, account_id: str, consistent: bool = True) -> ledger_pb2.Account:
    request = ledger_pb2.GetAccountRequest(account_id=account_id, consistent=consistent)
    return stub.GetAccount(request, timeout=RPC_TIMEOUT_SECONDS).account


def list_all(stub: Stub, account_id: str) -> list[ledger_pb2.Transaction]:
    transactions: list[ledger_pb2.Transaction] = []
    token = ""
    while True:
        page = stub.ListTransactions(
            ledger_pb2.ListTransactionsRequest(
                account_id=account_id, page_size=1000, page_token=token, consistent=True
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        transactions.extend(page.transactions)
        token = page.next_page_token
        if not token:
            return transactions


def expected_balances(transactions: Sequence[ledger_pb2.Transaction]) -> tuple[int, int]:
    """(available, settled) that a listing implies: settled is the sum of settled transactions,
    available is settled minus the holds of pending purchases."""
    settled = sum(t.amount for t in transactions if t.status == SETTLED)
    holds = sum(-t.amount for t in transactions if t.status == PENDING and t.amount < 0)
    return settled - holds, settled


# -- retried writes -------------------------------------------------------------------------------


@dataclass
class WriteRecord:
    """One CreateTransaction as a client sees it: the same request (same request_id, which
    is also the description) is re-sent after every open outcome until one is answered."""

    request_id: str
    account_id: str
    amount: int
    first_sent: float = 0.0
    attempt_sent: float = 0.0  # when the last attempt was sent
    acked_at: float | None = None
    transaction: ledger_pb2.Transaction | None = None
    errors: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def request(self) -> ledger_pb2.CreateTransactionRequest:
        return ledger_pb2.CreateTransactionRequest(
            account_id=self.account_id,
            amount=self.amount,
            description=self.request_id,
            settled=True,
            request_id=self.request_id,
        )


def new_record(account_id: str, amount: int) -> WriteRecord:
    return WriteRecord(request_id=f"test-{uuid.uuid4().hex}", account_id=account_id, amount=amount)


def send_once(stub: Stub, record: WriteRecord, timeout_seconds: float) -> bool:
    """One attempt; True once answered. Open outcomes are noted on the record; any other error
    raises."""
    record.attempt_sent = time.monotonic()
    if not record.first_sent:
        record.first_sent = record.attempt_sent
    try:
        response = stub.CreateTransaction(record.request(), timeout=timeout_seconds)
    except grpc.RpcError as error:
        details = error_details(error)
        elapsed_seconds = time.monotonic() - record.attempt_sent
        record.errors.append(f"{details.code.name} {details.reason} after {elapsed_seconds:.2f} s")
        record.reasons.append(details.reason or details.code.name)
        if details.code not in RETRYABLE_CODES:
            raise
        return False
    record.transaction = response.transaction
    record.acked_at = time.monotonic()
    return True


def send_until_answered(
    stub: Stub,
    record: WriteRecord,
    deadline_seconds: float = WRITE_DEADLINE_SECONDS,
    attempt_timeout_seconds: float = WRITE_ATTEMPT_TIMEOUT_SECONDS,
) -> bool:
    """Re-send the same request until it is answered or the deadline passes."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if send_once(stub, record, min(attempt_timeout_seconds, remaining)):
            return True
        time.sleep(WRITE_RETRY_PAUSE_SECONDS)


class Writer:
    """A client thread that keeps writing settled transactions to some accounts, one at a time,
    retrying each with the same request until it is answered."""

    def __init__(
        self,
        stub: Stub,
        account_ids: Sequence[str],
        seed: int,
        attempt_timeout_seconds: float = WRITE_ATTEMPT_TIMEOUT_SECONDS,
    ) -> None:
        self._stub = stub
        self._attempt_timeout_seconds = attempt_timeout_seconds
        self._account_ids = list(account_ids)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._records: list[WriteRecord] = []
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cluster-writer", daemon=True)

    def _run(self) -> None:
        try:
            index = 0
            while not self._stop.is_set():
                # Mostly top-ups; the purchases sometimes meet INSUFFICIENT_FUNDS, which must
                # replay identically on every replica too.
                amount = self._random.choice([self._random.randint(1, 1000), -self._random.randint(1, 600)])
                record = new_record(self._account_ids[index % len(self._account_ids)], amount)
                index += 1
                with self._lock:
                    self._records.append(record)
                if not send_until_answered(
                    self._stub, record, attempt_timeout_seconds=self._attempt_timeout_seconds
                ):
                    raise AssertionError(
                        f"write {record.request_id} not answered within {WRITE_DEADLINE_SECONDS} s: "
                        f"{record.errors}"
                    )
        except BaseException as error:
            self.failure = error

    def start(self) -> None:
        self._thread.start()

    def records(self) -> list[WriteRecord]:
        with self._lock:
            return list(self._records)

    def acked(self) -> list[WriteRecord]:
        return [record for record in self.records() if record.acked_at is not None]

    def check(self) -> None:
        if self.failure is not None:
            raise AssertionError(f"the writer failed: {self.failure!r}") from self.failure
        if not self._thread.is_alive():
            raise AssertionError("the writer ended")

    def wait_for(self, count: int, condition_name: str, timeout_seconds: float, since: float = 0.0) -> None:
        """Wait until `count` writes whose answering attempt was sent after `since` are acked."""
        deadline = time.monotonic() + timeout_seconds
        while sum(1 for record in self.acked() if record.attempt_sent >= since) < count:
            self.check()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"writer: fewer than {count} acknowledged writes {condition_name} after "
                    f"{timeout_seconds} s; last records: {[r.errors for r in self.records()[-5:]]}"
                )
            time.sleep(POLL_INTERVAL_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WRITER_JOIN_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            raise AssertionError(f"the writer did not stop within {WRITER_JOIN_TIMEOUT_SECONDS} s")
        if self.failure is not None:
            raise AssertionError(f"the writer failed: {self.failure!r}") from self.failure


def check_ledger(stub: Stub, account_ids: Sequence[str], records: Sequence[WriteRecord]) -> Counter[str]:
    """Every acknowledged write is listed exactly once with the acknowledged transaction; no
    request is listed twice; nothing is listed that no request asked for; balances equal what
    the listing implies. Returns how often each request id is listed."""
    by_request = {record.request_id: record for record in records}
    listed: Counter[str] = Counter()
    for account_id in account_ids:
        transactions = list_all(stub, account_id)
        counts = Counter(t.description for t in transactions)
        duplicates = {request_id: count for request_id, count in counts.items() if count > 1}
        assert not duplicates, f"account {account_id}: requests applied more than once: {duplicates}"
        for transaction in transactions:
            record = by_request.get(transaction.description)
            assert record is not None, f"account {account_id}: unexpected transaction {transaction}"
            assert record.account_id == account_id and record.amount == transaction.amount, (
                f"transaction {transaction} does not match its request {record}"
            )
            if record.transaction is not None:
                assert transaction.id == record.transaction.id, (
                    f"request {record.request_id} acknowledged as {record.transaction.id}, "
                    f"listed as {transaction.id}"
                )
                assert transaction.status == record.transaction.status, (transaction, record.transaction)
        listed.update(counts)
        account = get_account(stub, account_id)
        available, settled = expected_balances(transactions)
        assert (account.available_balance, account.settled_balance) == (available, settled), (
            f"account {account_id}: balances {account} differ from its {len(transactions)} transactions"
        )
    lost = [r.request_id for r in records if r.transaction is not None and listed[r.request_id] != 1]
    assert not lost, f"acknowledged writes missing: {lost}"
    return listed


# -- node-level helpers ---------------------------------------------------------------------------


def create_transaction_command(
    account_id: str, amount: int, request_id: str = "", transaction_number: int | None = None
) -> bytes:
    """A CREATE_TRANSACTION command envelope built the way the gateway builds one: `now` and
    the transaction number chosen once, before the first attempt."""
    return commands.create_transaction(
        account_id=parse_account_id(account_id),
        transaction_number=secrets.randbits(64) if transaction_number is None else transaction_number,
        amount=amount,
        description=request_id or "duplicate delivery",
        settled=True,
        request_id=request_id,
        now=time.time_ns(),
    )


def leaders_count(leaders: dict[str, str], node_id: str) -> int:
    return sum(1 for leader in leaders.values() if leader == node_id)


def restart_log_segment(text: str) -> str:
    """The part of a node's log written since its last start."""
    return text.rpartition("=== ledger-node")[2]


# -- tests on the shared cluster ------------------------------------------------------------------


def test_writes_on_every_shard_reach_every_replica(healthy: Cluster) -> None:
    cluster = healthy
    stub = cluster.ledger_stub()
    accounts = accounts_by_shard(stub, cluster.config, per_shard=2)
    assert set(accounts) == {shard.shard_id for shard in cluster.config.shards}
    assert all(len(shard_accounts) == 2 for shard_accounts in accounts.values()), accounts
    expected: dict[str, tuple[int, int, list[tuple[int, ledger_pb2.TransactionStatus.ValueType]]]] = {}
    for index, account_id in enumerate(a for shard_accounts in accounts.values() for a in shard_accounts):
        extra = 7 * (index + 1)
        top_up = create(stub, account_id, 1000, request_id=f"top-up-{account_id}")
        held = create(stub, account_id, -100, settled=False)
        settled = stub.SettleTransaction(
            ledger_pb2.SettleTransactionRequest(transaction_id=held.id), timeout=RPC_TIMEOUT_SECONDS
        ).transaction
        dropped = create(stub, account_id, -50, settled=False)
        cancelled = stub.CancelTransaction(
            ledger_pb2.CancelTransactionRequest(transaction_id=dropped.id), timeout=RPC_TIMEOUT_SECONDS
        ).transaction
        pending_top_up = create(stub, account_id, 70, settled=False)
        refused = create(stub, account_id, -5000)
        purchase = create(stub, account_id, -extra)
        statuses = [
            (top_up.amount, top_up.status),
            (settled.amount, settled.status),
            (cancelled.amount, cancelled.status),
            (pending_top_up.amount, pending_top_up.status),
            (refused.amount, refused.status),
            (purchase.amount, purchase.status),
        ]
        assert statuses == [
            (1000, SETTLED),
            (-100, SETTLED),
            (-50, CANCELLED),
            (70, PENDING),
            (-5000, INSUFFICIENT_FUNDS),
            (-extra, SETTLED),
        ]
        balance = 1000 - 100 - extra
        expected[account_id] = (balance, balance, statuses)

    converged = cluster.wait_converged()
    print(
        "converged replicas (applied index, digest): "
        + ", ".join(f"{shard}: {d.applied_index}/{d.digest[:12]}" for shard, d in sorted(converged.items()))
    )
    for shard_id, digest in converged.items():
        assert digest.applied_index > 0, f"{shard_id} applied nothing"
        assert digest.digest != EMPTY_STATE_DIGEST, f"{shard_id} holds no records"
    # Every replica agrees, and the gateway reads (leader and linearizable) say the same.
    for account_id, (available, settled_balance, statuses) in expected.items():
        for consistent in (True, False):
            account = get_account(stub, account_id, consistent=consistent)
            assert (account.available_balance, account.settled_balance) == (available, settled_balance)
        listed = list_all(stub, account_id)
        assert [(t.amount, t.status) for t in listed] == statuses
        assert expected_balances(listed) == (available, settled_balance)


def status_with_steady_leaders(cluster: Cluster) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """`ledger-dev status` taken while no shard changed leader (a preferred leader taking its
    shard back between two reads would make either read look wrong)."""
    deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_SECONDS
    while True:
        before = cluster.wait_leaders()
        result = cluster.dev_status()
        if cluster.wait_leaders() == before or time.monotonic() > deadline:
            return before, result


def test_dev_status_shows_a_leader_for_every_shard(healthy: Cluster) -> None:
    leaders, result = status_with_steady_leaders(healthy)
    assert result.returncode == 0, f"ledger-dev status failed:\n{result.stdout}\n{result.stderr}"
    print(result.stdout)
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    for node in healthy.config.nodes:
        assert lines[node.node_id][1:3] == [node.grpc_address, "up"], result.stdout
    assert lines["shard"][:4] == ["shard", "leader", "preferred", "term"], result.stdout
    not_preferred = []
    for shard in healthy.config.shards:
        row = lines.get(shard.shard_id)
        assert row is not None, f"no row for {shard.shard_id}:\n{result.stdout}"
        leader = leaders[shard.shard_id]
        # Where the leader is not the config's preferred leader, its cell carries the mark.
        mark = "" if leader == shard.preferred_leader else "*"
        assert row[1] == leader + mark, f"{shard.shard_id} leader:\n{result.stdout}"
        assert row[2] == shard.preferred_leader, f"{shard.shard_id} preferred leader:\n{result.stdout}"
        if mark:
            not_preferred.append(shard.shard_id)
    if not_preferred:
        summary = f"* led by a node other than its preferred leader: {', '.join(not_preferred)}"
        assert summary in result.stdout, result.stdout
    else:
        assert "preferred leader:" not in result.stdout, result.stdout


@pytest.mark.parametrize("repeat", ["same-bytes", "same-request-id"])
def test_duplicate_delivery_changes_state_once(healthy: Cluster, repeat: str) -> None:
    """The same command delivered twice to the leader (a retry after a timeout whose first
    attempt did commit) applies once; a retry that reuses the request_id (new transaction
    number and `now`, as a gateway-level retry sends) answers the original too."""
    cluster = healthy
    stub = cluster.ledger_stub()
    account_id = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=RPC_TIMEOUT_SECONDS).account.id
    shard_id = shard_of(cluster.config, account_id)
    request_id = f"duplicate-{uuid.uuid4().hex}" if repeat == "same-request-id" else ""
    first_command = create_transaction_command(account_id, 123, request_id)
    second_command = (
        first_command if repeat == "same-bytes" else create_transaction_command(account_id, 123, request_id)
    )
    assert (first_command == second_command) == (repeat == "same-bytes")

    first = cluster.update_at_leader(shard_id, first_command)
    assert first.outcome == core_pb2.OUTCOME_OK, first
    after_first = cluster.wait_converged([shard_id])[shard_id]
    account_after_first = get_account(stub, account_id)
    assert account_after_first.settled_balance == 123

    second = cluster.update_at_leader(shard_id, second_command)
    # The repeat is a new log entry, so the index that answered differs; the answer does not.
    assert second.log_index > first.log_index
    assert second.outcome == first.outcome == core_pb2.OUTCOME_OK
    assert views.transaction_view(second.transaction, second.repeat) == views.transaction_view(
        first.transaction, first.repeat
    )
    after_second = cluster.wait_converged([shard_id])[shard_id]
    assert after_second.applied_index == second.log_index > after_first.applied_index
    assert after_second.digest == after_first.digest, "the repeat changed a replica's records"
    account = get_account(stub, account_id)
    assert account == account_after_first
    listed = list_all(stub, account_id)
    assert [t.id for t in listed] == [views.transaction_view(first.transaction).id]


def test_stopped_follower_catches_up(healthy: Cluster) -> None:
    cluster = healthy
    stub = cluster.ledger_stub()
    leaders = cluster.wait_leaders()
    # A follower of the shard under write; the node leading the fewest shards disturbs least.
    candidates = [
        (leaders_count(leaders, replica.node_id), shard.shard_id, replica.node_id)
        for shard in cluster.config.shards
        for replica in shard.replicas
        if replica.node_id != leaders[shard.shard_id]
    ]
    _, shard_id, follower = min(candidates)
    accounts = accounts_by_shard(stub, cluster.config, per_shard=2)[shard_id]
    before = cluster.wait_converged([shard_id])[shard_id]

    assert cluster.stop_node(follower) == 0, f"{follower} did not shut down cleanly on SIGTERM"
    records = [new_record(accounts[i % len(accounts)], 10 + i) for i in range(FOLLOWER_MISSED_WRITES)]
    for record in records:
        assert send_until_answered(stub, record), f"write failed with one follower down: {record.errors}"
    # The leader and the remaining follower agree on everything written meanwhile.
    written_index = cluster.wait_converged([shard_id], excluded_node_ids=[follower])[shard_id].applied_index
    assert written_index >= before.applied_index + FOLLOWER_MISSED_WRITES

    cluster.restart_node(follower)
    converged = cluster.wait_converged()
    caught_up = cluster.digest(follower, shard_id)
    assert caught_up.applied_index == converged[shard_id].applied_index >= written_index
    assert caught_up.digest == converged[shard_id].digest
    for shard in cluster.config.shards:
        assert cluster.digest(follower, shard.shard_id) == converged[shard.shard_id]
    # The leader compacted its log past the follower's position: it caught up from a snapshot.
    restarted_log = restart_log_segment(cluster.nodes[follower].log_path.read_text(errors="replace"))
    assert f"shard {shard_id}: restored snapshot" in restarted_log, (
        f"{follower} caught up on {shard_id} without a snapshot:\n{cluster.logs()}"
    )
    check_ledger(stub, accounts, records)
    cluster.wait_healthy()


def test_transfer_leadership_hands_a_shard_to_the_named_replica(healthy: Cluster) -> None:
    cluster = healthy
    stub = cluster.ledger_stub()
    shard_id = cluster.config.shards[0].shard_id
    leader = cluster.leader_of(shard_id)
    followers = sorted(r.node_id for r in cluster.config.shards[0].replicas if r.node_id != leader)
    account_id = accounts_by_shard(stub, cluster.config, per_shard=1)[shard_id][0]
    before = cluster.wait_converged([shard_id])[shard_id]

    # Refusals change nothing: a follower does not lead; a target must be another replica.
    with pytest.raises(grpc.RpcError) as refused:
        cluster.transfer_leadership(shard_id, followers[0], followers[1])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(refused.value).reason == "NOT_LEADER"
    for target in (leader, "node99"):
        with pytest.raises(grpc.RpcError) as invalid:
            cluster.transfer_leadership(shard_id, leader, target)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(invalid.value).reason == "INVALID_TRANSFER_TARGET"
    assert cluster.leader_of(shard_id) == leader

    answer = cluster.transfer_leadership(shard_id, leader, followers[1])
    # The named follower wins unless the other one's election timer fired in the same moment.
    assert answer.leader_node_id in followers and answer.previous_leader_node_id == leader
    assert cluster.leader_of(shard_id) == answer.leader_node_id
    record = new_record(account_id, 77)
    assert send_until_answered(stub, record), f"write after the transfer failed: {record.errors}"
    after = cluster.wait_converged([shard_id])[shard_id]
    assert after.applied_index > before.applied_index
    check_ledger(stub, [account_id], [record])


def test_batch_calls_span_shards_and_reach_every_replica(healthy: Cluster) -> None:
    cluster = healthy
    stub = cluster.ledger_stub()
    accounts = [a for ids in accounts_by_shard(stub, cluster.config, per_shard=3).values() for a in ids]
    items = [
        ledger_pb2.CreateTransactionRequest(account_id=account_id, amount=100 + n, settled=n % 2 == 0)
        for n, account_id in enumerate(accounts)
    ]
    results = stub.CreateTransactions(
        ledger_pb2.CreateTransactionsRequest(items=items), timeout=RPC_TIMEOUT_SECONDS
    ).results
    assert all(result.HasField("transaction") for result in results), results
    pending = [result.transaction.id for result in results if result.transaction.status == PENDING]
    settled = stub.SettleTransactions(
        ledger_pb2.SettleTransactionsRequest(transaction_ids=pending), timeout=RPC_TIMEOUT_SECONDS
    ).results
    assert [result.transaction.status for result in settled] == [SETTLED] * len(pending)
    for n, account_id in enumerate(accounts):
        assert get_account(stub, account_id).settled_balance == 100 + n
    converged = cluster.wait_converged()
    for shard in cluster.config.shards:
        for replica in shard.replicas:
            assert cluster.digest(replica.node_id, shard.shard_id) == converged[shard.shard_id]


def test_concurrent_writes_to_one_shard_share_log_entries(healthy: Cluster) -> None:
    """Group commit: writes arriving while a proposal is in flight travel together, so the log
    grows by fewer entries than there were writes; each write still applies exactly once."""
    cluster = healthy
    stub = cluster.ledger_stub()
    shard_id = cluster.config.shards[0].shard_id
    accounts = accounts_by_shard(stub, cluster.config, per_shard=4)[shard_id]
    before = cluster.wait_converged([shard_id])[shard_id].applied_index
    records = [new_record(accounts[n % len(accounts)], 1 + n) for n in range(GROUP_COMMIT_WRITES)]
    with ThreadPoolExecutor(max_workers=GROUP_COMMIT_CLIENTS) as pool:
        answered = list(pool.map(lambda record: send_until_answered(stub, record), records))
    assert all(answered), [record.errors for record in records if record.transaction is None]
    after = cluster.wait_converged([shard_id])[shard_id].applied_index
    print(
        f"{GROUP_COMMIT_WRITES} writes from {GROUP_COMMIT_CLIENTS} clients took {after - before} log entries"
    )
    assert after - before < GROUP_COMMIT_WRITES
    check_ledger(stub, accounts, records)


def test_update_many_answers_each_shard_as_update_would(healthy: Cluster) -> None:
    """One UpdateMany to a node carries writes of a shard it leads and of one it does not: the
    first is applied and answered OK, the second refused NOT_LEADER with a hint, each in its own
    outcome; more updates than the limit are refused whole."""
    cluster = healthy
    stub = cluster.ledger_stub()
    leaders = cluster.wait_leaders()
    led = cluster.config.shards[0].shard_id
    node_id = leaders[led]
    not_led = next((shard for shard, leader in leaders.items() if leader != node_id), None)
    if not_led is None:  # just after a start one node may lead them all, for a few seconds
        wait_for_preferred_leaders(cluster, PREFERRED_LEADERS_SECONDS)
        leaders = cluster.wait_leaders()
        node_id = leaders[led]
        not_led = next(shard for shard, leader in leaders.items() if leader != node_id)
    accounts = accounts_by_shard(stub, cluster.config, per_shard=1)
    account, other = accounts[led][0], accounts[not_led][0]
    request = node_pb2.UpdateManyRequest(
        updates=[
            node_pb2.UpdateRequest(shard_id=not_led, command=create_transaction_command(other, 5)),
            node_pb2.UpdateRequest(shard_id=led, command=create_transaction_command(account, 7)),
        ]
    )
    outcomes: dict[int, node_pb2.UpdateOutcome] = {}
    for answers in cluster.node_stub(node_id).UpdateMany(request, timeout=NODE_RPC_TIMEOUT_SECONDS):
        for outcome in answers.outcomes:
            assert outcome.index not in outcomes, "each update is answered once"
            outcomes[outcome.index] = outcome
    assert sorted(outcomes) == [0, 1]
    assert outcomes[1].response.result.outcome == core_pb2.OUTCOME_OK
    refusal = status_details(status_pb2.Status.FromString(outcomes[0].status))
    assert refusal.reason == NodeReason.NOT_LEADER
    assert refusal.metadata[LEADER_HINT_METADATA_KEY] == leaders[not_led]
    assert get_account(stub, account).available_balance == 7
    assert get_account(stub, other).available_balance == 0
    too_many = node_pb2.UpdateManyRequest(updates=[request.updates[1]] * (UPDATE_MANY_UPDATES_MAX + 1))
    with pytest.raises(grpc.RpcError) as refused:
        list(cluster.node_stub(node_id).UpdateMany(too_many, timeout=NODE_RPC_TIMEOUT_SECONDS))
    assert error_details(refused.value).reason == NodeReason.TOO_MANY_UPDATES
    assert get_account(stub, account).available_balance == 7, "nothing of a refused call applied"


def forged_frames(metrics_address: str) -> float:
    return value_of(scrape(metrics_address), "ledger_raft_frames_rejected_total", reason="frame")


def test_a_forged_raft_frame_changes_nothing_on_a_real_node(healthy: Cluster) -> None:
    """A peer that knows the protocol but not the cluster's secret dials node02's Raft port as
    node01 and sends an append_entries with a higher term and a write: node02 closes the
    connection, counts the frame, and neither its term nor any balance moves."""
    cluster = healthy
    stub = cluster.ledger_stub()
    shard_id = transport.SHARD_ID
    account = accounts_by_shard(stub, cluster.config, per_shard=1)[shard_id][0]
    node = cluster.config.node(transport.NODE_ID)
    assert node.metrics_address is not None
    before_digest = cluster.wait_converged([shard_id])[shard_id]
    term_before = next(
        replica.term for replica in cluster.status(transport.NODE_ID).replicas if replica.shard_id == shard_id
    )
    rejected_before = value_of(
        scrape(node.metrics_address), "ledger_raft_frames_rejected_total", reason="frame"
    )
    wrong_key = master_key("not the cluster secret, though long enough to pass", cluster.config.cluster_id)
    forger = transport.Peer(int(node.raft_address.rpartition(":")[2]), wrong_key)
    try:
        forged_entry = (
            bytes([0]) + create_transaction_command(account, 1_000_000),
            1_000_000,
            term_before + 100,
        )
        forger.send(
            forger.frame(
                {
                    "type": "append_entries",
                    "term": term_before + 100,
                    "commit_index": 1_000_000,
                    "prevLogIdx": before_digest.applied_index,
                    "prevLogTerm": term_before,
                    "entries": [forged_entry],
                }
            )
        )
        assert forger.closed_by_node()
    finally:
        forger.close()
    rejected_after = value_of(
        scrape(node.metrics_address), "ledger_raft_frames_rejected_total", reason="frame"
    )
    assert rejected_after == rejected_before + 1
    term_after = next(
        replica.term for replica in cluster.status(transport.NODE_ID).replicas if replica.shard_id == shard_id
    )
    assert term_after == term_before
    assert get_account(stub, account).available_balance == 0
    assert cluster.wait_converged([shard_id])[shard_id].digest == before_digest.digest


def test_concurrent_batch_calls_to_one_shard_share_log_entries(healthy: Cluster) -> None:
    """Group commit joins batch calls' items too: each call still gets exactly its own items'
    answers, in its own order, including refusals and overdrafts."""
    cluster = healthy
    stub = cluster.ledger_stub()
    shard_id = cluster.config.shards[0].shard_id
    accounts = accounts_by_shard(stub, cluster.config, per_shard=4)[shard_id]
    missing = next(
        f"{number:016x}"
        for number in itertools.count(1)
        if cluster.config.shard_for_account(number).shard_id == shard_id
    )
    calls = [
        [
            ledger_pb2.CreateTransactionRequest(
                account_id=accounts[(call + n) % len(accounts)], amount=1000 * call + n + 1, settled=True
            )
            for n in range(GROUP_COMMIT_BATCH_ITEMS - 2)
        ]
        + [
            ledger_pb2.CreateTransactionRequest(account_id=missing, amount=5, settled=True),
            ledger_pb2.CreateTransactionRequest(account_id=accounts[0], amount=-(10**15), settled=True),
        ]
        for call in range(GROUP_COMMIT_BATCH_CALLS)
    ]
    before = cluster.wait_converged([shard_id])[shard_id].applied_index

    def send(items: list[ledger_pb2.CreateTransactionRequest]) -> list[ledger_pb2.TransactionResult]:
        request = ledger_pb2.CreateTransactionsRequest(items=items)
        return list(stub.CreateTransactions(request, timeout=RPC_TIMEOUT_SECONDS).results)

    with ThreadPoolExecutor(max_workers=GROUP_COMMIT_CLIENTS) as pool:
        answers = list(pool.map(send, calls))
    after = cluster.wait_converged([shard_id])[shard_id].applied_index
    print(f"{GROUP_COMMIT_BATCH_CALLS} batch calls to one shard took {after - before} log entries")
    assert after - before < GROUP_COMMIT_BATCH_CALLS
    for items, results in zip(calls, answers, strict=True):
        assert len(results) == len(items)
        *created, not_found, overdraft = results
        for item, result in zip(items[:-2], created, strict=True):
            transaction = result.transaction
            assert (transaction.account_id, transaction.amount) == (item.account_id, item.amount)
            assert transaction.status == SETTLED
        assert not_found.error.reason == "ACCOUNT_NOT_FOUND"
        assert overdraft.transaction.status == INSUFFICIENT_FUNDS
    for account_id in accounts:
        expected = sum(item.amount for items in calls for item in items[:-2] if item.account_id == account_id)
        assert get_account(stub, account_id).settled_balance == expected


def test_every_process_serves_its_metrics(healthy: Cluster) -> None:
    cluster = healthy
    stub = cluster.ledger_stub()
    accounts = accounts_by_shard(stub, cluster.config, per_shard=1)
    for account_id in (ids[0] for ids in accounts.values()):
        assert send_until_answered(stub, new_record(account_id, 1))
    gateway = scrape(f"{LOOPBACK_HOST}:{cluster.gateway_metrics_port}")
    assert value_of(gateway, "ledger_process_info", role="gateway", name="gateway") == 1
    assert value_of(gateway, "process_cpu_seconds_total") > 0
    created = value_of(
        gateway, "ledger_rpc_requests_total", service="LedgerService", method="CreateTransaction", code="OK"
    )
    assert created >= len(accounts)
    latencies = value_of(
        gateway, "ledger_rpc_latency_seconds_count", service="LedgerService", method="CreateTransaction"
    )
    assert latencies == created
    assert value_of(gateway, "ledger_rpc_in_flight", service="LedgerService") >= 0
    assert value_of(gateway, "ledger_coalesced_batch_items_sum") >= created
    leaders: Counter[str] = Counter()
    for node in cluster.config.nodes:
        assert node.metrics_address is not None
        samples = scrape(node.metrics_address)
        assert value_of(samples, "ledger_process_info", role="node", name=node.node_id) == 1
        assert value_of(samples, "process_cpu_seconds_total") > 0
        assert (
            value_of(samples, "ledger_rpc_requests_total", service="NodeService", method="Status", code="OK")
            > 0
        )
        assert value_of(samples, "ledger_apply_latency_seconds_count") > 0
        for shard in cluster.config.shards:
            term = value_of(samples, "ledger_raft_term", shard=shard.shard_id)
            commit_index = value_of(samples, "ledger_raft_commit_index", shard=shard.shard_id)
            applied_index = value_of(samples, "ledger_raft_applied_index", shard=shard.shard_id)
            assert term >= 1 and commit_index >= applied_index > 0
            assert value_of(samples, "ledger_lmdb_bytes", shard=shard.shard_id, kind="used") > 0
            assert value_of(samples, "ledger_lmdb_bytes", shard=shard.shard_id, kind="map") > 0
            if value_of(samples, "ledger_raft_is_leader", shard=shard.shard_id) == 1:
                leaders[shard.shard_id] += 1
                assert value_of(samples, "ledger_group_commit_items_count") > 0
    assert leaders == Counter({shard.shard_id: 1 for shard in cluster.config.shards})


# -- tests with their own cluster -----------------------------------------------------------------


def test_leader_failover_under_writes(tmp_path: Path) -> None:
    """kill -9 the leader of a shard while a client keeps writing to it, restart it while the
    writes go on, and do it again to the next leader."""
    with running_cluster(tmp_path, log_compaction_min_entries=SMALL_LOG_COMPACTION_MIN_ENTRIES) as cluster:
        stub = cluster.ledger_stub()
        shard_id = cluster.config.shards[0].shard_id
        accounts = accounts_by_shard(stub, cluster.config, per_shard=2)[shard_id]
        # Short attempts, so some writes time out during the failover and the client re-sends
        # them: the request_id must make those retries safe.
        writer = Writer(
            stub, accounts, seed=3, attempt_timeout_seconds=FAILOVER_WRITE_ATTEMPT_TIMEOUT_SECONDS
        )
        writer.start()
        failovers: list[tuple[str, float]] = []
        try:
            writer.wait_for(WRITES_BEFORE_KILL, "before the first kill", WRITER_ACK_TIMEOUT_SECONDS)
            for _ in range(KILL_ROUNDS):
                leader = cluster.leader_of(shard_id)
                kill_started = time.monotonic()
                assert cluster.kill_node(leader) == -signal.SIGKILL
                killed = time.monotonic()
                # Resumed: a write whose answering attempt was sent after the old leader was gone.
                writer.wait_for(1, "after the kill", FAILOVER_BOUND_SECONDS, killed)
                resumed_at = min(
                    r.acked_at
                    for r in writer.records()
                    if r.acked_at is not None and r.attempt_sent >= killed
                )
                failovers.append((leader, resumed_at - kill_started))
                writer.wait_for(
                    WRITES_AFTER_FAILOVER, "after the failover", WRITER_ACK_TIMEOUT_SECONDS, killed
                )
                assert cluster.wait_leaders()[shard_id] != leader
                # The old leader comes back as a follower and catches up while writes go on.
                cluster.restart_node(leader)
                cluster.wait_healthy()
                writer.wait_for(
                    WRITES_AFTER_FAILOVER, "after the restart", WRITER_ACK_TIMEOUT_SECONDS, time.monotonic()
                )
        finally:
            writer.stop()
        records = writer.records()
        ack_times = sorted(r.acked_at for r in records if r.acked_at is not None)
        longest_gap_seconds = max(b - a for a, b in itertools.pairwise(ack_times))
        retried = [r for r in records if r.errors]
        print(
            f"{shard_id}: writes resumed "
            + ", ".join(f"{seconds:.2f} s after killing leader {leader}" for leader, seconds in failovers)
            + f"; longest gap between acknowledgements {longest_gap_seconds:.2f} s; {len(records)} writes, "
            f"{len(retried)} re-sent after: {[r.errors for r in retried]}"
        )
        assert all(seconds < FAILOVER_BOUND_SECONDS for _, seconds in failovers), failovers
        cluster.wait_converged()
        check_ledger(stub, accounts, records)


def test_minority_down_keeps_writing_majority_down_is_unavailable(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as cluster:
        stub = cluster.ledger_stub()
        accounts = {shard_id: ids[0] for shard_id, ids in accounts_by_shard(stub, cluster.config, 1).items()}
        leaders = cluster.wait_leaders()
        records: list[WriteRecord] = []

        # A minority down: the node leading most shards, so some of them fail over.
        first_down = max(cluster.config.nodes, key=lambda n: leaders_count(leaders, n.node_id)).node_id
        assert cluster.kill_node(first_down) == -signal.SIGKILL
        killed = time.monotonic()
        for shard_id, account_id in accounts.items():
            record = new_record(account_id, 500)
            records.append(record)
            assert send_until_answered(stub, record, FAILOVER_BOUND_SECONDS), (
                f"{shard_id} refused writes with only {first_down} down: {record.errors}\n{cluster.logs()}"
            )
        minority_seconds = time.monotonic() - killed
        print(f"{first_down} killed: every shard wrote again within {minority_seconds:.2f} s")
        assert minority_seconds < FAILOVER_BOUND_SECONDS
        cluster.wait_gateway_health("SERVING")

        # A majority down: every shard has a replica on each node, so every shard loses quorum.
        second_down = cluster.running_node_ids()[0]
        assert cluster.kill_node(second_down) == -signal.SIGKILL
        failed: list[WriteRecord] = []
        # Checked once the cluster is back, so that a wrong status code does not hide whether
        # anything was half-applied.
        wrong_answers: list[str] = []

        def doomed_write(account_id: str) -> tuple[WriteRecord, float]:
            record = new_record(account_id, -1)
            answered = send_once(stub, record, MAJORITY_DOWN_DEADLINE_SECONDS)
            assert not answered, f"a write succeeded with a majority down: {record.transaction}"
            return record, time.monotonic() - record.attempt_sent

        def majority_down_round(label: str) -> None:
            with ThreadPoolExecutor(max_workers=len(accounts)) as pool:
                outcomes = list(pool.map(doomed_write, accounts.values()))
            for record, elapsed_seconds in outcomes:
                failed.append(record)
                shard_id = shard_of(cluster.config, record.account_id)
                print(f"majority down ({label}): {shard_id} {record.errors}")
                if (
                    not record.errors[0].startswith("UNAVAILABLE ")
                    or record.reasons[0] not in {"SHARD_UNAVAILABLE", "OUTCOME_UNKNOWN"}
                    or elapsed_seconds >= MAJORITY_DOWN_ANSWER_BOUND_SECONDS
                ):
                    wrong_answers.append(
                        f"{label}: {shard_id}: {record.errors[0]} (want UNAVAILABLE SHARD_UNAVAILABLE or "
                        f"OUTCOME_UNKNOWN within {MAJORITY_DOWN_ANSWER_BOUND_SECONDS} s of a "
                        f"{MAJORITY_DOWN_DEADLINE_SECONDS} s deadline)"
                    )

        # Right after the kill, a lone old leader may still take proposals it cannot commit.
        majority_down_round("just after the kill")
        deadline = time.monotonic() + NO_LEADER_TIMEOUT_SECONDS
        while (status := cluster.dev_status()).returncode == 0:
            assert time.monotonic() < deadline, f"ledger-dev status still finds leaders:\n{status.stdout}"
            time.sleep(POLL_INTERVAL_SECONDS)
        print(status.stdout, status.stderr)
        assert status.returncode == 1, status
        assert "shards without a leader" in status.stderr
        leaderless = [line.split()[0] for line in status.stdout.splitlines() if " NONE " in line]
        assert sorted(leaderless) == sorted(accounts), status.stdout
        cluster.wait_gateway_health("NOT_SERVING")
        # Once the lone node stepped down, no shard has a leader.
        majority_down_round("no leader")

        for node_id in (first_down, second_down):
            cluster.start_node(node_id)
        cluster.wait_healthy()
        cluster.wait_converged()
        all_accounts = list(accounts.values())
        listed = check_ledger(stub, all_accounts, records + failed)
        for record in failed:
            # Only an open outcome may have reached the log; SHARD_UNAVAILABLE says it did not.
            allowed = 1 if {"OUTCOME_UNKNOWN", "DEADLINE_EXCEEDED"}.intersection(record.reasons) else 0
            assert listed[record.request_id] <= allowed, (
                f"failed write {record.request_id} ({record.errors}) listed {listed[record.request_id]} times"
            )
        # Retrying each failed write with its request_id applies it exactly once.
        for record in failed:
            assert send_until_answered(stub, record), record.errors
        listed = check_ledger(stub, all_accounts, records + failed)
        assert all(listed[record.request_id] == 1 for record in records + failed)
        cluster.wait_converged()
        assert not wrong_answers, "writes with a majority down:\n" + "\n".join(wrong_answers)
