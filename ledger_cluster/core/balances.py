"""What one transaction adds to its account's four totals, and the checks every account meets.
Shared by the apply path (which moves totals) and verification (which recomputes them)."""

from __future__ import annotations

from ledger_cluster.core.records import PENDING, SETTLED, AccountRecord, TransactionRecord
from ledger_cluster.errors import InvariantViolationError
from ledger_cluster.limits import INT64_MAX

# (credits settled, debits settled, credits pending, debits pending)
Totals = tuple[int, int, int, int]
NO_TOTALS: Totals = (0, 0, 0, 0)


def require_invariant(condition: bool, message: str) -> None:
    """Like assert, but survives `python -O`: a broken invariant stops the replica."""
    if not condition:
        raise InvariantViolationError(message)


def contribution_of(status: int, amount: int, settled_amount: int) -> Totals:
    """A settled transaction counts its settled amount; a pending one holds its whole amount."""
    if status == SETTLED:
        return (settled_amount, 0, 0, 0) if settled_amount > 0 else (0, -settled_amount, 0, 0)
    if status == PENDING:
        return (0, 0, amount, 0) if amount > 0 else (0, 0, 0, -amount)
    return NO_TOTALS


def contribution(record: TransactionRecord | None) -> Totals:
    if record is None:
        return NO_TOTALS
    return contribution_of(record.status, record.amount, record.settled_amount)


def totals_of(account: AccountRecord) -> Totals:
    return (account.credits_settled, account.debits_settled, account.credits_pending, account.debits_pending)


def add_totals(left: Totals, right: Totals) -> Totals:
    return (left[0] + right[0], left[1] + right[1], left[2] + right[2], left[3] + right[3])


def subtract_totals(left: Totals, right: Totals) -> Totals:
    return (left[0] - right[0], left[1] - right[1], left[2] - right[2], left[3] - right[3])


def is_refused(account: AccountRecord, amount: int) -> bool:
    """A debit of `amount` (< 0) that would take the available balance below the overdraft limit:
    a purchase or a transfer is then recorded as refused for funds."""
    return amount < 0 and account.available_balance + amount < -account.overdraft_limit


def credit_overflows(account: AccountRecord, amount: int) -> bool:
    """A credit of `amount` (> 0) counts against the settled balance and the lifetime credits,
    pending ones included, so settling it later can never overflow."""
    headroom = INT64_MAX - amount - account.credits_pending
    return account.settled_balance > headroom or account.credits_settled > headroom


def debit_overflows(account: AccountRecord, amount: int) -> bool:
    """A debit of `amount` (> 0) that would be taken counts against the lifetime debits."""
    return account.debits_settled + account.debits_pending + amount > INT64_MAX


def account_problems(account: AccountRecord) -> list[str]:
    """Every limit an account's stored totals must meet; empty when it meets them all."""
    where = f"account {account.account_id:016x}"
    problems = []
    if min(totals_of(account)) < 0:
        problems.append(f"{where}: a total is negative {totals_of(account)}")
    if max(totals_of(account)) > INT64_MAX:
        problems.append(f"{where}: a total leaves int64 {totals_of(account)}")
    if account.overdraft_limit < 0:
        problems.append(f"{where}: overdraft limit {account.overdraft_limit} is negative")
    if account.available_balance < -account.overdraft_limit:
        problems.append(
            f"{where}: available balance {account.available_balance} is below the overdraft limit"
            f" {account.overdraft_limit}"
        )
    if account.settled_balance + account.credits_pending > INT64_MAX:
        problems.append(f"{where}: settled balance plus pending credits leave int64")
    return problems


def check_account(account: AccountRecord) -> None:
    """`account_problems`, with the common case (none) decided without building any message:
    every touched account of every entry is checked on every replica."""
    credits_settled, debits_settled = account.credits_settled, account.debits_settled
    credits_pending, debits_pending = account.credits_pending, account.debits_pending
    settled = credits_settled - debits_settled
    if (
        0 <= credits_settled <= INT64_MAX
        and 0 <= debits_settled <= INT64_MAX
        and 0 <= credits_pending <= INT64_MAX
        and 0 <= debits_pending <= INT64_MAX
        and account.overdraft_limit >= 0
        and settled - debits_pending >= -account.overdraft_limit
        and settled + credits_pending <= INT64_MAX
    ):
        return
    problems = account_problems(account)
    require_invariant(not problems, "; ".join(problems))
