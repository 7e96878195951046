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
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ledger_cluster import config as cluster_config
from ledger_cluster.cli.dev import main as dev_main
from ledger_cluster.localcluster.cluster import config_ports
from ledger_cluster.nemesis import checks
from ledger_cluster.nemesis import history as h
from ledger_cluster.nemesis.faults import FAULT_KINDS, FaultRecord, NemesisLog, ProcessExit
from ledger_cluster.nemesis.runner import NemesisOptions, run_nemesis
from tests.processes import REPO_CONFIG_PATH

NEMESIS_CI_SECONDS = 60.0
NEMESIS_CI_SEED = 20261122
NEMESIS_CI_CLIENTS = 3

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


def test_nemesis_command_refuses_unknown_faults_and_used_directories(tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(
        dev_main, ["nemesis", "--faults", "kill-leader,flood", "--out", str(tmp_path / "new")]
    )
    assert unknown.exit_code == 2 and "unknown faults ['flood']" in unknown.output
    used = runner.invoke(dev_main, ["nemesis", "--out", str(tmp_path)])
    assert used.exit_code == 2 and "already exists" in used.output
    assert not (tmp_path / "new").exists()


# -- a real run --------------------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_nemesis_run_keeps_every_promise(tmp_path: Path) -> None:
    """Real nodes killed, paused, wiped and re-led under load; every check passes."""
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
    assert json.loads((options.base_dir / "report.json").read_text())["passed"] is True
    # Leadership was sampled about once a second throughout, so the progress check had data.
    samples = (options.base_dir / "leadership.jsonl").read_text().splitlines()
    assert len(samples) >= duration_seconds / 2, text
    # A wiped follower came back through a snapshot from its leader.
    logs = "".join(path.read_text(errors="replace") for path in (options.base_dir / "logs").glob("node*.log"))
    assert "restored snapshot" in logs
