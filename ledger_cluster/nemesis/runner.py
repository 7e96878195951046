"""One nemesis run end to end: start a local cluster (3 nodes, a few shards, a low compaction
threshold so snapshots happen), drive it with the workload while the nemesis injects faults,
heal it, read the final state through the gateway and every replica's own LMDB files, run the
checks and build the report.

Once healed, the final state is re-read account by account until it is quiet: every transfer
whole (both legs, agreeing) and nothing pending with a deadline, or until the bounds within which
the cluster promises that have passed (then the checks report what is left).

Everything lands under the run's directory: the cluster's config, data and logs,
`history.jsonl` (every operation), `leadership.jsonl` (who led each shard, about once a second)
and `report.json`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from ledger_cluster import backup
from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.config import ClusterConfig
from ledger_cluster.core import AccountsCore
from ledger_cluster.gateway import views
from ledger_cluster.ids import parse_account_id
from ledger_cluster.internal.v1 import core_pb2, node_pb2
from ledger_cluster.localcluster.cluster import Cluster, new_cluster, started_cluster
from ledger_cluster.nemesis import checks
from ledger_cluster.nemesis import history as h
from ledger_cluster.nemesis.faults import FAULT_KINDS, PARTITION_KINDS, FaultRecord, Nemesis, NemesisLog
from ledger_cluster.nemesis.leadership import LeadershipSample, LeadershipSampler, acknowledging_terms
from ledger_cluster.nemesis.network import Firewall
from ledger_cluster.nemesis.workload import (
    WORKLOAD_DEFAULT,
    WORKLOADS,
    Workload,
    account_view,
    transaction_view,
)
from ledger_cluster.sharding import shard_key
from ledger_cluster.status import error_details

NODES = 3
# The operation mixes a run can drive (the CLI's --workload).
WORKLOAD_CHOICES: tuple[str, ...] = WORKLOADS
WORKLOAD_CHOICE_DEFAULT = WORKLOAD_DEFAULT
REPLICAS = 3
SHARDS_DEFAULT = 4
SHARDS_MAX = 64
CLIENTS_MAX = 64
DURATION_SECONDS_MAX = 24 * 3600.0
# Snapshots (and snapshot transfers to restarted or wiped replicas) every few hundred writes.
LOG_COMPACTION_MIN_ENTRIES_DEFAULT = 100
FINAL_READ_TIMEOUT_SECONDS = 60.0
# Reads of one account's state (account, listing, account) until the account held still.
FINAL_READ_ATTEMPTS_MAX = 20
FINAL_READ_CALL_TIMEOUT_SECONDS = 5.0
FINAL_READ_PAUSE_SECONDS = 0.2
CONVERGE_TIMEOUT_SECONDS = 60.0
CONVERGE_POLL_SECONDS = 0.1
NODE_CALL_TIMEOUT_SECONDS = 5.0
REPLICA_PAGE_SIZE = 1000
REPLICA_PAGES_MAX = 10_000
# Re-reads of the accounts that are not quiet yet come this often, and stop at the latest this
# long after the heal whatever the deadlines say (a deadline far away is the expiry check's).
QUIET_POLL_SECONDS = 0.25
QUIET_WAIT_SECONDS_MAX = 60.0
# Past the bound of the promise, so that what is still unquiet then is a violation.
QUIET_MARGIN_SECONDS = 1.0
# Once the final state is quiet, how long the replicas' verification is asked again while some
# transfer still owes its credit shard work (only internal flags are left to clear then).
UNFINISHED_WAIT_SECONDS = 15.0


@dataclass(frozen=True)
class NemesisOptions:
    base_dir: Path
    duration_seconds: float
    seed: int
    clients: int = 4
    faults: tuple[str, ...] = FAULT_KINDS
    shards: int = SHARDS_DEFAULT
    log_compaction_min_entries: int = LOG_COMPACTION_MIN_ENTRIES_DEFAULT
    election_bound_seconds: float = 10.0
    avoided_ports: frozenset[int] = frozenset()
    # "transactions", "transfers" or "mixed" (workload.WORKLOADS).
    workload: str = WORKLOAD_DEFAULT


@dataclass
class NemesisReport:
    options: dict[str, Any]
    operations: dict[str, dict[str, int]]
    faults: list[dict[str, Any]]
    fault_summary: dict[str, dict[str, Any]]
    checks: list[dict[str, Any]]
    passed: bool
    base_dir: str
    elapsed_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_text(self) -> str:
        lines = [
            f"nemesis: seed {self.options['seed']}, {self.options['duration_seconds']:g} s of faults,"
            f" {self.options['clients']} clients, {self.options.get('workload', WORKLOAD_DEFAULT)}"
            f" workload, {self.options['shards']} shards;"
            f" run directory {self.base_dir}",
            "",
            f"{'operation':<20}{'ok':>9}{'failed':>9}{'unknown':>9}",
        ]
        for kind, outcomes in sorted(self.operations.items()):
            lines.append(
                f"{kind:<20}{outcomes.get(h.OUTCOME_OK, 0):>9}{outcomes.get(h.OUTCOME_FAILED, 0):>9}"
                f"{outcomes.get(h.OUTCOME_UNKNOWN, 0):>9}"
            )
        lines += ["", f"{'fault':<22}{'count':>6}{'worst election s':>18}{'worst unavailable s':>21}"]
        for kind, summary in sorted(self.fault_summary.items()):
            election = summary["worst_election_seconds"]
            lines.append(
                f"{kind:<22}{summary['count']:>6}{'never' if election is None else f'{election:.2f}':>18}"
                f"{summary['worst_unavailable_seconds']:>21.2f}"
            )
        lines.append("")
        for check in self.checks:
            verdict = "PASS" if check["passed"] else "FAIL"
            detail = f" ({check['detail']})" if check["detail"] else ""
            lines.append(f"{verdict} {check['name']}: {check['description']}{detail}")
            for violation in check["violations"]:
                lines.append(f"     - {violation}")
            if check["violation_count"] > len(check["violations"]):
                lines.append(f"     ... {check['violation_count']} violations in all")
        lines += [
            *self.notes,
            "",
            f"result: {'PASS' if self.passed else 'FAIL'} in {self.elapsed_seconds:.0f} s",
        ]
        return "\n".join(lines)


def run_nemesis(options: NemesisOptions, progress: Callable[[str], None]) -> NemesisReport:
    started = time.monotonic()
    options.base_dir.mkdir(parents=True, exist_ok=True)
    # Partitions: in the private namespace (Firewall refuses to run anywhere else), with each
    # node on its own loopback address so the rules can tell them apart.
    partitions = bool(set(options.faults) & set(PARTITION_KINDS))
    firewall = Firewall() if partitions else None
    cluster = new_cluster(
        options.base_dir,
        # A fresh secret per run: nothing outside this run should talk to its Raft ports.
        secrets.token_urlsafe(24),
        nodes=NODES,
        shards=options.shards,
        replicas=REPLICAS,
        log_compaction_min_entries=options.log_compaction_min_entries,
        avoided_ports=options.avoided_ports,
        distinct_hosts=partitions,
    )
    history = h.History(options.base_dir / "history.jsonl")
    log = NemesisLog()
    notes: list[str] = []
    try:
        progress(f"starting {NODES} nodes and a gateway under {options.base_dir}")
        with started_cluster(cluster):
            outcome = _drive(
                cluster,
                options=options,
                history=history,
                log=log,
                progress=progress,
                notes=notes,
                firewall=firewall,
            )
        final = outcome.final
        replica_states = _read_replicas(cluster, final)
    finally:
        history.close()
        _write_leadership(options.base_dir / "leadership.jsonl", log.leadership)
    operations = history.operations()
    results = [
        checks.check_acknowledged_writes(operations, final),
        checks.check_unacknowledged_writes(operations, final),
        checks.check_balances(operations, final),
        checks.check_replicas(final, replica_states, outcome.digests, outcome.verify_problems),
        checks.check_consistent_reads(operations, final),
        checks.check_linearizable_account_reads(operations, final),
        checks.check_one_leader_per_term(
            acknowledging_terms(node.log_path for node in cluster.nodes.values())
        ),
        checks.check_reads_never_show_lost_writes(operations, final),
        checks.check_elections(log.faults, options.election_bound_seconds),
        checks.check_progress_after_heal(
            operations, log.faults, log.leadership, _shard_for_account(cluster.config)
        ),
        checks.check_cluster_health(log),
        checks.check_overdraft_limits(operations, final),
        checks.check_transfer_legs(final),
        checks.check_acknowledged_transfers(operations, final),
        checks.check_unacknowledged_transfers(operations, final),
        checks.check_transfer_finishes(operations, final),
        checks.check_conservation(final),
        checks.check_expiry(final, outcome.read_unix_ns, outcome.healed_unix_ns),
        checks.check_replica_transfer_summaries(final, outcome.transfer_summary),
    ]
    report = _report(
        options, operations=operations, log=log, results=results, config=cluster.config, notes=notes
    )
    report.elapsed_seconds = time.monotonic() - started
    (options.base_dir / "report.json").write_text(report.to_json() + "\n", encoding="utf-8")
    return report


@dataclass
class _DriveOutcome:
    final: checks.FinalState
    digests: dict[str, dict[str, tuple[int, str]]]
    verify_problems: dict[str, list[str]]
    transfer_summary: backup.TransferCheck
    # Wall clock, like the gateway's stamps: when healing ended, when the last pass of the final
    # read started.
    healed_unix_ns: int
    read_unix_ns: int


def _drive(
    cluster: Cluster,
    *,
    options: NemesisOptions,
    history: h.History,
    log: NemesisLog,
    progress: Callable[[str], None],
    notes: list[str],
    firewall: Firewall | None,
) -> _DriveOutcome:
    workload = Workload(
        cluster.gateway_address,
        history,
        options.seed,
        options.clients,
        workload=options.workload,
        shard_of=_shard_for_account(cluster.config),
    )
    nemesis = Nemesis(cluster, history.now, options.seed, options.faults, log, firewall=firewall)
    workload.create_initial_accounts()
    progress(
        f"cluster healthy; {options.clients} clients and the nemesis run for {options.duration_seconds:g} s"
    )
    sampler = LeadershipSampler(
        (node.address for node in cluster.nodes.values()),
        cluster.internal_credentials,
        history.now,
        log.leadership,
    )
    workload.start()
    sampler.start()
    try:
        nemesis.run(until_seconds=history.now() + options.duration_seconds)
    finally:
        try:
            workload.stop()
        finally:
            # After the clients: its last sample says who led each shard until they stopped.
            sampler.stop()
        if sampler.failure:
            notes.append(f"note: {sampler.failure}")
        progress(f"faults stopped after {len(log.faults)}; healing the cluster")
        nemesis.heal()
    healed_unix_ns = time.time_ns()
    candidates = candidate_accounts(history.operations())
    progress(f"reading the final state of {len(candidates)} accounts through the gateway")
    read_unix_ns = time.time_ns()
    stub = cluster.ledger_stub()
    final = read_final_state(stub, candidates, notes)
    read_unix_ns = wait_until_quiet(stub, final, healed_unix_ns, read_unix_ns, notes)
    digests = _converged_digests(cluster)
    verify_problems, transfer_summary = _verify_replicas(cluster)
    nemesis.collect_unexpected_exits()
    return _DriveOutcome(final, digests, verify_problems, transfer_summary, healed_unix_ns, read_unix_ns)


def _write_leadership(path: Path, samples: list[LeadershipSample]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for sample in samples:
            file.write(json.dumps(asdict(sample), sort_keys=True) + "\n")


def candidate_accounts(operations: Iterable[h.Operation]) -> list[str]:
    """Every account the run may have created: acknowledged or not, an account created with a
    request_id has the id the gateway derives from it."""
    accounts = set()
    for op in operations:
        if op.kind == h.CREATE_ACCOUNT:
            accounts.add(op.request["account_id"])
            if op.outcome == h.OUTCOME_OK:
                accounts.add(op.result["account"]["id"])
    return sorted(accounts)


# -- the final state ---------------------------------------------------------------------------


def _retrying(call: Callable[[], Any], deadline: float) -> Any:
    """`call`, again after UNAVAILABLE or a deadline until `deadline` (the cluster has healed; a
    leader may still be settling)."""
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            code = error_details(error).code
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(FINAL_READ_PAUSE_SECONDS)


def read_final_state(
    stub: ledger_pb2_grpc.LedgerServiceStub, account_ids: list[str], notes: list[str]
) -> checks.FinalState:
    deadline = time.monotonic() + FINAL_READ_TIMEOUT_SECONDS
    final: checks.FinalState = {}
    for account_id in account_ids:
        final[account_id] = _read_account_state(stub, account_id, deadline)
    missing = sum(1 for state in final.values() if state.account is None)
    if missing:
        notes.append(f"note: {missing} accounts whose creation was not acknowledged do not exist")
    return final


def _read_account_state(
    stub: ledger_pb2_grpc.LedgerServiceStub, account_id: str, deadline: float
) -> checks.AccountState:
    """The account and its listing as one state: the account is read again after the listing,
    and both are read again when it moved in between (a driver may still finish a transfer
    while the final state is read), at most FINAL_READ_ATTEMPTS_MAX times."""
    state = checks.AccountState(None)
    for _ in range(FINAL_READ_ATTEMPTS_MAX):
        before = _read_account(stub, account_id, deadline)
        if before is None:
            return checks.AccountState(None)
        transactions = _read_listing(stub, account_id, deadline)
        after = _read_account(stub, account_id, deadline)
        state = checks.AccountState(account_view(before), transactions)
        if after == before:
            return state
        if time.monotonic() > deadline:
            break
    return state


def _read_account(
    stub: ledger_pb2_grpc.LedgerServiceStub, account_id: str, deadline: float
) -> ledger_pb2.Account | None:
    try:
        account: ledger_pb2.Account = _retrying(
            lambda: (
                stub.GetAccount(
                    ledger_pb2.GetAccountRequest(account_id=account_id, consistent=True),
                    timeout=FINAL_READ_CALL_TIMEOUT_SECONDS,
                ).account
            ),
            deadline,
        )
    except grpc.RpcError as error:
        if error_details(error).code == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return account


def _read_listing(
    stub: ledger_pb2_grpc.LedgerServiceStub, account_id: str, deadline: float
) -> list[dict[str, Any]]:
    transactions: list[dict[str, Any]] = []
    token = ""
    while True:
        request = ledger_pb2.ListTransactionsRequest(
            account_id=account_id, page_size=REPLICA_PAGE_SIZE, page_token=token, consistent=True
        )
        page = _retrying(
            partial(stub.ListTransactions, request, timeout=FINAL_READ_CALL_TIMEOUT_SECONDS), deadline
        )
        transactions.extend(transaction_view(transaction) for transaction in page.transactions)
        token = page.next_page_token
        if not token:
            return transactions


def _quiet_deadline_ns(final: checks.FinalState, healed_unix_ns: int) -> int:
    """Until when to wait for quiet: past the bound after the heal within which transfers are
    whole, and past the expiry bound after the latest deadline still pending; never longer than
    QUIET_WAIT_SECONDS_MAX after the heal."""
    nanos = checks.NANOS_PER_SECOND
    margin = int(QUIET_MARGIN_SECONDS * nanos)
    latest_deadline = max(
        (
            t.get("expires_at", 0)
            for state in final.values()
            for t in state.transactions
            if t["status"] == checks.PENDING
        ),
        default=0,
    )
    wanted = max(
        healed_unix_ns + int(checks.TRANSFER_QUIET_AFTER_HEAL_SECONDS_MAX * nanos),
        latest_deadline + int(checks.EXPIRY_AFTER_HEAL_SECONDS_MAX * nanos),
    )
    return min(wanted + margin, healed_unix_ns + int(QUIET_WAIT_SECONDS_MAX * nanos))


def wait_until_quiet(
    stub: ledger_pb2_grpc.LedgerServiceStub,
    final: checks.FinalState,
    healed_unix_ns: int,
    read_unix_ns: int,
    notes: list[str],
) -> int:
    """Re-read (in place) the accounts of `final` that are not quiet until none is left or a
    pass that started past the deadline found some (a pass is always made after the deadline,
    however long the first read took: an account read before it may rightly have changed since);
    the wall-clock moment the last pass started (`read_unix_ns` if none)."""
    passes = 0
    while True:
        unquiet = sorted(checks.unquiet_accounts(final) & final.keys())
        if not unquiet:
            break
        deadline_ns = _quiet_deadline_ns(final, healed_unix_ns)
        if read_unix_ns > deadline_ns:
            notes.append(f"note: {len(unquiet)} accounts were still not quiet when the wait for it ended")
            break
        if time.time_ns() < deadline_ns:
            time.sleep(QUIET_POLL_SECONDS)
        passes += 1
        read_unix_ns = time.time_ns()
        deadline = time.monotonic() + FINAL_READ_TIMEOUT_SECONDS
        for account_id in unquiet:
            final[account_id] = _read_account_state(stub, account_id, deadline)
    if passes:
        notes.append(f"note: the final read re-read unquiet accounts {passes} times")
    return read_unix_ns


def _converged_digests(cluster: Cluster) -> dict[str, dict[str, tuple[int, str]]]:
    """shard -> node -> (applied index, digest), once every replica of every shard agrees or
    the timeout passes (then the last answers, which the check reports)."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT_SECONDS
    while True:
        answers: dict[str, dict[str, tuple[int, str]]] = {}
        for shard in cluster.config.shards:
            answers[shard.shard_id] = {}
            for replica in shard.replicas:
                try:
                    digest = cluster.digest(replica.node_id, shard.shard_id)
                    answers[shard.shard_id][replica.node_id] = (digest.applied_index, digest.digest)
                except grpc.RpcError as error:
                    # Unique per replica, so replicas that cannot answer never count as agreeing.
                    code = error_details(error).code.name
                    answers[shard.shard_id][replica.node_id] = (
                        -1,
                        f"{replica.node_id}: Digest failed, {code}",
                    )
        if (
            all(len(set(by_node.values())) == 1 for by_node in answers.values())
            or time.monotonic() > deadline
        ):
            return answers
        time.sleep(CONVERGE_POLL_SECONDS)


def _verify_replicas(cluster: Cluster) -> tuple[dict[str, list[str]], backup.TransferCheck]:
    """Every replica's own verification ("node/shard" -> problems) and the transfers summed
    across shards as `ledger-dev verify` sums them; asked again while some transfer still owes
    its credit shard work (a driver finishes it after its grace), until UNFINISHED_WAIT_SECONDS."""
    deadline = time.monotonic() + UNFINISHED_WAIT_SECONDS
    while True:
        problems, shards = _verify_round(cluster)
        transfers = backup.check_transfers(shards)
        if not transfers.unfinished or time.monotonic() > deadline:
            return problems, transfers
        time.sleep(CONVERGE_POLL_SECONDS)


def _verify_round(cluster: Cluster) -> tuple[dict[str, list[str]], list[backup.ShardVerification]]:
    problems: dict[str, list[str]] = {}
    shards = []
    for shard in cluster.config.shards:
        replicas = []
        for replica in shard.replicas:
            key = f"{replica.node_id}/{shard.shard_id}"
            try:
                answer = cluster.node_stub(replica.node_id).Verify(
                    node_pb2.VerifyRequest(shard_id=shard.shard_id), timeout=NODE_CALL_TIMEOUT_SECONDS
                )
                problems[key] = list(answer.problems)
                replicas.append(backup.ReplicaVerification(replica.node_id, answer, ""))
            except grpc.RpcError as error:
                problems[key] = [f"Verify failed: {error}"]
                replicas.append(backup.ReplicaVerification(replica.node_id, None, str(error)))
        shards.append(backup.ShardVerification(shard.shard_id, tuple(replicas), ()))
    return problems, shards


def _read_replicas(cluster: Cluster, final: checks.FinalState) -> dict[str, checks.FinalState]:
    """What each replica's own LMDB environment holds for the accounts of its shard, read from
    its files once every node has stopped."""
    states: dict[str, checks.FinalState] = {}
    for shard in cluster.config.shards:
        owned = [a for a in final if shard.lower_bound <= shard_key(parse_account_id(a)) <= shard.upper_bound]
        for replica in shard.replicas:
            directory = cluster.nodes[replica.node_id].data_dir / "replicas" / shard.shard_id
            core = AccountsCore.open(directory, shard.lower_bound, shard.upper_bound)
            try:
                states[f"{replica.node_id}/{shard.shard_id}"] = {a: _replica_account(core, a) for a in owned}
            finally:
                core.close()
    return states


def _replica_account(core: AccountsCore, account_id: str) -> checks.AccountState:
    number = parse_account_id(account_id)
    found = core.read(core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=number)))
    if found.outcome != core_pb2.OUTCOME_OK:
        return checks.AccountState(None)
    transactions: list[dict[str, Any]] = []
    sequence = 0
    for _ in range(REPLICA_PAGES_MAX):
        query = core_pb2.ListTransactionsQuery(
            account_id=number, start_sequence=sequence, limit=REPLICA_PAGE_SIZE
        )
        page = core.read(core_pb2.ReadQuery(list_transactions=query))
        transactions.extend(transaction_view(views.transaction_view(data)) for data in page.transactions)
        sequence = page.next_sequence
        if not sequence:
            break
    return checks.AccountState(account_view(views.account_view(found.account)), transactions)


# -- the report --------------------------------------------------------------------------------


def _shard_for_account(config: ClusterConfig) -> Callable[[str], str]:
    return lambda account_id: config.shard_for_key(shard_key(parse_account_id(account_id))).shard_id


def _write_times_by_shard(operations: list[h.Operation], config: ClusterConfig) -> dict[str, list[float]]:
    shard_for_account = _shard_for_account(config)
    times: dict[str, list[float]] = defaultdict(list)
    for op in operations:
        account_id = op.account_id
        if op.is_write and op.outcome == h.OUTCOME_OK and account_id is not None:
            times[shard_for_account(account_id)].append(op.complete_seconds)
    return {shard_id: sorted(moments) for shard_id, moments in times.items()}


def _unavailable_seconds(times_by_shard: dict[str, list[float]], start: float, end: float) -> float:
    """The longest stretch in [start, end] during which some shard acknowledged no write."""
    worst = 0.0
    for moments in times_by_shard.values():
        previous = start
        for moment in [*[m for m in moments if start < m < end], end]:
            worst = max(worst, moment - previous)
            previous = moment
    return worst


def _report(
    options: NemesisOptions,
    *,
    operations: list[h.Operation],
    log: NemesisLog,
    results: list[checks.CheckResult],
    config: ClusterConfig,
    notes: list[str],
) -> NemesisReport:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for op in operations:
        counts[op.kind][op.outcome] += 1
    times_by_shard = _write_times_by_shard(operations, config)
    run_end = max((op.complete_seconds for op in operations), default=0.0)
    summary: dict[str, dict[str, Any]] = {}
    faults: list[dict[str, Any]] = []
    for index, fault in enumerate(log.faults):
        following: FaultRecord | None = log.faults[index + 1] if index + 1 < len(log.faults) else None
        window_end = following.injected_seconds if following is not None else run_end
        unavailable = _unavailable_seconds(times_by_shard, fault.injected_seconds, window_end)
        faults.append({**asdict(fault), "unavailable_seconds": round(unavailable, 3)})
        entry = summary.setdefault(
            fault.kind, {"count": 0, "worst_election_seconds": 0.0, "worst_unavailable_seconds": 0.0}
        )
        entry["count"] += 1
        if fault.election_seconds is None or entry["worst_election_seconds"] is None:
            entry["worst_election_seconds"] = None
        else:
            entry["worst_election_seconds"] = round(
                max(entry["worst_election_seconds"], fault.election_seconds), 3
            )
        entry["worst_unavailable_seconds"] = round(max(entry["worst_unavailable_seconds"], unavailable), 3)
    options_view = {
        **asdict(options),
        "base_dir": str(options.base_dir),
        "avoided_ports": sorted(options.avoided_ports),
    }
    return NemesisReport(
        options=options_view,
        operations={kind: dict(outcomes) for kind, outcomes in counts.items()},
        faults=faults,
        fault_summary=summary,
        checks=[{**asdict(result), "passed": result.passed} for result in results],
        passed=all(result.passed for result in results),
        base_dir=str(options.base_dir),
        notes=notes,
    )
