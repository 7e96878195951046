"""The core's transfer commands, expiry and second-wave fields on one real LMDB shard (both
legs of a same-shard transfer, and the cross-shard commands as the credit and debit shard see
them), and verification catching indexes that disagree with the rows they list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger_cluster.core import commands, records, tables
from ledger_cluster.core.records import decode_transaction
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import INT64_MAX
from tests.core_ledger import ACCOUNT, OTHER_ACCOUNT, Ledger

SECOND_NS = 1_000_000_000
NOW = 1_700_000_000 * SECOND_NS
OK = core_pb2.OUTCOME_OK


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "shard")
    assert opened.create_account(NOW).outcome == OK
    assert opened.create_account(NOW, OTHER_ACCOUNT).outcome == OK
    assert opened.create(now=NOW, number=1, amount=100, settled=True).outcome == OK
    yield opened
    opened.storage.close()


def apply(ledger: Ledger, command: bytes) -> core_pb2.CommandResult:
    ledger.log.append(command)
    return ledger.core.apply(command, len(ledger.log))


def test_expire_due_expires_what_is_due_and_nothing_else(ledger: Ledger) -> None:
    for number, timeout_seconds in [(10, 1), (11, 5)]:
        command = commands.create_transaction(
            account_id=ACCOUNT, transaction_number=number, amount=-10, description="", settled=False,
            request_id="", now=NOW, timeout_seconds=timeout_seconds,
        )  # fmt: skip
        assert apply(ledger, command).outcome == OK
    assert ledger.core.earliest_deadline() == NOW + SECOND_NS
    assert ledger.balances() == (80, 100)
    result = apply(ledger, commands.expire_due(NOW + 2 * SECOND_NS))
    assert (result.outcome, result.message) == (OK, "expired 1")
    assert ledger.transaction(10).transaction.status == records.EXPIRED
    assert ledger.transaction(11).transaction.status == records.PENDING
    assert ledger.core.earliest_deadline() == NOW + 5 * SECOND_NS
    assert ledger.balances() == (90, 100)
    assert ledger.core.verify() == []


def test_a_settle_after_the_deadline_expires_instead(ledger: Ledger) -> None:
    command = commands.create_transaction(
        account_id=ACCOUNT, transaction_number=10, amount=-10, description="", settled=False,
        request_id="", now=NOW, timeout_seconds=1,
    )  # fmt: skip
    apply(ledger, command)
    late = apply(ledger, commands.settle_transaction(ACCOUNT, 10, NOW + SECOND_NS))
    assert late.outcome == core_pb2.OUTCOME_TRANSACTION_EXPIRED
    assert ledger.transaction(10).transaction.status == records.EXPIRED
    assert ledger.core.earliest_deadline() is None
    assert ledger.balances() == (100, 100)


def test_a_same_shard_transfer_is_whole_in_one_entry(ledger: Ledger) -> None:
    command = commands.create_transfer(
        debit_account_id=ACCOUNT, transfer_number=7, credit_account_id=OTHER_ACCOUNT, amount=30,
        description="t", settled=False, request_id="", now=NOW,
    )  # fmt: skip
    result = apply(ledger, command)
    assert result.outcome == OK and result.credit_leg
    debit, credit = decode_transaction(result.transaction), decode_transaction(result.credit_leg)
    assert (debit.amount, credit.amount, credit.linked_number, credit.counterparty_account_id) == (
        -30,
        30,
        7,
        ACCOUNT,
    )
    assert not debit.flags & records.OWED_WORK
    assert apply(ledger, commands.resolve_transfer(ACCOUNT, 7, True, 12, NOW + 1)).outcome == OK
    assert ledger.balances() == (88, 88)
    assert ledger.balances(OTHER_ACCOUNT) == (12, 12)
    assert ledger.account(OTHER_ACCOUNT).credits_pending == 0
    assert ledger.core.verify() == []


def test_a_credit_leg_steps_past_a_taken_number_and_is_found_again(ledger: Ledger) -> None:
    """The credit account already has a transaction numbered like the transfer: the leg goes to
    the next free number, and a re-delivery finds it there instead of storing a second one."""
    assert ledger.create(now=NOW, number=7, amount=5, settled=True, account_id=OTHER_ACCOUNT).outcome == OK
    debit_leg = records.TransactionRecord(
        0xC0FFEE, 7, 0, -30, records.SETTLED, records.SETTLED, NOW, NOW, settled_amount=-30,
        flags=records.DEBIT_LEG | records.CREDIT_OWED, linked_number=7, counterparty_account_id=OTHER_ACCOUNT,
    )  # fmt: skip
    first = apply(ledger, commands.credit_leg_of(debit_leg, (), "", NOW))
    again = apply(ledger, commands.credit_leg_of(debit_leg, (), "", NOW + 1))
    assert first.outcome == again.outcome == OK
    assert decode_transaction(first.transaction).transaction_number == 8
    assert again.transaction == first.transaction and again.repeat
    assert ledger.balances(OTHER_ACCOUNT) == (35, 35)


def test_a_credit_that_would_overflow_is_stored_cancelled_and_the_debit_reversed(tmp_path: Path) -> None:
    """Two shards' worth of commands on two ledgers: C refuses the credit for overflow, D's
    finish reverses the debit, and nothing moved."""
    debit_shard, credit_shard = (
        Ledger(tmp_path / "d", (0, 2**31 - 1)),
        Ledger(tmp_path / "c", (2**31, 2**32 - 1)),
    )
    try:
        debit_id = next(candidate for candidate in range(1, 1000) if debit_shard.core.owns_account(candidate))
        credit_id = next(
            candidate for candidate in range(1, 1000) if credit_shard.core.owns_account(candidate)
        )
        debit_shard.create_account(NOW, debit_id)
        debit_shard.create(now=NOW, number=1, amount=100, settled=True, account_id=debit_id)
        credit_shard.create_account(NOW, credit_id)
        credit_shard.create(now=NOW, number=1, amount=INT64_MAX - 10, settled=True, account_id=credit_id)
        command = commands.create_transfer(
            debit_account_id=debit_id, transfer_number=5, credit_account_id=credit_id, amount=50,
            description="", settled=True, request_id="", now=NOW,
        )  # fmt: skip
        debit_leg = decode_transaction(apply(debit_shard, command).transaction)
        assert debit_leg.flags & records.CREDIT_OWED and debit_shard.balances(debit_id) == (50, 50)
        credit = apply(credit_shard, commands.credit_leg_of(debit_leg, (), "", NOW))
        assert decode_transaction(credit.transaction).status == records.CANCELLED
        finished = apply(debit_shard, commands.finish_transfer(debit_id, 5, credit.transaction, 0, NOW + 1))
        reversed_leg = decode_transaction(finished.transaction)
        assert reversed_leg.status == records.CANCELLED and reversed_leg.flags & records.CREDIT_REFUSED
        assert debit_shard.balances(debit_id) == (100, 100)
        assert credit_shard.balances(credit_id) == (INT64_MAX - 10, INT64_MAX - 10)
        assert debit_shard.core.verify() == [] and credit_shard.core.verify() == []
    finally:
        debit_shard.storage.close()
        credit_shard.storage.close()


@pytest.mark.parametrize("table", [tables.TRANSFER_WORK, tables.EXPIRIES, tables.METADATA])
def test_verification_catches_an_index_row_without_its_record(ledger: Ledger, table: str) -> None:
    keys = {
        tables.TRANSFER_WORK: tables.transaction_key(ACCOUNT, 1),
        tables.EXPIRIES: tables.expiry_key(NOW, ACCOUNT, 1),
        tables.METADATA: tables.metadata_key(ACCOUNT, tables.METADATA_OF_TRANSACTION, 1),
    }
    value = records.encode_metadata((("k", "v"),)) if table == tables.METADATA else b""
    ledger.storage.write(lambda transaction: transaction.put(table, keys[table], value))
    assert ledger.core.verify() != []


def test_a_restore_rebuilds_the_deadlines(ledger: Ledger, tmp_path: Path) -> None:
    command = commands.create_transaction(
        account_id=ACCOUNT, transaction_number=10, amount=-10, description="", settled=False,
        request_id="", now=NOW, timeout_seconds=3,
    )  # fmt: skip
    apply(ledger, command)
    snapshot = tmp_path / "snapshot"
    ledger.core.write_snapshot(snapshot)
    restored = Ledger(tmp_path / "restored")
    try:
        restored.core.restore_snapshot(snapshot)
        assert restored.core.earliest_deadline() == NOW + 3 * SECOND_NS
        assert restored.core.verify() == []
    finally:
        restored.storage.close()


def test_metadata_is_part_of_a_transactions_idempotency_payload(ledger: Ledger) -> None:
    def create(metadata: records.Metadata) -> core_pb2.CommandResult:
        command = commands.create_transaction(
            account_id=ACCOUNT, transaction_number=len(ledger.log) + 100, amount=1, description="",
            settled=True, request_id="r", now=NOW, metadata=metadata,
        )  # fmt: skip
        return apply(ledger, command)

    first = create((("a", "1"),))
    assert first.outcome == OK and records.decode_metadata(first.metadata) == (("a", "1"),)
    assert create((("a", "1"),)).repeat
    assert create((("a", "2"),)).outcome == core_pb2.OUTCOME_REQUEST_ID_REUSED
    unsorted = apply(ledger, commands.envelope(
        core_pb2.COMMAND_TYPE_CREATE_TRANSACTION, NOW,
        core_pb2.CreateTransactionCommand(
            account_id=ACCOUNT, transaction_number=999, amount=1,
            metadata=[core_pb2.MetadataEntry(key="b", value=""), core_pb2.MetadataEntry(key="a", value="")],
        ).SerializeToString(),
    ))  # fmt: skip
    assert unsorted.outcome == core_pb2.OUTCOME_INVALID_COMMAND
