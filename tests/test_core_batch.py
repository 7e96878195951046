"""Batch log entries (group commit and the batch RPCs): several commands in one entry, applied in
order in one LMDB write transaction, each with its own ids, `now` and idempotency."""

from __future__ import annotations

from pathlib import Path

from ledger_cluster.core import commands
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import BATCH_ITEMS_MAX
from tests.core_ledger import (
    ACCOUNT,
    INSUFFICIENT_FUNDS,
    OK,
    OTHER_ACCOUNT,
    SETTLED,
    Answer,
    Ledger,
    create_item,
    viewed,
)


def create_account_item(now: int, account_id: int = ACCOUNT) -> bytes:
    return commands.create_account(account_id, "", now)


def outcomes(result: Answer) -> list[str]:
    return [core_pb2.Outcome.Name(item.outcome) for item in result.item_results]


def test_items_apply_in_order_and_each_sees_the_ones_before(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    result = ledger.submit(
        commands.batch(
            [
                create_account_item(10),
                create_item(11, 1, 500),
                create_item(12, 2, -400),  # fits only after the top-up above
                create_item(13, 3, -400),  # no longer fits
                create_item(14, 4, 100, account_id=OTHER_ACCOUNT),  # unknown account: its own failure
            ]
        )
    )
    assert result.outcome == OK
    assert outcomes(result) == ["OUTCOME_OK"] * 4 + ["OUTCOME_ACCOUNT_NOT_FOUND"]
    assert {item.log_index for item in result.item_results} == {result.log_index} == {1}
    assert [item.transaction.status for item in result.item_results[1:4]] == [
        SETTLED,
        SETTLED,
        INSUFFICIENT_FUNDS,
    ]
    assert ledger.balances() == (100, 100)
    assert ledger.core.applied_index() == 1
    assert not ledger.core.verify()


def test_a_repeated_request_id_inside_one_batch_answers_the_first(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.create_account(1)
    result = ledger.submit(commands.batch([create_item(2, 1, 300, "same"), create_item(3, 2, 300, "same")]))
    assert outcomes(result) == ["OUTCOME_OK", "OUTCOME_OK"]
    first, second = result.item_results
    assert first.transaction.id == second.transaction.id
    assert ledger.balances() == (300, 300)
    # The same bytes delivered again (a retry of the whole entry) change nothing either.
    again = ledger.submit(ledger.log[-1])
    assert [item.transaction.id for item in again.item_results] == [first.transaction.id] * 2
    assert ledger.balances() == (300, 300)


def test_a_replayed_batch_entry_changes_nothing_and_answers_the_same(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    entry = commands.batch([create_account_item(1), create_item(2, 1, 700), create_item(3, 2, -200)])
    original = ledger.submit(entry)
    ledger.reopen()
    replayed = viewed(ledger.core.apply(entry, 1))
    assert replayed == original
    assert ledger.balances() == (500, 500)


def test_malformed_batches_are_consumed_without_effect(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.create_account(1)
    nested = ledger.submit(commands.batch([commands.batch([create_item(2, 1, 5)]), create_item(3, 2, 7)]))
    assert outcomes(nested) == ["OUTCOME_INVALID_COMMAND", "OUTCOME_OK"]
    too_many = ledger.submit(commands.batch([create_item(4, 10 + n, 1) for n in range(BATCH_ITEMS_MAX + 1)]))
    assert too_many.outcome == core_pb2.OUTCOME_INVALID_COMMAND and not too_many.item_results
    assert ledger.balances() == (7, 7)
    assert ledger.core.applied_index() == 3


def test_a_replica_nobody_waits_on_reaches_the_same_state_without_building_answers(tmp_path: Path) -> None:
    entries = [
        commands.batch([create_account_item(1), create_item(2, 1, 700, "top-up"), create_item(3, 2, -200)]),
        # An overdraft, a reused request_id and a success: failures must not differ either.
        commands.batch(
            [create_item(4, 3, -900), create_item(5, 4, 50, "top-up"), create_item(6, 5, 1, "other")]
        ),
        create_item(7, 6, -100),
    ]
    leader = Ledger(tmp_path / "leader")
    follower = Ledger(tmp_path / "follower")
    answers = []
    for index, entry in enumerate(entries, start=1):
        answers.append(viewed(leader.core.apply(entry, index)))
        unanswered = follower.core.apply(entry, index, answering=False)
        assert unanswered.outcome == answers[-1].outcome == OK
        assert not unanswered.item_results and not unanswered.transaction
    assert outcomes(answers[1]) == ["OUTCOME_OK", "OUTCOME_REQUEST_ID_REUSED", "OUTCOME_OK"]
    assert answers[1].item_results[0].transaction.status == INSUFFICIENT_FUNDS
    assert answers[2].transaction.amount == -100
    assert follower.core.state_digest() == leader.core.state_digest()
    assert follower.core.verify() == leader.core.verify() == []
    assert follower.balances() == leader.balances() == (401, 401)
