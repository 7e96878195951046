"""The checks of a nemesis run, as pure functions of the history, the final state read through
the gateway once the cluster healed, and what each replica holds.

Every transaction the workload writes has its request_id as description, so the final listing
says which logical write each stored transaction came from; an account created with a
request_id has an id derived from it, so even an account whose creation is unknown is looked up.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ledger_cluster.nemesis import history as h
from ledger_cluster.nemesis.faults import FaultRecord, NemesisLog
from ledger_cluster.nemesis.leadership import LeadershipSample, ShardLeader

# Violations listed per check in the report (the count says how many there were).
VIOLATION_EXAMPLES_MAX = 10

SETTLED = "TRANSACTION_STATUS_SETTLED"
PENDING = "TRANSACTION_STATUS_PENDING"
CANCELLED = "TRANSACTION_STATUS_CANCELLED"
INSUFFICIENT_FUNDS = "TRANSACTION_STATUS_INSUFFICIENT_FUNDS"


@dataclass
class AccountState:
    """One account as stored: None when it does not exist; transactions in apply order."""

    account: dict[str, Any] | None
    transactions: list[dict[str, Any]] = field(default_factory=list)


FinalState = dict[str, AccountState]


@dataclass
class CheckResult:
    name: str
    description: str
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.violation_count == 0

    def add(self, violation: str) -> None:
        self.violation_count += 1
        if len(self.violations) < VIOLATION_EXAMPLES_MAX:
            self.violations.append(violation)


@dataclass
class _LogicalWrite:
    """Every attempt (original and duplicates) of one create-transaction request_id."""

    request: dict[str, Any]
    attempts: list[h.Operation] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[h.Operation]:
        return [op for op in self.attempts if op.outcome == h.OUTCOME_OK]

    @property
    def unknown(self) -> bool:
        return not self.acknowledged and any(op.outcome == h.OUTCOME_UNKNOWN for op in self.attempts)

    @property
    def first_acknowledged_seconds(self) -> float | None:
        return min((op.complete_seconds for op in self.acknowledged), default=None)


def _logical_writes(operations: Iterable[h.Operation]) -> dict[str, _LogicalWrite]:
    writes: dict[str, _LogicalWrite] = {}
    for op in operations:
        if op.kind in h.TRANSACTION_WRITES:
            writes.setdefault(op.request["request_id"], _LogicalWrite(op.request)).attempts.append(op)
    return writes


def status_follows(earlier: str, later: str) -> bool:
    """Whether a transaction seen with status `earlier` may later have status `later`: only a
    pending one changes, and never into a refusal."""
    if earlier == PENDING:
        return later != INSUFFICIENT_FUNDS
    return earlier == later


def _listed(final: FinalState) -> dict[str, list[dict[str, Any]]]:
    """request_id (description) -> every stored transaction carrying it."""
    by_description: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for state in final.values():
        for transaction in state.transactions:
            by_description[transaction["description"]].append(transaction)
    return by_description


def _transactions_by_id(final: FinalState) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for state in final.values() for t in state.transactions}


# -- writes ----------------------------------------------------------------------------------


def check_acknowledged_writes(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "acknowledged-writes-exactly-once",
        "every acknowledged create-account, create-transaction, settle and cancel is in the final"
        " state exactly once, as acknowledged",
    )
    listed = _listed(final)
    for request_id, write in sorted(_logical_writes(operations).items()):
        answers = {op.result["transaction"]["id"] for op in write.acknowledged}
        if not answers:
            continue
        stored = listed.get(request_id, [])
        if len(stored) != 1:
            result.add(f"write {request_id} acknowledged as {sorted(answers)} is stored {len(stored)} times")
        elif len(answers) != 1 or stored[0]["id"] not in answers:
            result.add(f"write {request_id} acknowledged as {sorted(answers)}, stored as {stored[0]['id']}")
        elif stored[0]["amount"] != write.request["amount"]:
            result.add(
                f"write {request_id}: stored amount {stored[0]['amount']} != {write.request['amount']}"
            )
        else:
            for op in write.acknowledged:
                if not status_follows(op.result["transaction"]["status"], stored[0]["status"]):
                    result.add(
                        f"write {request_id} acknowledged {op.result['transaction']['status']},"
                        f" stored {stored[0]['status']}"
                    )
    for op in operations:
        if op.kind == h.CREATE_ACCOUNT and op.outcome == h.OUTCOME_OK:
            account_id = op.result["account"]["id"]
            state = final.get(account_id)
            if state is None or state.account is None:
                result.add(f"account {account_id} acknowledged to {op.request['request_id']} is missing")
    _check_acknowledged_finishes(operations, final, result)
    return result


def _check_acknowledged_finishes(
    operations: list[h.Operation], final: FinalState, result: CheckResult
) -> None:
    by_id = _transactions_by_id(final)
    wanted_status = {h.SETTLE: SETTLED, h.CANCEL: CANCELLED}
    for op in operations:
        if op.kind not in wanted_status or op.outcome != h.OUTCOME_OK:
            continue
        transaction_id = op.request["transaction_id"]
        stored = by_id.get(transaction_id)
        if stored is None:
            result.add(f"{op.kind} of {transaction_id} acknowledged, but the transaction is missing")
        elif stored["status"] != wanted_status[op.kind]:
            result.add(f"{op.kind} of {transaction_id} acknowledged, but it is stored {stored['status']}")


def check_unacknowledged_writes(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "unacknowledged-writes",
        "a write with an unknown outcome is stored at most once; a write that failed with a"
        " definite code is not stored; nothing is stored that no client asked for",
    )
    listed = _listed(final)
    writes = _logical_writes(operations)
    unknown = 0
    for request_id, write in sorted(writes.items()):
        if write.acknowledged:
            continue
        count = len(listed.get(request_id, []))
        if write.unknown:
            unknown += 1
            if count > 1:
                result.add(f"write {request_id} of unknown outcome is stored {count} times")
        elif count:
            codes = sorted({f"{op.code}/{op.reason}" for op in write.attempts})
            result.add(f"write {request_id} failed with {codes} yet is stored {count} times")
    _check_unacknowledged_accounts(operations, final, result)
    _check_unrequested_finishes(operations, final, writes, result)
    for description, transactions in sorted(listed.items()):
        if description not in writes:
            result.add(
                f"stored transactions {[t['id'] for t in transactions]} match no request ({description!r})"
            )
    result.detail = f"{unknown} writes of unknown outcome"
    return result


def _check_unacknowledged_accounts(
    operations: list[h.Operation], final: FinalState, result: CheckResult
) -> None:
    """An account all of whose creations failed with a definite code does not exist."""
    attempts: dict[str, list[h.Operation]] = defaultdict(list)
    for op in operations:
        if op.kind == h.CREATE_ACCOUNT:
            attempts[op.request["request_id"]].append(op)
    for request_id, ops in sorted(attempts.items()):
        account_id = ops[0].request.get("account_id")
        state = final.get(account_id) if account_id else None
        if (
            all(op.outcome == h.OUTCOME_FAILED for op in ops)
            and state is not None
            and state.account is not None
        ):
            result.add(f"account {account_id} of {request_id} failed to create, yet it exists")


def _check_unrequested_finishes(
    operations: list[h.Operation], final: FinalState, writes: dict[str, _LogicalWrite], result: CheckResult
) -> None:
    """A transaction created pending is settled (cancelled) only if some settle (cancel) was
    acknowledged or has an unknown outcome."""
    may_have: dict[str, set[str]] = defaultdict(set)
    for op in operations:
        if op.kind in (h.SETTLE, h.CANCEL) and op.outcome != h.OUTCOME_FAILED:
            may_have[op.kind].add(op.request["transaction_id"])
    finishing = {SETTLED: h.SETTLE, CANCELLED: h.CANCEL}
    for state in final.values():
        for transaction in state.transactions:
            write = writes.get(transaction["description"])
            if write is None or write.request["settled"] or transaction["status"] not in finishing:
                continue
            kind = finishing[transaction["status"]]
            if transaction["id"] not in may_have[kind]:
                result.add(
                    f"{transaction['id']} created pending is {transaction['status']} without any {kind}"
                )


# -- balances ----------------------------------------------------------------------------------


def _replayed_balances(transactions: list[dict[str, Any]]) -> tuple[int, int]:
    """(available, settled) that API.md's rules give for these final statuses."""
    settled = sum(t["amount"] for t in transactions if t["status"] == SETTLED)
    held = sum(-t["amount"] for t in transactions if t["status"] == PENDING and t["amount"] < 0)
    return settled - held, settled


def check_balances(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "balances-replay",
        "each account's stored balances equal the replay of its transactions; none is negative;"
        " no purchase was accepted without the funds, none refused that surely had them",
    )
    created_settled = {
        request_id: bool(write.request["settled"])
        for request_id, write in _logical_writes(operations).items()
    }
    for account_id, state in sorted(final.items()):
        if state.account is None:
            continue
        available, settled = _replayed_balances(state.transactions)
        stored = (state.account["available_balance"], state.account["settled_balance"])
        if stored != (available, settled):
            result.add(
                f"account {account_id}: stored (available, settled) {stored}, replayed {(available, settled)}"
            )
        if min(stored) < 0:
            result.add(f"account {account_id}: negative balance {stored}")
        _check_purchase_decisions(account_id, state.transactions, created_settled, result)
    return result


def _check_purchase_decisions(
    account_id: str, transactions: list[dict[str, Any]], created_settled: dict[str, bool], result: CheckResult
) -> None:
    """Bounds on the available balance just before each purchase, from the transactions applied
    before it: at most every top-up that ended settled minus every purchase still holding or
    settled; at least the top-ups created settled minus every purchase that was accepted."""
    upper = 0
    lower = 0
    for transaction in transactions:
        amount = transaction["amount"]
        status = transaction["status"]
        if amount < 0:
            if status != INSUFFICIENT_FUNDS and upper + amount < 0:
                result.add(
                    f"account {account_id}: purchase {transaction['id']} ({amount}) accepted with at"
                    f" most {upper} available"
                )
            if status == INSUFFICIENT_FUNDS and lower + amount >= 0:
                result.add(
                    f"account {account_id}: purchase {transaction['id']} ({amount}) refused with at"
                    f" least {lower} available"
                )
            if status in (PENDING, SETTLED):
                upper += amount
            if status != INSUFFICIENT_FUNDS:
                lower += amount
        else:
            if status == SETTLED:
                upper += amount
            if created_settled.get(transaction["description"], False):
                lower += amount


# -- reads -------------------------------------------------------------------------------------


@dataclass
class _Acknowledged:
    """When each transaction was first acknowledged as existing, and as settled or cancelled."""

    created: dict[str, float] = field(default_factory=dict)
    created_status: dict[str, str] = field(default_factory=dict)
    finished: dict[str, tuple[float, str]] = field(default_factory=dict)
    accounts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, operations: list[h.Operation]) -> _Acknowledged:
        acknowledged = cls()
        for op in operations:
            if op.outcome != h.OUTCOME_OK:
                continue
            if op.kind in h.TRANSACTION_WRITES:
                created = op.result["transaction"]
                _earliest(acknowledged.created, created["id"], op.complete_seconds)
                acknowledged.created_status[created["id"]] = created["status"]
            elif op.kind in (h.SETTLE, h.CANCEL):
                transaction = op.result["transaction"]
                previous = acknowledged.finished.get(transaction["id"])
                if previous is None or op.complete_seconds < previous[0]:
                    acknowledged.finished[transaction["id"]] = (op.complete_seconds, transaction["status"])
            elif op.kind == h.CREATE_ACCOUNT:
                _earliest(acknowledged.accounts, op.result["account"]["id"], op.complete_seconds)
        return acknowledged


def _earliest(moments: dict[str, float], key: str, moment: float) -> None:
    moments[key] = min(moment, moments.get(key, moment))


def check_consistent_reads(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "consistent-reads-see-acknowledged-writes",
        "a consistent read shows every write acknowledged before the read started",
    )
    acknowledged = _Acknowledged.of(operations)
    by_account: dict[str, list[str]] = defaultdict(list)
    for transaction_id in acknowledged.created:
        by_account[transaction_id[:16]].append(transaction_id)
    checked = 0
    for op in operations:
        if not op.request.get("consistent") or op.outcome == h.OUTCOME_UNKNOWN:
            continue
        # A read that failed for any other reason than NOT_FOUND (the shard unavailable) says
        # nothing about what is stored.
        if op.outcome == h.OUTCOME_FAILED and op.code != "NOT_FOUND":
            continue
        if op.kind == h.GET_ACCOUNT:
            created = acknowledged.accounts.get(op.request["account_id"])
            if created is not None and created < op.invoke_seconds and op.outcome != h.OUTCOME_OK:
                result.add(
                    f"op {op.op_id}: consistent read of account {op.request['account_id']} failed"
                    f" with {op.code}/{op.reason} after its creation was acknowledged"
                )
        elif op.kind == h.GET_TRANSACTION:
            checked += 1
            seen = (
                {op.request["transaction_id"]: op.result["transaction"]} if op.outcome == h.OUTCOME_OK else {}
            )
            _check_seen(
                op,
                transaction_ids=[op.request["transaction_id"]],
                seen=seen,
                acknowledged=acknowledged,
                result=result,
            )
        elif op.kind == h.LIST_TRANSACTIONS and op.outcome == h.OUTCOME_OK and op.result.get("complete"):
            checked += 1
            seen = {t["id"]: t for t in op.result["transactions"]}
            _check_seen(
                op,
                transaction_ids=by_account.get(op.request["account_id"], []),
                seen=seen,
                acknowledged=acknowledged,
                result=result,
            )
    result.detail = f"{checked} consistent transaction reads checked"
    return result


def _check_seen(
    op: h.Operation,
    *,
    transaction_ids: list[str],
    seen: dict[str, dict[str, Any]],
    acknowledged: _Acknowledged,
    result: CheckResult,
) -> None:
    for transaction_id in transaction_ids:
        created = acknowledged.created.get(transaction_id)
        if created is None or created >= op.invoke_seconds:
            continue
        if transaction_id not in seen:
            outcome = (
                "did not list it" if op.kind == h.LIST_TRANSACTIONS else f"failed with {op.code}/{op.reason}"
            )
            result.add(
                f"op {op.op_id} ({op.kind} at {op.invoke_seconds:.3f} s) {outcome}; {transaction_id}"
                f" was acknowledged at {created:.3f} s"
            )
            continue
        shown = seen[transaction_id]["status"]
        created_status = acknowledged.created_status[transaction_id]
        if not status_follows(created_status, shown):
            result.add(
                f"op {op.op_id} ({op.kind}) shows {transaction_id} {shown}; it was created {created_status}"
            )
        finished = acknowledged.finished.get(transaction_id)
        if (
            finished is not None
            and finished[0] < op.invoke_seconds
            and seen[transaction_id]["status"] != finished[1]
        ):
            result.add(
                f"op {op.op_id} ({op.kind}) shows {transaction_id} {seen[transaction_id]['status']};"
                f" {finished[1]} was acknowledged at {finished[0]:.3f} s"
            )


def check_reads_never_show_lost_writes(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "reads-never-show-lost-writes",
        "whatever a successful read showed (consistent or not) is in the final state: the"
        " transaction itself, and any settled, cancelled or refused status",
    )
    stored = _transactions_by_id(final)
    for op in operations:
        if op.outcome != h.OUTCOME_OK or op.kind not in h.READS:
            continue
        if op.kind == h.GET_ACCOUNT:
            account = op.result["account"]
            state = final.get(account["id"])
            if state is None or state.account is None:
                result.add(f"op {op.op_id} read account {account['id']}, which does not exist")
            if min(account["available_balance"], account["settled_balance"]) < 0:
                result.add(f"op {op.op_id} read a negative balance: {account}")
            continue
        shown = [op.result["transaction"]] if op.kind == h.GET_TRANSACTION else op.result["transactions"]
        for transaction in shown:
            final_transaction = stored.get(transaction["id"])
            if final_transaction is None:
                result.add(f"op {op.op_id} ({op.kind}) showed {transaction['id']}, which is not stored")
                continue
            same = all(transaction[key] == final_transaction[key] for key in ("amount", "description"))
            if not (same and status_follows(transaction["status"], final_transaction["status"])):
                result.add(f"op {op.op_id} ({op.kind}) showed {transaction}, stored as {final_transaction}")
    return result


# -- replicas, elections, processes ------------------------------------------------------------


def check_replicas(
    final: FinalState,
    replica_states: dict[str, FinalState],
    digests: dict[str, dict[str, tuple[int, str]]],
    verify_problems: dict[str, list[str]],
) -> CheckResult:
    """`replica_states`: "node/shard" -> what that replica's LMDB holds for the accounts of its
    shard; `digests`: shard -> node -> (applied index, record digest), read while the healed
    cluster was idle; `verify_problems`: "node/shard" -> what its own verification found."""
    result = CheckResult(
        "replicas-identical",
        "every replica of a shard reports the same record digest at the same applied index, holds"
        " exactly the final state read through the gateway, and passes its own verification",
    )
    for shard_id, answers in sorted(digests.items()):
        if len(set(answers.values())) != 1:
            result.add(f"shard {shard_id}: replicas differ: {answers}")
    for replica, problems in sorted(verify_problems.items()):
        for problem in problems:
            result.add(f"replica {replica}: {problem}")
    for replica, state in sorted(replica_states.items()):
        for account_id, held in sorted(state.items()):
            wanted = final.get(account_id)
            if wanted is None or held != wanted:
                result.add(f"replica {replica}: account {account_id} differs from the gateway's final read")
    result.detail = f"{len(replica_states)} replicas compared account by account"
    return result


def check_elections(faults: list[FaultRecord], bound_seconds: float) -> CheckResult:
    result = CheckResult(
        "leader-elected-within-bound",
        f"after every fault each shard has a leader again within {bound_seconds:g} s",
    )
    for fault in faults:
        if fault.error:
            continue  # reported by faults-and-healing
        if fault.election_seconds is None:
            result.add(
                f"{fault.kind} of {fault.target} at {fault.injected_seconds:.1f} s:"
                " a shard never got a leader"
            )
        elif fault.election_seconds > bound_seconds:
            result.add(
                f"{fault.kind} of {fault.target} at {fault.injected_seconds:.1f} s: leaders after"
                f" {fault.election_seconds:.2f} s"
            )
    measured = [fault.election_seconds for fault in faults if fault.election_seconds is not None]
    result.detail = f"worst {max(measured):.2f} s" if measured else "no fault measured"
    return result


def check_cluster_health(log: NemesisLog) -> CheckResult:
    result = CheckResult(
        "faults-and-healing",
        "every fault was injected as planned, the cluster was healthy again after each, and no"
        " process ended that the nemesis did not stop",
    )
    for fault in log.faults:
        if fault.error:
            result.add(f"{fault.kind} at {fault.injected_seconds:.1f} s: {fault.error}")
    for failure in log.heal_failures:
        result.add(failure)
    for exit_ in log.unexpected_exits:
        result.add(
            f"{exit_.name} ended on its own at {exit_.at_seconds:.1f} s (exit code {exit_.exit_code}):\n"
            f"{exit_.log_tail}"
        )
    return result


# -- progress after a fault heals --------------------------------------------------------------

# A shard that, after a fault healed, has a leader for longer than this without acknowledging a
# write fails the run: an elected leader that cannot commit (a proposal slot never freed, say) passes
# every other check, since nothing it refuses is ever applied.
PROGRESS_AFTER_HEAL_SECONDS_MAX = 10.0


@dataclass
class _Tenure:
    """Consecutive leadership samples in which one shard had the same leader at the same term."""

    leader: ShardLeader
    first_seconds: float
    last_seconds: float


def _tenures(samples: list[LeadershipSample], shard_id: str) -> list[_Tenure]:
    tenures: list[_Tenure] = []
    previous: ShardLeader | None = None
    for sample in samples:
        leader = sample.leaders.get(shard_id)
        if leader is not None and leader == previous:
            tenures[-1].last_seconds = sample.at_seconds
        elif leader is not None:
            tenures.append(_Tenure(leader, sample.at_seconds, sample.at_seconds))
        previous = leader
    return tenures


@dataclass
class _ShardWrites:
    acknowledged_seconds: list[float] = field(default_factory=list)  # completions, in order
    # Invocations of the writes the shard left undecided (failed for want of a leader able to
    # commit, or unknown), in order: evidence that clients were asking it to make progress.
    undecided_seconds: list[float] = field(default_factory=list)


def _writes_by_shard(
    operations: Iterable[h.Operation], shard_for_account: Callable[[str], str]
) -> dict[str, _ShardWrites]:
    writes: dict[str, _ShardWrites] = defaultdict(_ShardWrites)
    for op in operations:
        account_id = op.account_id
        if not op.is_write or account_id is None:
            continue
        shard = writes[shard_for_account(account_id)]
        if op.outcome == h.OUTCOME_OK:
            shard.acknowledged_seconds.append(op.complete_seconds)
        elif not op.decided:
            shard.undecided_seconds.append(op.invoke_seconds)
    for shard in writes.values():
        shard.acknowledged_seconds.sort()
        shard.undecided_seconds.sort()
    return writes


@dataclass(frozen=True)
class _Window:
    """One leader's tenure from a heal on: from its first sample at or after the heal until its
    last sample or the run's end."""

    leader: ShardLeader
    start_seconds: float
    end_seconds: float


def _windows_after(
    heal_seconds: float, tenures: list[_Tenure], sample_seconds: list[float], run_end_seconds: float
) -> Iterator[_Window]:
    """The tenures from the heal until the run's end, in order (`sample_seconds`: the moment
    of every sample, in order)."""
    first = bisect_left(tenures, heal_seconds, key=lambda tenure: tenure.last_seconds)
    for tenure in islice(tenures, first, None):
        # A tenure that began before the heal (the fault spared this shard's leader) counts
        # from the first sample after it; consecutive samples lie in the same tenure.
        start = max(tenure.first_seconds, sample_seconds[bisect_left(sample_seconds, heal_seconds)])
        if start > run_end_seconds:
            return
        yield _Window(tenure.leader, start, min(tenure.last_seconds, run_end_seconds))


def _first_at_or_after(moments: list[float], start_seconds: float) -> float | None:
    index = bisect_left(moments, start_seconds)
    return moments[index] if index < len(moments) else None


def _count_between(moments: list[float], start_seconds: float, end_seconds: float) -> int:
    """How many of the moments lie in [start, end)."""
    return bisect_left(moments, end_seconds) - bisect_left(moments, start_seconds)


@dataclass
class _Stall:
    """A shard's leadership from the first sample after a heal that shows it a leader, until a
    write to it was acknowledged (or its last leader's tenure or the run ended)."""

    start_seconds: float
    next_acknowledged_seconds: float | None
    end_seconds: float = 0.0
    led_seconds: float = 0.0  # within [start, end], the time the shard had a leader
    leaders: list[ShardLeader] = field(default_factory=list)
    # When `led_seconds` reached the bound; None if the acknowledgement or the run came first.
    bound_reached_seconds: float | None = None
    undecided_writes: int = 0  # invoked from the start until the bound was reached

    def add(self, window: _Window, bound_seconds: float) -> float | None:
        """Count the window (up to the acknowledgement); the moment the bound was reached, if
        that was in this window."""
        end = window.end_seconds
        if self.next_acknowledged_seconds is not None:
            end = min(end, self.next_acknowledged_seconds)
        reached = None
        if (
            self.bound_reached_seconds is None
            and self.led_seconds + end - window.start_seconds >= bound_seconds
        ):
            reached = self.bound_reached_seconds = window.start_seconds + bound_seconds - self.led_seconds
        self.led_seconds += end - window.start_seconds
        self.leaders.append(window.leader)
        self.end_seconds = end
        return reached


def _follow_leadership(
    windows: Iterator[_Window], writes: _ShardWrites, acknowledged_seconds: float | None, bound_seconds: float
) -> _Stall | None:
    """The leadership until `acknowledged_seconds`, or only until the bound was reached if no
    write to the shard failed by then (idle, not stalled: what follows does not matter); None
    if the shard had no leader before."""
    stall: _Stall | None = None
    for window in windows:
        if acknowledged_seconds is not None and window.start_seconds >= acknowledged_seconds:
            break
        if stall is None:
            stall = _Stall(window.start_seconds, acknowledged_seconds)
        reached = stall.add(window, bound_seconds)
        if reached is not None:
            stall.undecided_writes = _count_between(writes.undecided_seconds, stall.start_seconds, reached)
            if not stall.undecided_writes:
                break
    return stall


@dataclass
class _ProgressTally:
    """What became of each (heal, shard) pair, for the check's detail."""

    progressed: int = 0
    cut_short: int = 0
    leaderless: int = 0
    idle: int = 0
    stalled: int = 0

    def describe(self, heals: int, shards: int, samples: int, bound_seconds: float) -> str:
        return (
            f"{heals} heals x {shards} shards: {self.progressed} acknowledged a write within"
            f" {bound_seconds:g} s with a leader, {self.cut_short} were cut short by the run's end or a"
            f" lost leader, {self.leaderless} had no leader after the heal, {self.idle} saw no write"
            f" fail, {self.stalled} stalled; {samples} leadership samples"
        )


def check_progress_after_heal(
    operations: list[h.Operation],
    faults: list[FaultRecord],
    leadership: list[LeadershipSample],
    shard_for_account: Callable[[str], str],
    bound_seconds: float = PROGRESS_AFTER_HEAL_SECONDS_MAX,
) -> CheckResult:
    """For every healed fault and every shard: some write to the shard is acknowledged before
    it has had a leader for `bound_seconds` since the heal. Only time with a leader counts (a
    new election's is the election check's business); the run's end (its last operation)
    coming first says nothing, and neither does a span in which no write to the shard failed.
    The next fault does not stop the count: a shard whose leader it spares still has a majority
    and must go on committing (and faults come a few seconds apart, so a count they stopped
    would never reach the bound)."""
    result = CheckResult(
        "progress-after-heal",
        f"after every fault heals, each shard acknowledges a write before it has had a leader for"
        f" {bound_seconds:g} s",
    )
    writes = _writes_by_shard(operations, shard_for_account)
    shard_ids = sorted(set(writes) | {shard_id for sample in leadership for shard_id in sample.leaders})
    sample_seconds = [sample.at_seconds for sample in leadership]
    run_end_seconds = max((op.invoke_seconds for op in operations), default=0.0)
    heals = [fault for fault in faults if 0 < fault.healed_seconds < run_end_seconds]
    tally = _ProgressTally()
    for shard_id in shard_ids:
        tenures = _tenures(leadership, shard_id)
        shard_writes = writes.get(shard_id, _ShardWrites())
        reported_until = 0.0
        for fault in heals:
            if fault.healed_seconds < reported_until:
                tally.stalled += 1  # inside a stall already reported
                continue
            windows = _windows_after(fault.healed_seconds, tenures, sample_seconds, run_end_seconds)
            stall = _judge(fault.healed_seconds, windows, shard_writes, bound_seconds, tally)
            if stall is not None:
                reported_until = stall.end_seconds
                result.add(_describe_stall(shard_id, fault, stall))
    result.detail = tally.describe(len(heals), len(shard_ids), len(leadership), bound_seconds)
    if len(heals) < len(faults):
        result.detail += f"; {len(faults) - len(heals)} faults healed after the last operation"
    return result


def _judge(
    heal_seconds: float,
    windows: Iterator[_Window],
    writes: _ShardWrites,
    bound_seconds: float,
    tally: _ProgressTally,
) -> _Stall | None:
    """The stall after this heal, if the shard had a leader for the bound without
    acknowledging a write while writes to it failed."""
    acknowledged = _first_at_or_after(writes.acknowledged_seconds, heal_seconds)
    stall = _follow_leadership(windows, writes, acknowledged, bound_seconds)
    if stall is None or stall.bound_reached_seconds is None:
        if acknowledged is not None:
            tally.progressed += 1
        elif stall is None:
            tally.leaderless += 1
        else:
            tally.cut_short += 1
        return None
    if not stall.undecided_writes:
        tally.idle += 1
        return None
    tally.stalled += 1
    return stall


def _describe_stall(shard_id: str, fault: FaultRecord, stall: _Stall) -> str:
    first, last = stall.leaders[0], stall.leaders[-1]
    if first == last:
        leaders = f"{first.node_id} (term {first.term})"
    else:
        leaders = (
            f"{len(stall.leaders)} leaders in turn, from {first.node_id} (term {first.term}) to"
            f" {last.node_id} (term {last.term})"
        )
    if stall.next_acknowledged_seconds is None:
        until = f"none before {stall.end_seconds:.1f} s, when the run ended or the shard lost its leader"
    else:
        until = f"the next at {stall.next_acknowledged_seconds:.1f} s"
    return (
        f"{shard_id}: {fault.kind} at {fault.injected_seconds:.1f} s healed at {fault.healed_seconds:.1f} s;"
        f" from {stall.start_seconds:.1f} s the shard had a leader for {stall.led_seconds:.1f} s"
        f" ({leaders}) and acknowledged no write ({until}), while {stall.undecided_writes} writes to it"
        f" failed or stayed unknown"
    )
