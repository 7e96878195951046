"""The fault-injection suite (issue 5).

The checks are pure functions of a history and a final state, so each is shown to fail on a
small hand-written history that breaks exactly its promise, and to pass on the same history
without the break. Then one seeded nemesis run against a real cluster: real node processes
killed, paused, wiped and re-led under load, every check passing. CI runs it for
NEMESIS_CI_SECONDS; set LEDGER_NEMESIS_SECONDS (and LEDGER_NEMESIS_SEED) for a longer run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2_grpc
from ledger_cluster.backup import TransferCheck
from ledger_cluster.cli.dev import main as dev_main
from ledger_cluster.ids import parse_account_id
from ledger_cluster.localcluster.cluster import config_ports
from ledger_cluster.nemesis import checks
from ledger_cluster.nemesis import history as h
from ledger_cluster.nemesis.faults import (
    FAULT_KINDS,
    ISOLATE_LEADER,
    PARTITION_KINDS,
    SPLIT_MAJORITY,
    FaultRecord,
    NemesisLog,
    ProcessExit,
)
from ledger_cluster.nemesis.leadership import AcknowledgingTerm, acknowledging_terms
from ledger_cluster.nemesis.network import (
    NAMESPACE_ENVIRONMENT_VARIABLE,
    NAMESPACE_PREFIX,
    Firewall,
    NamespaceError,
    cut_rules,
    drop_rule,
    namespace_problem,
    raft_endpoint,
)
from ledger_cluster.nemesis.runner import (
    NemesisOptions,
    candidate_accounts,
    read_final_state,
    run_nemesis,
    wait_until_quiet,
)
from ledger_cluster.nemesis.workload import Workload
from ledger_cluster.replica import ACKNOWLEDGING_TERM_LOG
from tests.processes import REPO_CONFIG_PATH, standalone_server, write_generated_config

NEMESIS_CI_SECONDS = 60.0
NEMESIS_CI_SEED = 20261122
NEMESIS_CI_CLIENTS = 3
# The partition run: long enough that each partition kind comes once (a round of the five).
PARTITION_CI_SECONDS = 40.0
PARTITION_CI_SEED = 20261129
# Start, heal, final reads and checks on top of the faults.
PARTITION_RUN_OVERHEAD_SECONDS_MAX = 240.0
# Load on a fault-free standalone server: long enough for every kind of operation, transfers
# expiring included (their deadlines pass during the wait for quiet that follows).
NO_FAULT_LOAD_SECONDS = 4.0

ACCOUNT = "00000000000000aa"
SETTLED = checks.SETTLED
PENDING = checks.PENDING
CANCELLED = checks.CANCELLED
INSUFFICIENT = checks.INSUFFICIENT_FUNDS


# -- a tiny history builder -------------------------------------------------------------------


class Builder:
    def __init__(self) -> None:
        self.operations: list[h.Operation] = []
        self.clock = 0.0

    def _op(
        self, kind: str, request: dict[str, Any], outcome: str, result: dict[str, Any], code: str = "OK"
    ) -> h.Operation:
        self.clock += 1.0
        op = h.Operation(
            op_id=len(self.operations),
            client=0,
            kind=kind,
            invoke_seconds=self.clock,
            request=request,
            complete_seconds=self.clock + 0.5,
            outcome=outcome,
            code=code,
            result=result,
        )
        self.operations.append(op)
        return op

    def write(
        self,
        number: int,
        amount: int,
        *,
        settled: bool = True,
        status: str = "",
        outcome: str = h.OUTCOME_OK,
        code: str = "OK",
    ) -> str:
        transaction_id = f"{ACCOUNT}{number:016x}"
        request = {"account_id": ACCOUNT, "amount": amount, "settled": settled, "request_id": f"r{number}"}
        shown = status or (SETTLED if settled else PENDING)
        result = {"transaction": transaction(number, amount, shown)} if outcome == h.OUTCOME_OK else {}
        self._op(h.TOP_UP if amount > 0 else h.PURCHASE, request, outcome, result, code)
        return transaction_id

    def finish(self, kind: str, number: int, amount: int, status: str) -> None:
        request = {"transaction_id": f"{ACCOUNT}{number:016x}"}
        self._op(kind, request, h.OUTCOME_OK, {"transaction": transaction(number, amount, status)})

    def read_list(self, shown: list[dict[str, Any]]) -> h.Operation:
        request = {"account_id": ACCOUNT, "consistent": True}
        return self._op(h.LIST_TRANSACTIONS, request, h.OUTCOME_OK, {"transactions": shown, "complete": True})


def transaction(number: int, amount: int, status: str) -> dict[str, Any]:
    return {
        "id": f"{ACCOUNT}{number:016x}",
        "account_id": ACCOUNT,
        "amount": amount,
        "description": f"r{number}",
        "status": status,
    }


def final_state(transactions: list[dict[str, Any]], available: int, settled: int) -> checks.FinalState:
    account = {"id": ACCOUNT, "available_balance": available, "settled_balance": settled}
    return {ACCOUNT: checks.AccountState(account, transactions)}


def violations(result: checks.CheckResult) -> str:
    return "\n".join(result.violations)


# -- each check fails on the break it exists for ---------------------------------------------


def test_a_lost_or_doubled_acknowledged_write_fails() -> None:
    history = Builder()
    history.write(1, 500)
    history.write(2, -200, settled=False)
    history.finish(h.SETTLE, 2, -200, SETTLED)
    kept = [transaction(1, 500, SETTLED), transaction(2, -200, SETTLED)]
    assert checks.check_acknowledged_writes(history.operations, final_state(kept, 300, 300)).passed

    lost = checks.check_acknowledged_writes(history.operations, final_state(kept[:1], 500, 500))
    assert not lost.passed and "stored 0 times" in violations(lost)
    doubled_copy = {**kept[0], "id": f"{ACCOUNT}{99:016x}"}
    doubled = checks.check_acknowledged_writes(
        history.operations, final_state([*kept, doubled_copy], 800, 800)
    )
    assert "stored 2 times" in violations(doubled)
    unsettled = [kept[0], transaction(2, -200, PENDING)]
    undone = checks.check_acknowledged_writes(history.operations, final_state(unsettled, 300, 500))
    assert "settle of" in violations(undone)


def test_the_acknowledged_status_must_hold_and_nothing_settles_by_itself() -> None:
    history = Builder()
    history.write(1, 500)
    history.write(2, -900, status=INSUFFICIENT)
    history.write(3, 100, settled=False)
    stored = [transaction(1, 500, SETTLED), transaction(2, -900, INSUFFICIENT), transaction(3, 100, PENDING)]
    assert checks.check_acknowledged_writes(history.operations, final_state(stored, 500, 500)).passed
    assert checks.check_unacknowledged_writes(history.operations, final_state(stored, 500, 500)).passed

    flipped = [transaction(1, 500, SETTLED), transaction(2, -900, SETTLED), transaction(3, 100, PENDING)]
    changed = checks.check_acknowledged_writes(history.operations, final_state(flipped, -400, -400))
    assert (
        "acknowledged TRANSACTION_STATUS_INSUFFICIENT_FUNDS, stored TRANSACTION_STATUS_SETTLED"
        in violations(changed)
    )
    settled_alone = [*stored[:2], transaction(3, 100, SETTLED)]
    unasked = checks.check_unacknowledged_writes(history.operations, final_state(settled_alone, 600, 600))
    assert "without any settle" in violations(unasked)


def test_unknown_writes_at_most_once_failed_writes_never_and_no_phantoms() -> None:
    history = Builder()
    history.write(1, 500, outcome=h.OUTCOME_UNKNOWN, code="DEADLINE_EXCEEDED")
    history.write(2, 700, outcome=h.OUTCOME_FAILED, code="UNAVAILABLE")
    applied_once = final_state([transaction(1, 500, SETTLED)], 500, 500)
    assert checks.check_unacknowledged_writes(history.operations, applied_once).passed
    assert checks.check_unacknowledged_writes(history.operations, final_state([], 0, 0)).passed

    twice = [transaction(1, 500, SETTLED), {**transaction(1, 500, SETTLED), "id": f"{ACCOUNT}{5:016x}"}]
    assert "stored 2 times" in violations(
        checks.check_unacknowledged_writes(history.operations, final_state(twice, 1000, 1000))
    )
    failed_but_stored = final_state([transaction(2, 700, SETTLED)], 700, 700)
    assert "failed with" in violations(
        checks.check_unacknowledged_writes(history.operations, failed_but_stored)
    )
    phantom = final_state([transaction(9, 50, SETTLED)], 50, 50)
    assert "match no request" in violations(checks.check_unacknowledged_writes(history.operations, phantom))


def test_balances_must_replay_and_purchases_must_be_decided_right() -> None:
    history = Builder()
    history.write(1, 500)
    history.write(2, -300)
    history.write(3, -400, status=INSUFFICIENT)
    stored = [transaction(1, 500, SETTLED), transaction(2, -300, SETTLED), transaction(3, -400, INSUFFICIENT)]
    assert checks.check_balances(history.operations, final_state(stored, 200, 200)).passed

    wrong_balance = checks.check_balances(history.operations, final_state(stored, 250, 200))
    assert "replayed (200, 200)" in violations(wrong_balance)
    overdraft = [transaction(1, 500, SETTLED), transaction(2, -300, SETTLED), transaction(3, -400, SETTLED)]
    accepted = checks.check_balances(history.operations, final_state(overdraft, -200, -200))
    assert "accepted with at most 200 available" in violations(accepted)
    below_zero = checks.check_overdraft_limits(history.operations, final_state(overdraft, -200, -200))
    assert "negative balance" in violations(below_zero)
    refused = [
        transaction(1, 500, SETTLED),
        transaction(2, -300, INSUFFICIENT),
        transaction(3, -400, INSUFFICIENT),
    ]
    wrongly_refused = checks.check_balances(history.operations, final_state(refused, 500, 500))
    assert "refused with at least 500 available" in violations(wrongly_refused)


def test_a_consistent_read_must_show_what_was_acknowledged_before_it() -> None:
    history = Builder()
    history.write(1, 500, settled=False)
    history.finish(h.SETTLE, 1, 500, SETTLED)
    final = final_state([transaction(1, 500, SETTLED)], 500, 500)
    history.read_list([transaction(1, 500, SETTLED)])
    assert checks.check_consistent_reads(history.operations, final).passed

    stale = Builder()
    stale.write(1, 500, settled=False)
    stale.finish(h.SETTLE, 1, 500, SETTLED)
    stale.read_list([transaction(1, 500, PENDING)])
    assert "TRANSACTION_STATUS_SETTLED was acknowledged" in violations(
        checks.check_consistent_reads(stale.operations, final)
    )
    missing = Builder()
    missing.write(1, 500)
    missing.read_list([])
    assert "did not list it" in violations(checks.check_consistent_reads(missing.operations, final))
    # A read invoked before the write was acknowledged may miss it.
    concurrent = Builder()
    read = concurrent.read_list([])
    concurrent.write(1, 500)
    read.complete_seconds = concurrent.clock + 1.0
    assert checks.check_consistent_reads(concurrent.operations, final).passed


def account_read(history: Builder, credits_settled: int, debits_settled: int = 0) -> h.Operation:
    shown = {"id": ACCOUNT, "credits_settled": credits_settled, "debits_settled": debits_settled}
    request = {"account_id": ACCOUNT, "consistent": True}
    return history._op(h.GET_ACCOUNT, request, h.OUTCOME_OK, {"account": shown})


def test_a_consistent_account_read_is_linearizable() -> None:
    """A deposed leader answering a consistent read from its old state shows totals without the
    settles the new leader acknowledged before the read: caught. So is a read showing a settle
    no client had asked for yet."""
    final = final_state([transaction(1, 500, SETTLED), transaction(2, -100, SETTLED)], 400, 400)
    history = Builder()
    history.write(1, 500)
    history.write(2, -100)
    account_read(history, 500, 100)
    assert checks.check_linearizable_account_reads(history.operations, final).passed

    stale = Builder()
    stale.write(1, 500)
    stale.write(2, -100)
    account_read(stale, 500, 0)
    found = violations(checks.check_linearizable_account_reads(stale.operations, final))
    assert "debits_settled 0; linearizable is 100..100 (stale" in found

    future = Builder()
    future.write(1, 500)
    account_read(future, 500, 100)
    future.write(2, -100)
    found = violations(checks.check_linearizable_account_reads(future.operations, final))
    assert "debits_settled 100; linearizable is 0..0" in found
    # A write concurrent with the read may show or not.
    for shown in (0, 100):
        concurrent = Builder()
        concurrent.write(1, 500)
        read = account_read(concurrent, 500, shown)
        concurrent.write(2, -100)
        read.complete_seconds = concurrent.clock + 1.0
        assert checks.check_linearizable_account_reads(concurrent.operations, final).passed

    # A pending top-up counts once its settle was acknowledged, not from its create.
    settled_later = final_state([transaction(1, 500, SETTLED)], 500, 500)
    pending = Builder()
    pending.write(1, 500, settled=False)
    account_read(pending, 0)
    pending.finish(h.SETTLE, 1, 500, SETTLED)
    account_read(pending, 0)
    found = violations(checks.check_linearizable_account_reads(pending.operations, settled_later))
    assert "op 3" in found and "op 1" not in found

    listing = Builder()
    listing.write(1, 500)
    listing.read_list([transaction(1, 500, SETTLED), transaction(2, -100, SETTLED)])
    listing.write(2, -100)
    found = violations(checks.check_linearizable_account_reads(listing.operations, final))
    assert f"shows {ACCOUNT}{2:016x} settled; no write that could settle it" in found


def test_two_leaders_acknowledging_in_one_term_fail() -> None:
    one_each = [AcknowledgingTerm("shard-01", 7, "node02"), AcknowledgingTerm("shard-01", 8, "node01")]
    assert checks.check_one_leader_per_term(one_each).passed
    other_shard = [*one_each, AcknowledgingTerm("shard-02", 7, "node01")]
    assert checks.check_one_leader_per_term(other_shard).passed
    twice = [*one_each, AcknowledgingTerm("shard-01", 7, "node03")]
    assert "shard shard-01, term 7: node02, node03" in violations(checks.check_one_leader_per_term(twice))


def test_the_leader_terms_are_read_from_the_node_logs(tmp_path: Path) -> None:
    first = tmp_path / "node01.log"
    logged = ACKNOWLEDGING_TERM_LOG % ("shard-03", 1, "node01")
    first.write_text(
        "=== ledger-node node01\n"
        f"2026-11-29 04:49:48,657 INFO ledger_cluster.replica: {logged}\n"
        "2026-11-29 04:49:49,000 INFO ledger_cluster.raft_loop: raft link to node02 closed: peer silent\n"
    )
    second = tmp_path / "node02.log"
    second.write_text(f"x {ACKNOWLEDGING_TERM_LOG % ('shard-03', 12, 'node02')}\n")
    assert acknowledging_terms([first, second]) == [
        AcknowledgingTerm("shard-03", 1, "node01"),
        AcknowledgingTerm("shard-03", 12, "node02"),
    ]


def test_partition_rules_cut_only_the_raft_link_between_two_nodes() -> None:
    first = raft_endpoint("node01", "127.0.0.1:7001")
    second = raft_endpoint("node02", "127.0.0.2:7002")
    rule = drop_rule(first, second)
    assert rule == [
        *("-p", "tcp", "-s", "127.0.0.1", "-d", "127.0.0.2"),
        *("-m", "multiport", "--ports", "7001,7002", "-j", "DROP"),
    ]
    lossy = drop_rule(second, first, 0.1)
    assert lossy[lossy.index("--probability") + 1] == "0.1000" and lossy[-2:] == ["-j", "DROP"]
    assert cut_rules([first], [second]) == [drop_rule(first, second), drop_rule(second, first)]
    with pytest.raises(NamespaceError, match=r"share 127\.0\.0\.1"):
        drop_rule(first, raft_endpoint("node03", "127.0.0.1:7003"))


def test_the_firewall_refuses_to_run_outside_a_nemesis_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NAMESPACE_ENVIRONMENT_VARIABLE, raising=False)
    with pytest.raises(NamespaceError, match="outside a private nemesis namespace"):
        Firewall()


def test_a_read_must_never_show_a_write_that_later_disappears() -> None:
    history = Builder()
    history.write(1, 500, settled=False)
    history.read_list([transaction(1, 500, CANCELLED)])
    still_pending = final_state([transaction(1, 500, PENDING)], 0, 0)
    assert "stored as" in violations(
        checks.check_reads_never_show_lost_writes(history.operations, still_pending)
    )
    vanished = final_state([], 0, 0)
    assert "not stored" in violations(checks.check_reads_never_show_lost_writes(history.operations, vanished))
    cancelled = final_state([transaction(1, 500, CANCELLED)], 0, 0)
    assert checks.check_reads_never_show_lost_writes(history.operations, cancelled).passed


def test_replicas_elections_and_process_exits_are_checked() -> None:
    final = final_state([transaction(1, 500, SETTLED)], 500, 500)
    same = {"shard-01": {"node01": (7, "ab"), "node02": (7, "ab")}}
    assert checks.check_replicas(final, {"node01/shard-01": final}, same, {"node01/shard-01": []}).passed
    differing = {"shard-01": {"node01": (7, "ab"), "node02": (6, "cd")}}
    assert "replicas differ" in violations(checks.check_replicas(final, {}, differing, {}))
    behind = final_state([], 0, 0)
    assert "differs from the gateway" in violations(
        checks.check_replicas(final, {"node02/shard-01": behind}, {}, {})
    )
    assert "balance" in violations(checks.check_replicas(final, {}, {}, {"node03/shard-01": ["balance off"]}))

    quick = FaultRecord("kill-leader", "node01", 1.0, election_seconds=1.2)
    slow = FaultRecord("pause-leader", "node02", 9.0, election_seconds=12.0)
    never = FaultRecord("kill-all", "every node", 20.0, election_seconds=None)
    assert checks.check_elections([quick], 10.0).passed
    assert checks.check_elections([quick, slow, never], 10.0).violation_count == 2

    log = NemesisLog(faults=[quick])
    assert checks.check_cluster_health(log).passed
    log.unexpected_exits.append(ProcessExit("ledger-node node03", 70, 5.0, "Traceback ..."))
    assert "exit code 70" in violations(checks.check_cluster_health(log))


# -- transfers --------------------------------------------------------------------------------

DEBIT = ACCOUNT
CREDIT = "f0000000000000bb"
EXPIRED = checks.EXPIRED
CREATED_NS = 1_000 * checks.NANOS_PER_SECOND


def transfer_id(number: int) -> str:
    return f"{DEBIT}{number:016x}"


def legs(
    number: int, amount: int, status: str, *, settled_amount: int | None = None, timeout: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The debit leg (on DEBIT) and credit leg (on CREDIT, same number) of transfer t<number>."""
    moved = (amount if status == SETTLED else 0) if settled_amount is None else settled_amount
    common = {
        "description": f"t{number}",
        "status": status,
        "transfer_id": transfer_id(number),
        "expires_at": CREATED_NS + timeout * checks.NANOS_PER_SECOND if timeout else 0,
        "created_at": CREATED_NS,
        "updated_at": CREATED_NS,
    }
    debit = {
        **common,
        "id": transfer_id(number),
        "account_id": DEBIT,
        "amount": -amount,
        "settled_amount": -moved,
        "counterparty_account_id": CREDIT,
    }
    credit = {
        **common,
        "id": f"{CREDIT}{number:016x}",
        "account_id": CREDIT,
        "amount": amount,
        "settled_amount": moved,
        "counterparty_account_id": DEBIT,
    }
    return debit, credit


def transfer_answer(number: int, amount: int, status: str, settled_amount: int = 0) -> dict[str, Any]:
    transfer_status = status.replace("TRANSACTION_STATUS_", "TRANSFER_STATUS_")
    credit = "" if status == INSUFFICIENT else f"{CREDIT}{number:016x}"
    return {
        "id": transfer_id(number),
        "debit_account_id": DEBIT,
        "credit_account_id": CREDIT,
        "amount": amount,
        "description": f"t{number}",
        "status": transfer_status,
        "settled_amount": settled_amount,
        "debit_transaction_id": transfer_id(number),
        "credit_transaction_id": credit,
    }


class TransferBuilder(Builder):
    def transfer(
        self,
        number: int,
        amount: int,
        *,
        settled: bool = True,
        status: str = "",
        outcome: str = h.OUTCOME_OK,
        code: str = "OK",
        timeout: int = 0,
        kind: str = h.CREATE_TRANSFER,
    ) -> h.Operation:
        request = {
            "debit_account_id": DEBIT,
            "credit_account_id": CREDIT,
            "amount": amount,
            "settled": settled,
            "timeout_seconds": timeout,
            "request_id": f"t{number}",
            "same_shard": False,
        }
        shown = status or (SETTLED if settled else PENDING)
        moved = amount if shown == SETTLED else 0
        result = (
            {"transfer": transfer_answer(number, amount, shown, moved)} if outcome == h.OUTCOME_OK else {}
        )
        return self._op(kind, request, outcome, result, code)

    def finish_transfer(
        self,
        kind: str,
        number: int,
        transfer_amount: int,
        *,
        asked: int = 0,
        status: str = "",
        outcome: str = h.OUTCOME_OK,
        code: str = "OK",
        reason: str = "",
    ) -> h.Operation:
        request: dict[str, Any] = {"transfer_id": transfer_id(number)}
        if kind == h.SETTLE_TRANSFER:
            request.update(amount=asked, transfer_amount=transfer_amount)
        shown = status or (SETTLED if kind == h.SETTLE_TRANSFER else CANCELLED)
        moved = (asked or transfer_amount) if shown == SETTLED else 0
        result = (
            {"transfer": transfer_answer(number, transfer_amount, shown, moved)}
            if outcome == h.OUTCOME_OK
            else {}
        )
        op = self._op(kind, request, outcome, result, code)
        op.reason = reason
        return op

    def top_up(self, number: int, amount: int) -> None:
        self.write(number, amount)

    def list_of(self, account_id: str, shown: list[dict[str, Any]]) -> None:
        request = {"account_id": account_id, "consistent": True}
        self._op(h.LIST_TRANSACTIONS, request, h.OUTCOME_OK, {"transactions": shown, "complete": True})

    def get_transfer_not_found(self, number: int) -> None:
        request = {"transfer_id": transfer_id(number), "consistent": True}
        self._op(h.GET_TRANSFER, request, h.OUTCOME_FAILED, {}, "NOT_FOUND")


def two_accounts(
    debit_side: list[dict[str, Any]], credit_side: list[dict[str, Any]], *, debit_limit: int = 0
) -> checks.FinalState:
    """DEBIT and CREDIT holding these transactions, with the balances and totals they imply."""

    def account(account_id: str, transactions: list[dict[str, Any]], limit: int) -> dict[str, Any]:
        moved = [checks.settled_amount(t) for t in transactions]
        pending = [t["amount"] for t in transactions if t["status"] == PENDING]
        totals = {
            "credits_settled": sum(m for m in moved if m > 0),
            "debits_settled": -sum(m for m in moved if m < 0),
            "credits_pending": sum(p for p in pending if p > 0),
            "debits_pending": -sum(p for p in pending if p < 0),
        }
        settled = totals["credits_settled"] - totals["debits_settled"]
        return {
            "id": account_id,
            "available_balance": settled - totals["debits_pending"],
            "settled_balance": settled,
            "overdraft_limit": limit,
            **totals,
        }

    return {
        DEBIT: checks.AccountState(account(DEBIT, debit_side, debit_limit), debit_side),
        CREDIT: checks.AccountState(account(CREDIT, credit_side, 0), credit_side),
    }


def transfer_checks(operations: list[h.Operation], final: checks.FinalState) -> list[checks.CheckResult]:
    return [
        checks.check_transfer_legs(final),
        checks.check_acknowledged_transfers(operations, final),
        checks.check_unacknowledged_transfers(operations, final),
        checks.check_transfer_finishes(operations, final),
        checks.check_conservation(final),
        checks.check_overdraft_limits(operations, final),
        # The transaction checks hold with legs present.
        checks.check_acknowledged_writes(operations, final),
        checks.check_unacknowledged_writes(operations, final),
        checks.check_balances(operations, final),
        checks.check_reads_never_show_lost_writes(operations, final),
        checks.check_consistent_reads(operations, final),
    ]


def failures(operations: list[h.Operation], final: checks.FinalState) -> str:
    return "\n".join(
        f"{result.name}: {violation}"
        for result in transfer_checks(operations, final)
        for violation in result.violations
    )


def funded_transfer() -> tuple[TransferBuilder, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A top-up of 1000 on DEBIT, then an acknowledged settled transfer t2 of 400 to CREDIT."""
    history = TransferBuilder()
    history.top_up(1, 1000)
    history.transfer(2, 400)
    debit, credit = legs(2, 400, SETTLED)
    return history, transaction(1, 1000, SETTLED), debit, credit


def test_an_acknowledged_transfer_is_whole_on_both_sides_exactly_once() -> None:
    history, top_up, debit, credit = funded_transfer()
    history.list_of(DEBIT, [top_up, debit])
    whole = two_accounts([top_up, debit], [credit])
    assert failures(history.operations, whole) == ""

    no_credit = failures(history.operations, two_accounts([top_up, debit], []))
    assert "transfer-legs-whole: transfer" in no_credit and "but no credit leg on" in no_credit
    assert "acknowledged-transfers-exactly-once" in no_credit and "0 credit legs" in no_credit
    no_debit = failures(history.operations, two_accounts([top_up], [credit]))
    assert "whose debit leg is not stored" in no_debit
    assert "is stored 0 times" in no_debit
    second_debit = {**debit, "id": transfer_id(3), "transfer_id": transfer_id(3)}
    second_credit = {**credit, "id": f"{CREDIT}{3:016x}", "transfer_id": transfer_id(3)}
    doubled = failures(
        history.operations, two_accounts([top_up, debit, second_debit], [credit, second_credit])
    )
    assert "acknowledged as ['00000000000000aa0000000000000002'] is stored 2 times" in doubled
    doubled_credit = {**credit, "id": f"{CREDIT}{7:016x}"}
    assert "has 2 credit legs" in failures(
        history.operations, two_accounts([top_up, debit], [credit, doubled_credit])
    )
    cancelled_credit = {**credit, "status": CANCELLED, "settled_amount": 0}
    disagreeing = failures(history.operations, two_accounts([top_up, debit], [cancelled_credit]))
    assert "disagrees" in disagreeing and "conservation" in disagreeing
    wrong_side = {**credit, "counterparty_account_id": CREDIT}
    assert "counterparty_account_id" in failures(
        history.operations, two_accounts([top_up, debit], [wrong_side])
    )


def test_a_consistent_read_after_a_transfer_shows_both_legs() -> None:
    history, top_up, debit, credit = funded_transfer()
    final = two_accounts([top_up, debit], [credit])
    history.list_of(DEBIT, [top_up, debit])
    history.list_of(CREDIT, [credit])
    assert failures(history.operations, final) == ""
    history.list_of(CREDIT, [])
    assert f"did not list it; {CREDIT}{2:016x}" in failures(history.operations, final)
    lost = TransferBuilder()
    lost.transfer(2, 400, settled=False)
    lost.get_transfer_not_found(2)
    pending_debit, pending_credit = legs(2, 400, PENDING)
    assert "(get-transfer at 2.000 s) failed with NOT_FOUND/" in failures(
        lost.operations, two_accounts([pending_debit], [pending_credit], debit_limit=400)
    )


def test_unknown_transfers_apply_at_most_once_and_never_half() -> None:
    history = TransferBuilder()
    history.top_up(1, 1000)
    history.transfer(2, 400, outcome=h.OUTCOME_UNKNOWN, code="UNAVAILABLE")
    history.transfer(3, 100, outcome=h.OUTCOME_FAILED, code="UNAVAILABLE")
    top_up = transaction(1, 1000, SETTLED)
    debit, credit = legs(2, 400, SETTLED)
    assert failures(history.operations, two_accounts([top_up, debit], [credit])) == ""
    assert failures(history.operations, two_accounts([top_up], [])) == ""

    half = failures(history.operations, two_accounts([top_up, debit], []))
    assert "but no credit leg on" in half
    assert "whose debit leg is not stored" in failures(history.operations, two_accounts([top_up], [credit]))
    again = {**debit, "id": transfer_id(5), "transfer_id": transfer_id(5)}
    again_credit = {**credit, "id": f"{CREDIT}{5:016x}", "transfer_id": transfer_id(5)}
    twice = failures(history.operations, two_accounts([top_up, debit, again], [credit, again_credit]))
    assert "of unknown outcome is stored 2 times" in twice
    failed_debit, failed_credit = legs(3, 100, SETTLED)
    stored_anyway = failures(history.operations, two_accounts([top_up, failed_debit], [failed_credit]))
    assert "failed with ['UNAVAILABLE/'] yet is stored 1 times" in stored_anyway
    phantom_debit, phantom_credit = legs(9, 50, SETTLED)
    assert "match no request ('t9')" in failures(
        history.operations, two_accounts([top_up, phantom_debit], [phantom_credit])
    )


def test_settles_cancels_and_expiries_of_transfers_hold_as_acknowledged() -> None:
    history = TransferBuilder()
    history.top_up(1, 1000)
    history.transfer(2, 500, settled=False)
    history.finish_transfer(h.SETTLE_TRANSFER, 2, 500, asked=300)
    top_up = transaction(1, 1000, SETTLED)
    debit, credit = legs(2, 500, SETTLED, settled_amount=300)
    assert failures(history.operations, two_accounts([top_up, debit], [credit])) == ""

    full_debit, full_credit = legs(2, 500, SETTLED)
    settled_all = failures(history.operations, two_accounts([top_up, full_debit], [full_credit]))
    assert "acknowledged settled 300, but leg" in settled_all
    one_side = failures(history.operations, two_accounts([top_up, debit], [full_credit]))
    assert "disagrees" in one_side and "conservation" in one_side
    cancelled = legs(2, 500, CANCELLED)
    assert "is stored TRANSACTION_STATUS_CANCELLED" in failures(
        history.operations, two_accounts([top_up, cancelled[0]], [cancelled[1]])
    )

    cancel = TransferBuilder()
    cancel.top_up(1, 1000)
    cancel.transfer(2, 500, settled=False, timeout=3)
    cancel.finish_transfer(h.CANCEL_TRANSFER, 2, 500)
    cancel.finish_transfer(
        h.SETTLE_TRANSFER,
        2,
        500,
        outcome=h.OUTCOME_FAILED,
        code="FAILED_PRECONDITION",
        reason="TRANSFER_EXPIRED",
    )
    gone = legs(2, 500, CANCELLED, timeout=3)
    assert "refused with TRANSFER_EXPIRED, stored TRANSACTION_STATUS_CANCELLED" in failures(
        cancel.operations, two_accounts([top_up, gone[0]], [gone[1]])
    )
    expired = legs(2, 500, EXPIRED, timeout=3)
    assert "but leg" in failures(cancel.operations, two_accounts([top_up, expired[0]], [expired[1]]))

    nobody = TransferBuilder()
    nobody.top_up(1, 1000)
    nobody.transfer(2, 500, settled=False)
    by_itself = legs(2, 500, SETTLED)
    assert "created pending is TRANSACTION_STATUS_SETTLED without any settle-transfer" in failures(
        nobody.operations, two_accounts([top_up, by_itself[0]], [by_itself[1]])
    )
    no_timeout = legs(2, 500, EXPIRED)
    assert "without a timeout is TRANSACTION_STATUS_EXPIRED" in failures(
        nobody.operations, two_accounts([top_up, no_timeout[0]], [no_timeout[1]])
    )


def test_overdraft_limits_and_funds_decide_transfer_debits() -> None:
    history = TransferBuilder()
    history.top_up(1, 100)
    history.transfer(2, 400)
    top_up = transaction(1, 100, SETTLED)
    debit, credit = legs(2, 400, SETTLED)
    # available 100 - 400 = -300: fine with a limit of 500, not with none.
    assert failures(history.operations, two_accounts([top_up, debit], [credit], debit_limit=500)) == ""
    no_limit = failures(history.operations, two_accounts([top_up, debit], [credit]))
    assert "accepted with at most 100 available" in no_limit and "negative balance -300 beyond -0" in no_limit
    refused_debit = {**debit, "status": INSUFFICIENT, "settled_amount": 0}
    history.operations[-1].result["transfer"] = transfer_answer(2, 400, INSUFFICIENT)
    wrongly = failures(history.operations, two_accounts([top_up, refused_debit], [], debit_limit=500))
    assert "refused with at least 100 available (overdraft limit 500)" in wrongly
    assert failures(history.operations, two_accounts([top_up, refused_debit], [])) == ""
    # A pending transfer with a timeout that was refused for funds has no deadline.
    history.operations[-1].request.update(settled=False, timeout_seconds=3)
    assert failures(history.operations, two_accounts([top_up, refused_debit], [])) == ""
    with_deadline = {**refused_debit, "expires_at": CREATED_NS + 3 * checks.NANOS_PER_SECOND}
    assert "timeout 0 s" in failures(history.operations, two_accounts([top_up, with_deadline], []))
    refused_with_credit = {**credit, "status": INSUFFICIENT, "settled_amount": 0}
    assert "refused for funds yet has credit legs" in failures(
        history.operations, two_accounts([top_up, refused_debit], [refused_with_credit])
    )


def test_conservation_and_account_totals() -> None:
    history, top_up, debit, credit = funded_transfer()
    final = two_accounts([top_up, debit], [credit])
    credit_account = final[CREDIT].account
    assert credit_account is not None
    final[CREDIT].account = {**credit_account, "credits_settled": 500, "settled_balance": 500}
    broken = failures(history.operations, final)
    assert "settled balances sum to 1100; settled top-ups and purchases moved 1000" in broken
    assert "stored totals" in broken and "replayed (400, 400)" in broken


def test_expiry_happens_in_time_and_never_early() -> None:
    deadline = CREATED_NS + 3 * checks.NANOS_PER_SECOND
    healed = deadline - checks.NANOS_PER_SECOND
    bound = int(checks.EXPIRY_AFTER_HEAL_SECONDS_MAX * checks.NANOS_PER_SECOND)
    pending, _ = legs(2, 500, PENDING, timeout=3)
    assert checks.check_expiry(two_accounts([pending], []), deadline + bound, healed).passed
    stuck = checks.check_expiry(two_accounts([pending], []), deadline + bound + 1, healed)
    assert "still pending 10.0 s after its deadline" in violations(stuck)
    # A deadline that passed during the faults counts from the heal.
    assert checks.check_expiry(two_accounts([pending], []), deadline + bound + 1, deadline + 5).passed

    expired, _ = legs(2, 500, EXPIRED, timeout=3)
    on_time = {**expired, "updated_at": deadline + checks.NANOS_PER_SECOND}
    assert checks.check_expiry(two_accounts([on_time], []), deadline + bound * 2, healed).passed
    early = {**expired, "updated_at": deadline - 1}
    assert "expired 1 ns early" in violations(
        checks.check_expiry(two_accounts([early], []), deadline, healed)
    )
    late = {**expired, "updated_at": deadline + bound + 1}
    assert "after the heal" in violations(
        checks.check_expiry(two_accounts([late], []), deadline + bound * 2, healed)
    )
    settled, _ = legs(2, 500, SETTLED, timeout=3)
    too_late = {**settled, "updated_at": deadline}
    assert "deadline" in violations(checks.check_expiry(two_accounts([too_late], []), deadline, healed))
    forever, _ = legs(3, 500, EXPIRED)
    assert "expired without a deadline" in violations(checks.check_expiry(two_accounts([forever], []), 0, 0))


def test_the_replicas_transfer_summaries_must_meet_and_match_the_listings() -> None:
    top_up = transaction(1, 1000, SETTLED)
    debit, credit = legs(2, 400, SETTLED)
    refused, _ = legs(3, 5000, INSUFFICIENT)
    final = two_accounts([top_up, debit, refused], [credit])
    clean = TransferCheck(debit_legs=1, credit_legs=1, unfinished=0, failures=())
    assert checks.check_replica_transfer_summaries(final, clean).passed
    owing = TransferCheck(1, 1, 1, ("shard-01: 1 transfers still owe their credit shard work",))
    assert "still owe" in violations(checks.check_replica_transfer_summaries(final, owing))
    unlisted = TransferCheck(debit_legs=2, credit_legs=2, unfinished=0, failures=())
    assert "the gateway listed 1 and 1" in violations(
        checks.check_replica_transfer_summaries(final, unlisted)
    )


def test_unquiet_accounts_are_those_a_heal_may_still_change() -> None:
    top_up = transaction(1, 1000, SETTLED)
    debit, credit = legs(2, 400, SETTLED)
    assert checks.unquiet_accounts(two_accounts([top_up, debit], [credit])) == set()
    assert checks.unquiet_accounts(two_accounts([top_up, debit], [])) == {DEBIT, CREDIT}
    assert checks.unquiet_accounts(two_accounts([top_up], [credit])) == {DEBIT, CREDIT}
    pending = legs(3, 100, PENDING, timeout=3)
    assert checks.unquiet_accounts(two_accounts([top_up, pending[0]], [pending[1]])) == {DEBIT, CREDIT}
    forever = legs(3, 100, PENDING)
    assert checks.unquiet_accounts(two_accounts([top_up, forever[0]], [forever[1]])) == set()


def test_nemesis_command_refuses_unknown_faults_and_used_directories(tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(
        dev_main, ["nemesis", "--faults", "kill-leader,flood", "--out", str(tmp_path / "new")]
    )
    assert unknown.exit_code == 2 and "unknown faults ['flood']" in unknown.output
    used = runner.invoke(dev_main, ["nemesis", "--out", str(tmp_path)])
    assert used.exit_code == 2 and "already exists" in used.output
    assert not (tmp_path / "new").exists()


def test_partitions_run_only_in_the_namespace_made_for_them(tmp_path: Path) -> None:
    """A runner that is told it was re-executed in a nemesis namespace but is not in it (here:
    the host's, or one that does not exist) refuses before starting anything."""
    result = CliRunner().invoke(
        dev_main,
        ["nemesis", "--partitions", "--out", str(tmp_path / "run")],
        env={NAMESPACE_ENVIRONMENT_VARIABLE: f"{NAMESPACE_PREFIX}-not-this-one"},
    )
    assert result.exit_code == 1 and "namespace" in result.output, result.output
    assert not (tmp_path / "run").exists()


# -- real runs -------------------------------------------------------------------------------


def test_the_workload_keeps_every_promise_on_a_standalone_server(tmp_path: Path) -> None:
    """The whole mix, transfers included, against a real ledger-standalone process and no
    faults: every check of the history and the final state passes, so the workload and the
    checks read the contract as the gateway implements it (in seconds, where the nemesis run
    takes minutes)."""
    config_path = write_generated_config(tmp_path / "cluster_config.json", 3, 4, 3)
    config = cluster_config.load(config_path)

    def shard_of(account_id: str) -> str:
        return config.shard_for_account(parse_account_id(account_id)).shard_id

    history = h.History(tmp_path / "history.jsonl")
    notes: list[str] = []
    with standalone_server(tmp_path / "data", config_path, tmp_path / "server.log") as server:
        workload = Workload(server.address, history, NEMESIS_CI_SEED, NEMESIS_CI_CLIENTS, shard_of=shard_of)
        workload.create_initial_accounts()
        workload.start()
        try:
            time.sleep(NO_FAULT_LOAD_SECONDS)  # how long the load lasts, not a wait for readiness
        finally:
            workload.stop()
        history.close()
        operations = history.operations()
        quiet_from = time.time_ns()
        with grpc.insecure_channel(server.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            final = read_final_state(stub, candidate_accounts(operations), notes)
            read_unix_ns = wait_until_quiet(stub, final, quiet_from, quiet_from, notes)
    results = [
        checks.check_acknowledged_writes(operations, final),
        checks.check_unacknowledged_writes(operations, final),
        checks.check_balances(operations, final),
        checks.check_consistent_reads(operations, final),
        checks.check_linearizable_account_reads(operations, final),
        checks.check_reads_never_show_lost_writes(operations, final),
        checks.check_overdraft_limits(operations, final),
        checks.check_transfer_legs(final),
        checks.check_acknowledged_transfers(operations, final),
        checks.check_unacknowledged_transfers(operations, final),
        checks.check_transfer_finishes(operations, final),
        checks.check_conservation(final),
        checks.check_expiry(final, read_unix_ns, quiet_from),
    ]
    report = "\n".join(
        f"{result.name}: {result.detail} {result.violations}" for result in results if not result.passed
    )
    assert not report, f"{report}\n{notes}"
    acknowledged = {op.kind for op in operations if op.outcome == h.OUTCOME_OK}
    assert {h.CREATE_TRANSFER, h.DUPLICATE_TRANSFER, h.SETTLE_TRANSFER, h.GET_TRANSFER} <= acknowledged
    legs = checks.check_transfer_legs(final).detail
    assert not legs.startswith("0 debit legs"), legs


@pytest.mark.slow
def test_seeded_nemesis_run_keeps_every_promise(tmp_path: Path) -> None:
    """Real nodes killed, paused, wiped and re-led under load (transactions and transfers);
    every check passes."""
    duration_seconds = float(os.environ.get("LEDGER_NEMESIS_SECONDS", NEMESIS_CI_SECONDS))
    seed = int(os.environ.get("LEDGER_NEMESIS_SEED", NEMESIS_CI_SEED))
    options = NemesisOptions(
        base_dir=tmp_path / "run",
        duration_seconds=duration_seconds,
        seed=seed,
        clients=NEMESIS_CI_CLIENTS,
        # The checked-in config's ports, which a developer's `honcho start` may hold.
        avoided_ports=frozenset(config_ports(cluster_config.load(REPO_CONFIG_PATH))),
    )
    report = run_nemesis(options, progress=print)
    text = report.to_text()
    print(text)
    assert report.passed, text
    injected = {fault["kind"] for fault in report.faults}
    assert injected == set(FAULT_KINDS), f"not every fault kind was injected:\n{text}"
    operations = sum(sum(outcomes.values()) for outcomes in report.operations.values())
    ok_writes = sum(report.operations.get(kind, {}).get(h.OUTCOME_OK, 0) for kind in h.TRANSACTION_WRITES)
    assert ok_writes > 100, text
    history_lines = (options.base_dir / "history.jsonl").read_text().splitlines()
    assert len(history_lines) == operations
    # The default (mixed) workload ran transfers of every kind, and their checks saw them.
    recorded = [json.loads(line) for line in history_lines]
    acknowledged = [op for op in recorded if op["outcome"] == h.OUTCOME_OK]
    transfers = [op for op in acknowledged if op["kind"] == h.CREATE_TRANSFER]
    assert len(transfers) > 20, text
    assert {op["request"]["same_shard"] for op in transfers} == {True, False}, text
    assert any(op["request"].get("batch") for op in transfers), text
    assert any(op["kind"] == h.DUPLICATE_TRANSFER for op in acknowledged), text
    settles = [op for op in acknowledged if op["kind"] == h.SETTLE_TRANSFER]
    assert any(op["request"]["amount"] for op in settles), f"no partial settle:\n{text}"
    assert any(op["kind"] == h.CANCEL_TRANSFER for op in acknowledged), text
    details = {check["name"]: check["detail"] for check in report.checks}
    assert int(details["expiry-in-time"].split()[0]) > 0, f"no transfer expired:\n{text}"
    assert json.loads((options.base_dir / "report.json").read_text())["passed"] is True
    # Leadership was sampled about once a second throughout, so the progress check had data.
    samples = (options.base_dir / "leadership.jsonl").read_text().splitlines()
    assert len(samples) >= duration_seconds / 2, text
    # A wiped follower came back through a snapshot from its leader.
    logs = "".join(path.read_text(errors="replace") for path in (options.base_dir / "logs").glob("node*.log"))
    assert "restored snapshot" in logs


@pytest.mark.slow
def test_partitions_keep_every_promise(tmp_path: Path) -> None:
    """`ledger-dev nemesis --partitions` as a user runs it: it makes a private network namespace,
    re-runs itself inside, cuts and thins the Raft links with iptables under load and deletes
    the namespace at the end. Every partition kind is injected; the isolated leader and the
    minority are shown to lead nothing with a quorum while cut off (the rules cut what they
    should) while the majority elects leaders; every check passes."""
    problem = namespace_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the partition test: {problem}")
        pytest.skip(problem)
    duration_seconds = float(os.environ.get("LEDGER_NEMESIS_PARTITION_SECONDS", PARTITION_CI_SECONDS))
    command = [sys.executable, "-m", "ledger_cluster.cli.dev", "nemesis", "--partitions", "--faults", ""]
    command += ["--duration", str(duration_seconds), "--seed", str(PARTITION_CI_SEED)]
    command += ["--clients", str(NEMESIS_CI_CLIENTS), "--out", str(tmp_path / "run"), "--json"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as runner:
        try:
            output, _ = runner.communicate(timeout=duration_seconds + PARTITION_RUN_OVERHEAD_SECONDS_MAX)
        finally:
            if runner.poll() is None:
                runner.kill()  # by PID; the namespace's leftovers are its own cleanup's
        namespace = f"{NAMESPACE_PREFIX}-{runner.pid}-"
    print(output)
    report = json.loads(output.splitlines()[-1])
    assert runner.returncode == 0 and report["passed"], output
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for fault in report["faults"]:
        by_kind.setdefault(fault["kind"], []).append(fault)
    assert set(by_kind) == set(PARTITION_KINDS), output
    for fault in by_kind[ISOLATE_LEADER] + by_kind[SPLIT_MAJORITY]:
        assert "led no shard with a quorum" in fault["note"] and fault["election_seconds"] is not None, fault
    details = {check["name"]: check["detail"] for check in report["checks"]}
    assert int(details["consistent-reads-linearizable"].split()[0]) > 0, output
    assert int(details["one-leader-per-term"].split()[0]) > len(report["faults"]), output
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert namespace not in namespaces
    config = json.loads((tmp_path / "run" / "cluster_config.json").read_text())
    assert [node["raft_address"].rpartition(":")[0] for node in config["nodes"]] == [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
    ]
