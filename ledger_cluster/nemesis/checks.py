"""The checks of a nemesis run, as pure functions of the history, the final state read through
the gateway once the cluster healed, and what each replica holds.

Every transaction the workload writes has its request_id as description, so the final listing
says which logical write each stored transaction came from; an account created with a
request_id has an id derived from it, so even an account whose creation is unknown is looked up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ledger_cluster.nemesis import history as h
from ledger_cluster.nemesis.faults import FaultRecord, NemesisLog

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
