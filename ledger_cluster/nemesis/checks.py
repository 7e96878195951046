"""The checks of a nemesis run, as pure functions of the history, the final state read through
the gateway once the cluster healed, and what each replica holds.

Every transaction the workload writes has its request_id as description, so the final listing
says which logical write each stored transaction came from; an account created with a
request_id has an id derived from it, so even an account whose creation is unknown is looked up.

Transfers appear in the final state as their two legs, transactions with `transfer_id` set: the
debit leg (its id is the transfer id, its description the create-transfer's request_id) on the
debit account, the credit leg on the credit account. The checks of plain transactions skip legs;
the transfer checks pair each debit leg with its credit leg by transfer id.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ledger_cluster.backup import TransferCheck
from ledger_cluster.nemesis import history as h
from ledger_cluster.nemesis.faults import FaultRecord, NemesisLog
from ledger_cluster.nemesis.leadership import AcknowledgingTerm, LeadershipSample, ShardLeader

# Violations listed per check in the report (the count says how many there were).
VIOLATION_EXAMPLES_MAX = 10

SETTLED = "TRANSACTION_STATUS_SETTLED"
PENDING = "TRANSACTION_STATUS_PENDING"
CANCELLED = "TRANSACTION_STATUS_CANCELLED"
INSUFFICIENT_FUNDS = "TRANSACTION_STATUS_INSUFFICIENT_FUNDS"
EXPIRED = "TRANSACTION_STATUS_EXPIRED"
_TRANSFER_STATUS_PREFIX = "TRANSFER_STATUS_"
_TRANSACTION_STATUS_PREFIX = "TRANSACTION_STATUS_"
# Reasons with which a settle or cancel says the transaction or transfer expired first.
EXPIRED_REASONS = frozenset({"TRANSFER_EXPIRED", "TRANSACTION_EXPIRED"})
NANOS_PER_SECOND = 1_000_000_000
# Once the cluster healed, a pending transaction or transfer is expired at most this long after
# its deadline (or after the heal, for a deadline that passed during the faults), and a transfer
# whose call reached the cluster is whole (both legs, agreeing) this long after the heal.
EXPIRY_AFTER_HEAL_SECONDS_MAX = 10.0
TRANSFER_QUIET_AFTER_HEAL_SECONDS_MAX = 10.0


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
    """Every attempt (original and duplicates) of one create request_id (a transaction's or a
    transfer's)."""

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


def _logical_requests(operations: Iterable[h.Operation], kinds: Collection[str]) -> dict[str, _LogicalWrite]:
    writes: dict[str, _LogicalWrite] = {}
    for op in operations:
        if op.kind in kinds:
            writes.setdefault(op.request["request_id"], _LogicalWrite(op.request)).attempts.append(op)
    return writes


def _logical_writes(operations: Iterable[h.Operation]) -> dict[str, _LogicalWrite]:
    return _logical_requests(operations, h.TRANSACTION_WRITES)


def status_follows(earlier: str, later: str) -> bool:
    """Whether a transaction seen with status `earlier` may later have status `later`: only a
    pending one changes, and never into a refusal."""
    if earlier == PENDING:
        return later != INSUFFICIENT_FUNDS
    return earlier == later


def is_leg(transaction: dict[str, Any]) -> bool:
    return bool(transaction.get("transfer_id"))


def is_debit_leg(transaction: dict[str, Any]) -> bool:
    return is_leg(transaction) and transaction["id"] == transaction["transfer_id"]


def leg_status(transfer_status: str) -> str:
    """The status a transfer's legs have when the transfer has `transfer_status`."""
    return _TRANSACTION_STATUS_PREFIX + transfer_status.removeprefix(_TRANSFER_STATUS_PREFIX)


def settled_amount(transaction: dict[str, Any]) -> int:
    """What a transaction moved in the end (signed): its settled amount once SETTLED (all of
    it when the view has no settled amount), else nothing."""
    if transaction["status"] != SETTLED:
        return 0
    return int(transaction.get("settled_amount") or transaction["amount"])


def _listed(final: FinalState) -> dict[str, list[dict[str, Any]]]:
    """request_id (description) -> every stored transaction carrying it, transfer legs aside."""
    by_description: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for state in final.values():
        for transaction in state.transactions:
            if not is_leg(transaction):
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


ACCOUNT_TOTALS = ("credits_settled", "debits_settled", "credits_pending", "debits_pending")


def _replayed_totals(transactions: list[dict[str, Any]]) -> dict[str, int]:
    """The account totals API.md's rules give for these final statuses and settled amounts."""
    totals = dict.fromkeys(ACCOUNT_TOTALS, 0)
    for transaction in transactions:
        moved = settled_amount(transaction)
        if moved > 0:
            totals["credits_settled"] += moved
        else:
            totals["debits_settled"] -= moved
        if transaction["status"] == PENDING:
            amount = transaction["amount"]
            totals["credits_pending" if amount > 0 else "debits_pending"] += abs(amount)
    return totals


def _replayed_balances(transactions: list[dict[str, Any]]) -> tuple[int, int]:
    """(available, settled) that API.md's rules give for these final statuses."""
    totals = _replayed_totals(transactions)
    settled = totals["credits_settled"] - totals["debits_settled"]
    return settled - totals["debits_pending"], settled


def overdraft_limit(account: dict[str, Any]) -> int:
    return int(account.get("overdraft_limit", 0))


def _created_settled(operations: list[h.Operation], final: FinalState) -> set[str]:
    """Ids of the stored transactions (and transfer legs) whose create asked for settled."""
    settled_requests = {
        op.request["request_id"]
        for op in operations
        if op.kind in (*h.TRANSACTION_WRITES, *h.TRANSFER_WRITES) and op.request["settled"]
    }
    created: set[str] = set()
    settled_transfers: set[str] = set()
    credit_legs: list[dict[str, Any]] = []
    for state in final.values():
        for transaction in state.transactions:
            if is_leg(transaction) and not is_debit_leg(transaction):
                credit_legs.append(transaction)
            elif transaction["description"] in settled_requests:
                created.add(transaction["id"])
                if is_debit_leg(transaction):
                    settled_transfers.add(transaction["id"])
    created.update(leg["id"] for leg in credit_legs if leg["transfer_id"] in settled_transfers)
    return created


def check_balances(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "balances-replay",
        "each account's stored balances and totals (credits/debits, settled/pending) equal the"
        " replay of its transactions and transfer legs; no purchase or transfer debit was accepted"
        " without the funds (down to the overdraft limit), none refused that surely had them",
    )
    created_settled = _created_settled(operations, final)
    for account_id, state in sorted(final.items()):
        if state.account is None:
            continue
        available, settled = _replayed_balances(state.transactions)
        stored = (state.account["available_balance"], state.account["settled_balance"])
        if stored != (available, settled):
            result.add(
                f"account {account_id}: stored (available, settled) {stored}, replayed {(available, settled)}"
            )
        if all(key in state.account for key in ACCOUNT_TOTALS):
            totals = _replayed_totals(state.transactions)
            stored_totals = {key: state.account[key] for key in ACCOUNT_TOTALS}
            if stored_totals != totals:
                result.add(f"account {account_id}: stored totals {stored_totals}, replayed {totals}")
        _check_purchase_decisions(
            account_id, state.transactions, created_settled, overdraft_limit(state.account), result
        )
    return result


def _check_purchase_decisions(
    account_id: str,
    transactions: list[dict[str, Any]],
    created_settled: set[str],
    limit: int,
    result: CheckResult,
) -> None:
    """Bounds on the available balance just before each purchase (or transfer debit), from the
    transactions applied before it: at most every credit that ended settled minus every debit
    still holding or settled (what it settled); at least the credits created settled minus
    every debit that was accepted (all of it). A debit may take it down to -limit."""
    upper = 0
    lower = 0
    for transaction in transactions:
        amount = transaction["amount"]
        status = transaction["status"]
        if amount < 0:
            if status != INSUFFICIENT_FUNDS and upper + amount < -limit:
                result.add(
                    f"account {account_id}: purchase {transaction['id']} ({amount}) accepted with at"
                    f" most {upper} available (overdraft limit {limit})"
                )
            if status == INSUFFICIENT_FUNDS and lower + amount >= -limit:
                result.add(
                    f"account {account_id}: purchase {transaction['id']} ({amount}) refused with at"
                    f" least {lower} available (overdraft limit {limit})"
                )
            upper += amount if status == PENDING else settled_amount(transaction)
            if status != INSUFFICIENT_FUNDS:
                lower += amount
        else:
            upper += settled_amount(transaction)
            if transaction["id"] in created_settled:
                lower += amount


def check_overdraft_limits(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "available-within-overdraft",
        "no account's available balance, in the final state or in any read, is below minus its"
        " overdraft limit; the settled balance is never below the available one; every account"
        " has the overdraft limit it was created with",
    )
    for account_id, state in sorted(final.items()):
        account = state.account
        if account is None:
            continue
        limit = overdraft_limit(account)
        if account["available_balance"] < -limit:
            result.add(
                f"account {account_id}: negative balance {account['available_balance']} beyond -{limit}"
            )
        if account["settled_balance"] < account["available_balance"]:
            result.add(f"account {account_id}: settled balance below the available one: {account}")
    for op in operations:
        if op.outcome != h.OUTCOME_OK:
            continue
        if op.kind == h.GET_ACCOUNT:
            read = op.result["account"]
            found = final.get(read["id"])
            limit = overdraft_limit(found.account if found and found.account else read)
            if read["available_balance"] < -limit:
                result.add(f"op {op.op_id} read a negative balance beyond -{limit}: {read}")
        elif op.kind == h.CREATE_ACCOUNT and "overdraft_limit" in op.request:
            found = final.get(op.result["account"]["id"])
            if found and found.account and overdraft_limit(found.account) != op.request["overdraft_limit"]:
                result.add(
                    f"account {found.account['id']} created with overdraft limit"
                    f" {op.request['overdraft_limit']} has {overdraft_limit(found.account)}"
                )
    return result


# -- transfers ---------------------------------------------------------------------------------


@dataclass
class _StoredTransfers:
    """The transfer legs of a final state: debit legs by transfer id and by description (the
    create-transfer's request_id), credit legs by the transfer id they name."""

    debits: dict[str, dict[str, Any]] = field(default_factory=dict)
    debits_by_description: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    credits: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, final: FinalState) -> _StoredTransfers:
        stored = cls()
        for state in final.values():
            for transaction in state.transactions:
                if is_debit_leg(transaction):
                    stored.debits[transaction["id"]] = transaction
                    stored.debits_by_description[transaction["description"]].append(transaction)
                elif is_leg(transaction):
                    stored.credits[transaction["transfer_id"]].append(transaction)
        return stored


def _logical_transfers(operations: Iterable[h.Operation]) -> dict[str, _LogicalWrite]:
    return _logical_requests(operations, h.TRANSFER_WRITES)


def leg_disagreement(debit: dict[str, Any], credits: list[dict[str, Any]]) -> str | None:
    """What is wrong between a transfer's debit leg and the credit legs that name it (None when
    they are one whole transfer): a transfer refused for funds has no credit leg; any other has
    exactly one, on the debit leg's counterparty account, naming the debit account back, for
    the negated amount, with the same status and the negated settled amount."""
    transfer = f"transfer {debit['id']} ({debit['status']}, {debit['amount']})"
    if debit["status"] == INSUFFICIENT_FUNDS:
        return (
            f"{transfer} was refused for funds yet has credit legs {[c['id'] for c in credits]}"
            if credits
            else None
        )
    if not credits:
        return (
            f"{transfer} has its debit leg on {debit['account_id']} but no credit leg on"
            f" {debit['counterparty_account_id']}"
        )
    if len(credits) > 1:
        return f"{transfer} has {len(credits)} credit legs: {[c['id'] for c in credits]}"
    credit = credits[0]
    wanted = {
        "account_id": debit["counterparty_account_id"],
        "counterparty_account_id": debit["account_id"],
        "amount": -debit["amount"],
        "status": debit["status"],
        "settled_amount": -debit.get("settled_amount", 0),
    }
    differing = {
        key: (credit.get(key), value) for key, value in wanted.items() if credit.get(key, 0) != value
    }
    if debit["amount"] >= 0:
        differing["debit amount"] = (debit["amount"], "< 0")
    if differing:
        return f"{transfer}: its credit leg {credit['id']} disagrees (stored, wanted): {differing}"
    return None


def unquiet_accounts(final: FinalState) -> set[str]:
    """Accounts whose state may still change once the workload stopped: both sides of a transfer
    whose legs are not (yet) one whole transfer, and the accounts of anything pending with a
    deadline. The runner re-reads them until this is empty or its wait ends."""
    stored = _StoredTransfers.of(final)
    accounts: set[str] = set()
    for transfer_id, debit in stored.debits.items():
        if leg_disagreement(debit, stored.credits.get(transfer_id, [])) is not None:
            accounts.update((debit["account_id"], debit["counterparty_account_id"]))
    for transfer_id, credits in stored.credits.items():
        if transfer_id not in stored.debits:
            accounts.update(credit["account_id"] for credit in credits)
            accounts.add(transfer_id[:16])
    for state in final.values():
        for transaction in state.transactions:
            if transaction["status"] == PENDING and transaction.get("expires_at"):
                accounts.add(transaction["account_id"])
                if is_leg(transaction):
                    accounts.add(transaction["counterparty_account_id"])
    return {account for account in accounts if account}


def check_transfer_legs(final: FinalState) -> CheckResult:
    result = CheckResult(
        "transfer-legs-whole",
        "once the healed cluster is quiet, every transfer is whole: its debit leg has exactly one"
        " credit leg on the other account with the negated amount, the same status and the negated"
        " settled amount, linked both ways; no credit leg lacks its debit leg; a transfer refused"
        " for funds has no credit leg",
    )
    stored = _StoredTransfers.of(final)
    for transfer_id, debit in sorted(stored.debits.items()):
        problem = leg_disagreement(debit, stored.credits.get(transfer_id, []))
        if problem is not None:
            result.add(problem)
    for transfer_id, credits in sorted(stored.credits.items()):
        if transfer_id not in stored.debits:
            result.add(
                f"credit legs {[c['id'] for c in credits]} of transfer {transfer_id},"
                " whose debit leg is not stored"
            )
    credit_legs = sum(len(credits) for credits in stored.credits.values())
    result.detail = f"{len(stored.debits)} debit legs, {credit_legs} credit legs"
    return result


def check_acknowledged_transfers(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "acknowledged-transfers-exactly-once",
        "every acknowledged create-transfer is stored exactly once, as acknowledged: one debit leg"
        " (the acknowledged transfer id) on the debit account for minus the amount, its credit leg"
        " (the acknowledged credit transaction id) on the credit account, a status that follows the"
        " acknowledged one, its deadline created_at + timeout_seconds",
    )
    stored = _StoredTransfers.of(final)
    for request_id, transfer in sorted(_logical_transfers(operations).items()):
        acknowledged = transfer.acknowledged
        if not acknowledged:
            continue
        answers = {op.result["transfer"]["id"] for op in acknowledged}
        debits = stored.debits_by_description.get(request_id, [])
        if len(debits) != 1:
            result.add(
                f"transfer {request_id} acknowledged as {sorted(answers)} is stored {len(debits)} times"
            )
        elif len(answers) != 1 or debits[0]["id"] not in answers:
            result.add(
                f"transfer {request_id} acknowledged as {sorted(answers)}, stored as {debits[0]['id']}"
            )
        else:
            for problem in _acknowledged_transfer_problems(transfer, debits[0], stored):
                result.add(f"transfer {request_id} ({debits[0]['id']}): {problem}")
    return result


def _acknowledged_transfer_problems(
    transfer: _LogicalWrite, debit: dict[str, Any], stored: _StoredTransfers
) -> Iterator[str]:
    request = transfer.request
    if (debit["account_id"], debit["counterparty_account_id"], debit["amount"]) != (
        request["debit_account_id"],
        request["credit_account_id"],
        -request["amount"],
    ):
        yield f"asked {request}, its debit leg is {debit}"
    if request["settled"] and debit["status"] not in (SETTLED, INSUFFICIENT_FUNDS):
        yield f"created settled, stored {debit['status']}"
    credits = stored.credits.get(debit["id"], [])
    if debit["status"] != INSUFFICIENT_FUNDS and len(credits) != 1:
        yield f"{len(credits)} credit legs on {request['credit_account_id']}"
    for op in transfer.acknowledged:
        answer = op.result["transfer"]
        if not status_follows(leg_status(answer["status"]), debit["status"]):
            yield f"acknowledged {answer['status']}, stored {debit['status']}"
        credit_id = answer.get("credit_transaction_id")
        if credit_id and len(credits) == 1 and credits[0]["id"] != credit_id:
            yield f"acknowledged with credit leg {credit_id}, stored {credits[0]['id']}"
    # A transfer refused for funds never gets a deadline.
    timeout = request.get("timeout_seconds", 0) if debit["status"] != INSUFFICIENT_FUNDS else 0
    if "expires_at" in debit and "created_at" in debit:
        wanted = debit["created_at"] + timeout * NANOS_PER_SECOND if timeout else 0
        if debit["expires_at"] != wanted:
            yield f"timeout {timeout} s, created_at {debit['created_at']}, expires_at {debit['expires_at']}"


def check_unacknowledged_transfers(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "unacknowledged-transfers",
        "a create-transfer with an unknown outcome is stored at most once (and, by the legs check,"
        " never half); one that failed with a definite code is not stored; no transfer is stored"
        " that no client asked for; a pending transfer is settled, cancelled or expired only if a"
        " settle, a cancel or its timeout could have done it",
    )
    stored = _StoredTransfers.of(final)
    transfers = _logical_transfers(operations)
    unknown = applied = 0
    for request_id, transfer in sorted(transfers.items()):
        if transfer.acknowledged:
            continue
        count = len(stored.debits_by_description.get(request_id, []))
        if transfer.unknown:
            unknown += 1
            applied += count > 0
            if count > 1:
                result.add(f"transfer {request_id} of unknown outcome is stored {count} times")
        elif count:
            codes = sorted({f"{op.code}/{op.reason}" for op in transfer.attempts})
            result.add(f"transfer {request_id} failed with {codes} yet is stored {count} times")
    for description, debits in sorted(stored.debits_by_description.items()):
        if description not in transfers:
            result.add(f"stored transfers {[d['id'] for d in debits]} match no request ({description!r})")
    _check_unrequested_transfer_finishes(operations, stored, transfers, result)
    result.detail = f"{unknown} transfers of unknown outcome, {applied} of them applied"
    return result


def _check_unrequested_transfer_finishes(
    operations: list[h.Operation],
    stored: _StoredTransfers,
    transfers: dict[str, _LogicalWrite],
    result: CheckResult,
) -> None:
    may_have: dict[str, set[str]] = defaultdict(set)
    for op in operations:
        if op.kind in h.TRANSFER_FINISHES and op.outcome != h.OUTCOME_FAILED:
            may_have[op.kind].add(op.request["transfer_id"])
    finishing = {SETTLED: h.SETTLE_TRANSFER, CANCELLED: h.CANCEL_TRANSFER}
    for transfer_id, debit in sorted(stored.debits.items()):
        transfer = transfers.get(debit["description"])
        if transfer is None or transfer.request["settled"]:
            continue
        status = debit["status"]
        if status in finishing and transfer_id not in may_have[finishing[status]]:
            result.add(f"transfer {transfer_id} created pending is {status} without any {finishing[status]}")
        if status == EXPIRED and not transfer.request.get("timeout_seconds"):
            result.add(f"transfer {transfer_id} created pending without a timeout is {status}")


def check_transfer_finishes(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "transfer-settles-and-cancels-hold",
        "an acknowledged settle-transfer answered SETTLED with the amount asked (all of it for 0)"
        " and both legs end SETTLED with that settled amount; an acknowledged cancel-transfer"
        " leaves both CANCELLED; a settle or cancel refused as expired leaves both EXPIRED; one"
        " refused as no longer pending never finds it pending at the end",
    )
    stored = _StoredTransfers.of(final)
    checked = 0
    for op in operations:
        if op.kind not in h.TRANSFER_FINISHES or op.outcome == h.OUTCOME_UNKNOWN:
            continue
        transfer_id = op.request["transfer_id"]
        debit = stored.debits.get(transfer_id)
        if debit is None:
            if op.outcome == h.OUTCOME_OK:
                result.add(f"{op.kind} of {transfer_id} acknowledged, but the transfer is not stored")
            continue
        checked += 1
        for problem in _finish_problems(op, debit, stored.credits.get(transfer_id, [])):
            result.add(f"op {op.op_id} {op.kind} of {transfer_id}: {problem}")
    result.detail = f"{checked} settles and cancels checked"
    return result


def _finish_problems(op: h.Operation, debit: dict[str, Any], credits: list[dict[str, Any]]) -> Iterator[str]:
    legs = [debit, *credits]
    if op.outcome == h.OUTCOME_FAILED:
        if op.reason in EXPIRED_REASONS and debit["status"] != EXPIRED:
            yield f"refused with {op.reason}, stored {debit['status']}"
        elif op.code == "FAILED_PRECONDITION" and debit["status"] == PENDING:
            yield f"refused with {op.reason} (not pending), yet stored PENDING"
        return
    answer = op.result["transfer"]
    if op.kind == h.CANCEL_TRANSFER:
        if answer["status"] != "TRANSFER_STATUS_CANCELLED":
            yield f"acknowledged {answer['status']}"
        for leg in legs:
            if leg["status"] != CANCELLED:
                yield f"acknowledged, but leg {leg['id']} is stored {leg['status']}"
        return
    asked = op.request.get("amount", 0)
    answered = abs(answer["settled_amount"])
    if answer["status"] != "TRANSFER_STATUS_SETTLED":
        yield f"acknowledged {answer['status']}"
    if (asked and answered != asked) or not 0 < answered <= op.request.get("transfer_amount", answered):
        yield f"asked to settle {asked or 'all'}, answered settled_amount {answer['settled_amount']}"
    for leg in legs:
        sign = 1 if leg["amount"] > 0 else -1
        if leg["status"] != SETTLED or leg.get("settled_amount", sign * answered) != sign * answered:
            yield (
                f"acknowledged settled {answered}, but leg {leg['id']} is stored {leg['status']}"
                f" settled {leg.get('settled_amount')}"
            )


def check_conservation(final: FinalState) -> CheckResult:
    result = CheckResult(
        "conservation",
        "transfers create no money: the settled amounts of all transfer legs sum to zero (and so"
        " do the amounts of pending legs), so the sum of all settled balances equals the sum of"
        " what settled top-ups and purchases moved; each account's settled balance is"
        " credits_settled - debits_settled",
    )
    balances = outside = legs_settled = legs_pending = 0
    for account_id, state in sorted(final.items()):
        if state.account is None:
            continue
        balances += state.account["settled_balance"]
        if "credits_settled" in state.account:
            totals = state.account["credits_settled"] - state.account["debits_settled"]
            if totals != state.account["settled_balance"]:
                result.add(f"account {account_id}: settled balance is not credits - debits: {state.account}")
        for transaction in state.transactions:
            if is_leg(transaction):
                legs_settled += settled_amount(transaction)
                legs_pending += transaction["amount"] if transaction["status"] == PENDING else 0
            else:
                outside += settled_amount(transaction)
    if legs_settled:
        result.add(f"the settled amounts of transfer legs sum to {legs_settled}, not 0")
    if legs_pending:
        result.add(f"the amounts of pending transfer legs sum to {legs_pending}, not 0")
    if balances != outside:
        result.add(f"settled balances sum to {balances}; settled top-ups and purchases moved {outside}")
    result.detail = f"settled balances sum to {balances}"
    return result


def check_expiry(
    final: FinalState,
    read_unix_ns: int,
    healed_unix_ns: int,
    bound_seconds: float = EXPIRY_AFTER_HEAL_SECONDS_MAX,
) -> CheckResult:
    """`read_unix_ns`: when the final read started; `healed_unix_ns`: when the nemesis had
    healed the cluster (both wall clock, like the gateway's stamps)."""
    result = CheckResult(
        "expiry-in-time",
        f"nothing is pending more than {bound_seconds:g} s past its deadline (or past the heal, for"
        " a deadline during the faults); nothing expired before its deadline; no transaction or"
        " transfer with a deadline was settled or cancelled at or after it",
    )
    bound_ns = int(bound_seconds * NANOS_PER_SECOND)
    expired = 0
    for state in final.values():
        for transaction in state.transactions:
            if is_leg(transaction) and not is_debit_leg(transaction):
                continue  # a credit leg follows its debit leg (the legs check)
            deadline = transaction.get("expires_at", 0)
            status = transaction["status"]
            expired += status == EXPIRED
            if not deadline:
                if status == EXPIRED:
                    result.add(f"{transaction['id']} expired without a deadline")
                continue
            due = max(deadline, healed_unix_ns) + bound_ns
            if status == PENDING and read_unix_ns > due:
                late = (read_unix_ns - deadline) / NANOS_PER_SECOND
                result.add(f"{transaction['id']} still pending {late:.1f} s after its deadline")
            elif status == EXPIRED and transaction["updated_at"] < deadline:
                result.add(f"{transaction['id']} expired {deadline - transaction['updated_at']} ns early")
            elif status == EXPIRED and transaction["updated_at"] > due:
                late = (transaction["updated_at"] - deadline) / NANOS_PER_SECOND
                result.add(f"{transaction['id']} expired {late:.1f} s after its deadline, after the heal")
            elif status in (SETTLED, CANCELLED) and transaction["updated_at"] >= deadline:
                result.add(
                    f"{transaction['id']} {status} at {transaction['updated_at']}, deadline {deadline}"
                )
    result.detail = f"{expired} expired"
    return result


def check_replica_transfer_summaries(final: FinalState, summary: TransferCheck) -> CheckResult:
    """`summary`: the transfer summaries of one replica of each shard, summed across shards as
    `ledger-dev verify` sums them, once the final state was quiet."""
    result = CheckResult(
        "transfers-verified-on-replicas",
        "the replicas' own transfer summaries meet across shards (every leg tuple matched, nothing"
        " left owing a credit shard, settled and pending legs summing to zero per currency) and"
        " count as many debit and credit legs as the final read through the gateway listed",
    )
    for failure in summary.failures:
        result.add(failure)
    stored = _StoredTransfers.of(final)
    listed_debits = sum(1 for debit in stored.debits.values() if debit["status"] != INSUFFICIENT_FUNDS)
    listed_credits = sum(len(credits) for credits in stored.credits.values())
    if (summary.debit_legs, summary.credit_legs) != (listed_debits, listed_credits):
        result.add(
            f"the replicas hold {summary.debit_legs} debit and {summary.credit_legs} credit legs of"
            f" transfers not refused; the gateway listed {listed_debits} and {listed_credits}"
        )
    result.detail = (
        f"{summary.debit_legs} debit legs, {summary.credit_legs} credit legs, {summary.unfinished} unfinished"
    )
    return result


# -- reads -------------------------------------------------------------------------------------


@dataclass
class _Acknowledged:
    """When each transaction (transfer legs included) was first acknowledged as existing, and as
    settled, cancelled or expired."""

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
                acknowledged.finish(transaction["id"], op.complete_seconds, transaction["status"])
            elif op.kind == h.CREATE_ACCOUNT:
                _earliest(acknowledged.accounts, op.result["account"]["id"], op.complete_seconds)
            elif op.kind in h.TRANSFER_WRITES:
                acknowledged.create_transfer(op.result["transfer"], op.complete_seconds)
            elif op.kind in h.TRANSFER_FINISHES:
                transfer = op.result["transfer"]
                for leg in _acknowledged_legs(transfer):
                    acknowledged.finish(leg, op.complete_seconds, leg_status(transfer["status"]))
        return acknowledged

    def finish(self, transaction_id: str, moment: float, status: str) -> None:
        previous = self.finished.get(transaction_id)
        if previous is None or moment < previous[0]:
            self.finished[transaction_id] = (moment, status)

    def create_transfer(self, transfer: dict[str, Any], moment: float) -> None:
        """Both legs exist from the first acknowledgement on, with its status; a later one (a
        duplicate answers the transfer's end) that shows it finished counts as a finish."""
        status = leg_status(transfer["status"])
        for leg in _acknowledged_legs(transfer):
            if leg not in self.created or moment < self.created[leg]:
                self.created[leg] = moment
                self.created_status[leg] = status
            if status != PENDING:
                self.finish(leg, moment, status)


def _acknowledged_legs(transfer: dict[str, Any]) -> list[str]:
    """The ids of the legs an acknowledged transfer has: its debit leg, and its credit leg
    unless it was refused for funds."""
    legs = [transfer.get("debit_transaction_id") or transfer["id"]]
    if leg_status(transfer["status"]) != INSUFFICIENT_FUNDS and transfer.get("credit_transaction_id"):
        legs.append(transfer["credit_transaction_id"])
    return legs


def _earliest(moments: dict[str, float], key: str, moment: float) -> None:
    moments[key] = min(moment, moments.get(key, moment))


def check_consistent_reads(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "consistent-reads-see-acknowledged-writes",
        "a consistent read shows every write acknowledged before the read started (both legs of"
        " an acknowledged transfer, each in its account's listing)",
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
        elif op.kind == h.GET_TRANSFER:
            checked += 1
            transfer_id = op.request["transfer_id"]
            seen = (
                {transfer_id: {"status": leg_status(op.result["transfer"]["status"])}}
                if op.outcome == h.OUTCOME_OK
                else {}
            )
            _check_seen(
                op, transaction_ids=[transfer_id], seen=seen, acknowledged=acknowledged, result=result
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


@dataclass
class _SettledWindow:
    """When a stored SETTLED transaction's settled amount may first show in a read: not before
    the earliest write that could have settled it was invoked (its create, a duplicate, a settle
    of it or of its transfer), and surely once one that did was acknowledged."""

    transaction_id: str
    total: str  # "credits_settled" or "debits_settled"
    amount: int
    possible_seconds: float
    acknowledged_seconds: float | None


def _settled_windows(
    operations: list[h.Operation], final: FinalState, acknowledged: _Acknowledged
) -> dict[str, list[_SettledWindow]]:
    """account id -> the window of every SETTLED transaction (transfer legs included) it holds."""
    first_invoke: dict[str, float] = {}
    for op in operations:
        if op.kind in h.WRITES:
            for key in ("request_id", "transaction_id", "transfer_id"):
                if key in op.request:
                    _earliest(first_invoke, f"{key}:{op.request[key]}", op.invoke_seconds)
    stored = _transactions_by_id(final)
    windows: dict[str, list[_SettledWindow]] = defaultdict(list)
    for state in final.values():
        for transaction in state.transactions:
            moved = settled_amount(transaction)
            if not moved:
                continue
            # A credit leg carries no request_id of its own: its debit leg's description is the
            # create-transfer's.
            creator = stored.get(transaction.get("transfer_id") or transaction["id"], transaction)
            keys = [
                f"request_id:{creator['description']}",
                f"transaction_id:{transaction['id']}",
                f"transfer_id:{transaction.get('transfer_id')}",
            ]
            settled_at = (
                [acknowledged.created[transaction["id"]]]
                if (acknowledged.created_status.get(transaction["id"]) == SETTLED)
                else []
            )
            finished = acknowledged.finished.get(transaction["id"])
            if finished is not None and finished[1] == SETTLED:
                settled_at.append(finished[0])
            windows[transaction["account_id"]].append(
                _SettledWindow(
                    transaction_id=transaction["id"],
                    total="credits_settled" if moved > 0 else "debits_settled",
                    amount=abs(moved),
                    possible_seconds=min((first_invoke[k] for k in keys if k in first_invoke), default=0.0),
                    acknowledged_seconds=min(settled_at, default=None),
                )
            )
    return windows


def check_linearizable_account_reads(operations: list[h.Operation], final: FinalState) -> CheckResult:
    """Settled totals only grow, so a consistent read of an account brackets them: at least
    what was acknowledged settled before the read was invoked (a deposed leader's stale answer
    falls short), at most what could have been settled by writes invoked before it completed
    (a read never shows the future)."""
    result = CheckResult(
        "consistent-reads-linearizable",
        "each consistent account read shows settled credit and debit totals between those of every"
        " settle acknowledged before the read was invoked and those of every write invoked before it"
        " completed; a consistent listing shows no transaction created or settled by a write invoked"
        " after it completed",
    )
    acknowledged = _Acknowledged.of(operations)
    windows = _settled_windows(operations, final, acknowledged)
    checked = 0
    for op in operations:
        if not op.request.get("consistent") or op.outcome != h.OUTCOME_OK:
            continue
        if op.kind == h.GET_ACCOUNT:
            checked += 1
            _check_account_read(op, windows.get(op.request["account_id"], []), result)
        elif op.kind == h.LIST_TRANSACTIONS:
            checked += 1
            by_id = {window.transaction_id: window for window in windows.get(op.request["account_id"], [])}
            for shown in op.result["transactions"]:
                window = by_id.get(shown["id"])
                if (
                    shown["status"] == SETTLED
                    and window is not None
                    and window.possible_seconds > op.complete_seconds
                ):
                    result.add(
                        f"op {op.op_id} ({op.kind} {op.invoke_seconds:.3f}-{op.complete_seconds:.3f} s) shows"
                        f" {shown['id']} settled; no write that could settle it was invoked before"
                        f" {window.possible_seconds:.3f} s"
                    )
    result.detail = f"{checked} consistent account reads and listings checked"
    return result


def _check_account_read(op: h.Operation, windows: list[_SettledWindow], result: CheckResult) -> None:
    shown = op.result["account"]
    for total in ("credits_settled", "debits_settled"):
        lowest = sum(
            w.amount
            for w in windows
            if w.total == total
            and w.acknowledged_seconds is not None
            and w.acknowledged_seconds < op.invoke_seconds
        )
        highest = sum(
            w.amount for w in windows if w.total == total and w.possible_seconds < op.complete_seconds
        )
        value = int(shown.get(total, 0))
        if not lowest <= value <= highest:
            result.add(
                f"op {op.op_id} ({op.kind} of {op.request['account_id']} {op.invoke_seconds:.3f}-"
                f"{op.complete_seconds:.3f} s) shows {total} {value}; linearizable is {lowest}..{highest}"
                + (" (stale: settles acknowledged before it are missing)" if value < lowest else "")
            )


def check_reads_never_show_lost_writes(operations: list[h.Operation], final: FinalState) -> CheckResult:
    result = CheckResult(
        "reads-never-show-lost-writes",
        "whatever a successful read showed (consistent or not) is in the final state: the"
        " transaction or transfer itself, and any settled, cancelled, expired or refused status",
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
            continue
        if op.kind == h.GET_TRANSFER:
            _check_transfer_read(op, stored, result)
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


def _check_transfer_read(op: h.Operation, stored: dict[str, dict[str, Any]], result: CheckResult) -> None:
    transfer = op.result["transfer"]
    debit_leg = stored.get(transfer["id"])
    if debit_leg is None or not is_debit_leg(debit_leg):
        result.add(
            f"op {op.op_id} ({op.kind}) showed transfer {transfer['id']}, whose debit leg is not stored"
        )
        return
    same = debit_leg["amount"] == -transfer["amount"] and debit_leg["description"] == transfer["description"]
    if not (same and status_follows(leg_status(transfer["status"]), debit_leg["status"])):
        result.add(f"op {op.op_id} ({op.kind}) showed {transfer}, its debit leg is stored as {debit_leg}")


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


def check_one_leader_per_term(acknowledgements: list[AcknowledgingTerm]) -> CheckResult:
    """Raft's election safety as the nodes acted on it: a term has one leader, so two replicas
    of a shard acknowledging writes in one term means two leaders took writes at once."""
    result = CheckResult(
        "one-leader-per-term",
        "no two replicas of a shard acknowledged writes as leader in the same term (from the nodes'"
        " own log of the first acknowledgement of each term)",
    )
    nodes: dict[tuple[str, int], set[str]] = defaultdict(set)
    for acknowledgement in acknowledgements:
        nodes[acknowledgement.shard_id, acknowledgement.term].add(acknowledgement.node_id)
    for (shard_id, term), leaders in sorted(nodes.items()):
        if len(leaders) > 1:
            result.add(f"shard {shard_id}, term {term}: {', '.join(sorted(leaders))} all acknowledged writes")
    result.detail = f"{len(nodes)} leader terms that acknowledged writes"
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
