"""The progress check of the nemesis on hand-written histories: a shard that has a leader for
longer than the bound after a heal without acknowledging a write fails the run; one that
recovers, has no leader, is cut short by the run's end, or is asked for nothing passes. No
cluster: leadership is given as samples, as the runner's sampler records it."""

from __future__ import annotations

from ledger_cluster.internal.v1 import node_pb2
from ledger_cluster.nemesis import checks
from ledger_cluster.nemesis import history as h
from ledger_cluster.nemesis.faults import FaultRecord
from ledger_cluster.nemesis.leadership import LeadershipSample, ShardLeader, shard_leaders

STALLED_ACCOUNT = "00000000000000aa"  # on shard-01
HEALTHY_ACCOUNT = "f0000000000000bb"  # on shard-02
SHARD_OF_ACCOUNT = {STALLED_ACCOUNT: "shard-01", HEALTHY_ACCOUNT: "shard-02"}
LEADER = ShardLeader("node01", 3)
OTHER_LEADER = ShardLeader("node02", 4)
HEAL_SECONDS = 10.0
BOUND_SECONDS = checks.PROGRESS_AFTER_HEAL_SECONDS_MAX


class Run:
    """Operations, one a half second per account, and leadership samples once a second."""

    def __init__(self) -> None:
        self.operations: list[h.Operation] = []
        self.leadership: list[LeadershipSample] = []

    def writes(
        self,
        account_id: str,
        from_seconds: float,
        until_seconds: float,
        outcome: str = h.OUTCOME_OK,
        code: str = "OK",
    ) -> None:
        moment = from_seconds
        while moment < until_seconds:
            self.operations.append(
                h.Operation(
                    op_id=len(self.operations),
                    client=0,
                    kind=h.TOP_UP,
                    invoke_seconds=moment,
                    request={"account_id": account_id, "amount": 1, "request_id": f"r{len(self.operations)}"},
                    complete_seconds=moment + 0.1,
                    outcome=outcome,
                    code=code,
                )
            )
            moment += 0.5

    def failing(self, account_id: str, from_seconds: float, until_seconds: float) -> None:
        self.writes(account_id, from_seconds, until_seconds, h.OUTCOME_FAILED, "UNAVAILABLE")

    def led(self, from_seconds: float, until_seconds: float, leader: ShardLeader | None = LEADER) -> None:
        """shard-01 led by `leader` (None: no leader), shard-02 always by node03."""
        for second in range(int(from_seconds), int(until_seconds) + 1):
            leaders = {"shard-02": ShardLeader("node03", 2)}
            if leader is not None:
                leaders["shard-01"] = leader
            self.leadership.append(LeadershipSample(float(second), leaders))

    def check(self, faults: list[FaultRecord] | None = None) -> checks.CheckResult:
        healed = [FaultRecord("kill-leader", "node02", HEAL_SECONDS - 4.0, healed_seconds=HEAL_SECONDS)]
        return checks.check_progress_after_heal(
            self.operations, faults or healed, self.leadership, SHARD_OF_ACCOUNT.__getitem__
        )


def stalled_run(until_seconds: float) -> Run:
    """Both shards acknowledge writes until the fault; after it heals, shard-01 keeps its
    leader but fails every write until `until_seconds`; shard-02 goes on acknowledging."""
    run = Run()
    run.writes(STALLED_ACCOUNT, 0.0, 6.0)
    run.failing(STALLED_ACCOUNT, 6.0, until_seconds)
    run.writes(HEALTHY_ACCOUNT, 0.0, until_seconds)
    run.led(0.0, until_seconds)
    return run


def test_a_shard_whose_leader_acknowledges_nothing_after_the_heal_fails() -> None:
    result = stalled_run(until_seconds=30.0).check()

    assert result.violation_count == 1, result.violations
    assert result.violations == [
        "shard-01: kill-leader at 6.0 s healed at 10.0 s; from 10.0 s the shard had a leader for"
        " 19.5 s (node01 (term 3)) and acknowledged no write (none before 29.5 s, when the run"
        " ended or the shard lost its leader), while 20 writes to it failed or stayed unknown"
    ]


def test_a_shard_that_acknowledges_a_write_3_s_after_the_heal_passes() -> None:
    run = Run()
    run.failing(STALLED_ACCOUNT, 6.0, HEAL_SECONDS + 3.0)
    run.writes(STALLED_ACCOUNT, HEAL_SECONDS + 3.0, 30.0)
    run.writes(HEALTHY_ACCOUNT, 0.0, 30.0)
    run.led(0.0, 30.0)

    result = run.check()

    assert result.passed, result.violations
    assert result.detail.startswith("1 heals x 2 shards: 2 acknowledged a write within 10 s with a leader")


def test_a_stall_that_ends_past_the_bound_reports_when_the_next_write_was_acknowledged() -> None:
    run = stalled_run(until_seconds=HEAL_SECONDS + 14.0)
    run.writes(STALLED_ACCOUNT, HEAL_SECONDS + 14.0, 30.0)
    run.led(HEAL_SECONDS + 15.0, 30.0)

    result = run.check()

    assert "had a leader for 14.1 s (node01 (term 3)) and acknowledged no write (the next at 24.1 s)" in (
        "".join(result.violations)
    )


def test_a_shard_without_a_leader_is_not_stalled() -> None:
    run = Run()
    run.writes(STALLED_ACCOUNT, 0.0, 6.0)
    run.failing(STALLED_ACCOUNT, 6.0, 30.0)
    run.writes(HEALTHY_ACCOUNT, 0.0, 30.0)
    run.led(0.0, 5.0)
    run.led(6.0, 30.0, leader=None)

    result = run.check()

    assert result.passed, result.violations
    assert "1 had no leader after the heal" in result.detail


def test_a_window_the_run_cuts_shorter_than_the_bound_passes() -> None:
    result = stalled_run(until_seconds=HEAL_SECONDS + BOUND_SECONDS - 2.0).check()

    assert result.passed, result.violations
    assert "1 were cut short" in result.detail
    healed_late = [FaultRecord("kill-all", "every node", 27.0, healed_seconds=31.0)]
    late = stalled_run(until_seconds=30.0).check(healed_late)
    assert late.passed and late.detail.endswith("; 1 faults healed after the last operation")


def test_only_time_with_a_leader_counts_whichever_leader_it_is() -> None:
    """node01 leads until 14 s, nobody until 20 s, node02 from then on."""
    recovered = Run()
    recovered.failing(STALLED_ACCOUNT, 6.0, 23.0)
    recovered.writes(STALLED_ACCOUNT, 23.0, 30.0)
    recovered.writes(HEALTHY_ACCOUNT, 0.0, 30.0)
    recovered.led(0.0, 14.0)
    recovered.led(15.0, 19.0, leader=None)
    recovered.led(20.0, 30.0, leader=OTHER_LEADER)
    assert recovered.check().passed  # 13 s after the heal, but a leader for only 4 + 3.1 s

    stalled = stalled_run(until_seconds=30.0)
    stalled.leadership = []
    stalled.led(0.0, 14.0)
    stalled.led(15.0, 19.0, leader=None)
    stalled.led(20.0, 30.0, leader=OTHER_LEADER)
    result = stalled.check()
    assert result.violation_count == 1, result.violations
    assert (
        "the shard had a leader for 13.5 s (2 leaders in turn, from node01 (term 3) to node02 (term 4))"
        in result.violations[0]
    )


def test_a_later_fault_that_spares_the_leader_neither_hides_nor_repeats_the_stall() -> None:
    """Faults come a few seconds apart, so a window ending at the next fault would never reach
    the bound; one stall across three heals is one violation."""
    faults = [
        FaultRecord("kill-leader", "node02", 6.0, healed_seconds=HEAL_SECONDS),
        FaultRecord("kill-follower", "node02", 12.0, healed_seconds=14.0),
        FaultRecord("transfer-leadership", "shard-02", 16.0, healed_seconds=17.0),
    ]

    result = stalled_run(until_seconds=30.0).check(faults)

    assert result.violation_count == 1, result.violations
    assert result.violations[0].startswith("shard-01: kill-leader at 6.0 s healed at 10.0 s;")


def test_a_shard_nobody_writes_to_or_that_only_refuses_on_the_merits_is_not_stalled() -> None:
    for refused in (False, True):
        run = Run()
        run.writes(STALLED_ACCOUNT, 0.0, 6.0)
        if refused:
            run.writes(STALLED_ACCOUNT, 6.0, 30.0, h.OUTCOME_FAILED, "FAILED_PRECONDITION")
        run.writes(HEALTHY_ACCOUNT, 0.0, 30.0)
        run.led(0.0, 30.0)

        result = run.check()

        assert result.passed, result.violations
        assert "1 saw no write fail" in result.detail


def test_the_leader_is_the_single_quorum_claim_at_the_highest_term() -> None:
    def replica(node_id: str, term: int, *, leading: bool, quorum: bool = True) -> node_pb2.StatusResponse:
        view = node_pb2.ReplicaStatus(
            shard_id="shard-01", node_id=node_id, is_leader=leading, term=term, has_quorum=quorum
        )
        return node_pb2.StatusResponse(node_id=node_id, replicas=[view])

    settled = [replica("node01", 3, leading=True), replica("node02", 3, leading=False)]
    assert shard_leaders(settled) == {"shard-01": ShardLeader("node01", 3)}
    electing = [replica("node01", 3, leading=True), replica("node02", 4, leading=False)]
    assert shard_leaders(electing) == {}
    cut_off = [replica("node01", 3, leading=True, quorum=False)]
    assert shard_leaders(cut_off) == {}
