"""A hypothesis state machine over two real AccountsCores (two shards on real LMDB files) and
the messages between them: transfers on one shard and across both, settled and pending, settles
(full and partial), cancels, expiry by replicated time, and the credit shard's commands and the
debit shard's finishes delivered late, twice, or out of order, as gateways and drivers racing
each other would deliver them.

After every step: both states verify, and no credit leg shows anything its debit leg does not
(a credit is never seen without its debit; a resolved credit leg agrees with its debit leg). At
the end every owed step is driven home, and then every transfer's legs agree, nothing is owed,
and the legs' settled amounts sum to zero: money moved, none made."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger_cluster.core import AccountsCore, commands, records, tables, verification
from ledger_cluster.core.records import TransactionRecord, decode_account, decode_transaction
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.sharding import shard_key
from ledger_cluster.transfer_flow import Step, Unfinished, commands_for_credit_shard, finish_command

LOW, HIGH = (0, 2**31 - 1), (2**31, 2**32 - 1)
ACCOUNTS_PER_SHARD = 3
START_BALANCE = 100
OVERDRAFT_LIMITS = (0, 50, 0)
SECOND_NS = 1_000_000_000
OK = core_pb2.OUTCOME_OK


def accounts_in(bounds: tuple[int, int], count: int) -> list[int]:
    found: list[int] = []
    candidate = 1
    while len(found) < count:
        if bounds[0] <= shard_key(candidate) <= bounds[1]:
            found.append(candidate)
        candidate += 1
    return found


@dataclass
class Message:
    """Commands on their way to a shard; `transfer` names the transfer they are about."""

    shard: int
    commands: list[bytes]
    transfer: tuple[int, int]
    finishes: bool  # a finish for the debit shard, not the credit shard's commands


class TransferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="transfer-model-"))
        self.cores = [
            AccountsCore.open(self.directory / "low", *LOW),
            AccountsCore.open(self.directory / "high", *HIGH),
        ]
        self.indexes = [0, 0]
        self.now = 1_700_000_000 * SECOND_NS
        self.next_number = 1
        self.accounts = accounts_in(LOW, ACCOUNTS_PER_SHARD) + accounts_in(HIGH, ACCOUNTS_PER_SHARD)
        self.transfers: list[tuple[int, int]] = []
        self.in_flight: list[Message] = []
        self.requests: dict[str, tuple[int, int, int, bool]] = {}

    # -- plumbing --

    def shard_of(self, account_id: int) -> int:
        return 0 if LOW[0] <= shard_key(account_id) <= LOW[1] else 1

    def apply(self, shard: int, command: bytes) -> core_pb2.CommandResult:
        self.indexes[shard] += 1
        self.now += 1000
        return self.cores[shard].apply(command, self.indexes[shard])

    def tick(self) -> int:
        self.now += 1000
        return self.now

    def read_leg(self, account_id: int, number: int) -> TransactionRecord | None:
        query = core_pb2.ReadQuery(
            get_transaction=core_pb2.GetTransactionQuery(account_id=account_id, transaction_number=number)
        )
        result = self.cores[self.shard_of(account_id)].read(query)
        return decode_transaction(result.transaction) if result.outcome == OK else None

    def account(self, account_id: int) -> records.AccountRecord:
        query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id))
        return decode_account(self.cores[self.shard_of(account_id)].read(query).account)

    def legs(self, shard: int) -> list[TransactionRecord]:
        with self.cores[shard]._storage.read() as view:
            return [
                record
                for _, value in view.iterate(tables.TRANSACTIONS)
                if (record := decode_transaction(value)).flags & records.LEG_FLAGS
            ]

    # -- rules --

    @initialize()
    def fund(self) -> None:
        for account_id, limit in zip(self.accounts, OVERDRAFT_LIMITS * 2, strict=True):
            shard = self.shard_of(account_id)
            assert (
                self.apply(
                    shard, commands.create_account(account_id, "", self.tick(), overdraft_limit=limit)
                ).outcome
                == OK
            )
            top_up = commands.create_transaction(
                account_id=account_id,
                transaction_number=self.next_number,
                amount=START_BALANCE,
                description="",
                settled=True,
                request_id="",
                now=self.tick(),
            )
            self.next_number += 1
            assert self.apply(shard, top_up).outcome == OK

    @rule(
        debit=st.integers(0, 5),
        credit=st.integers(0, 5),
        amount=st.integers(1, 160),
        settled=st.booleans(),
        timeout_seconds=st.sampled_from([0, 0, 1, 3]),
        request_id=st.sampled_from(["", "", "a", "b"]),
    )
    def create_transfer(  # noqa: PLR0917 - hypothesis passes the drawn values by keyword
        self, debit: int, credit: int, amount: int, settled: bool, timeout_seconds: int, request_id: str
    ) -> None:
        if debit == credit:
            return
        debit_id, credit_id = self.accounts[debit], self.accounts[credit]
        timeout_seconds = 0 if settled else timeout_seconds
        before = self.account(debit_id)
        number = self.next_number
        self.next_number += 1
        command = commands.create_transfer(
            debit_account_id=debit_id,
            transfer_number=number,
            credit_account_id=credit_id,
            amount=amount,
            description="",
            settled=settled,
            request_id=request_id,
            now=self.tick(),
            timeout_seconds=timeout_seconds,
        )
        result = self.apply(self.shard_of(debit_id), command)
        key = f"{debit_id}:{request_id}"
        payload = (credit_id, amount, timeout_seconds, settled)
        if request_id and key in self.requests:
            expected = OK if self.requests[key] == payload else core_pb2.OUTCOME_REQUEST_ID_REUSED
            assert result.outcome == expected
            return
        assert result.outcome == OK, result.message
        leg = decode_transaction(result.transaction)
        refused = before.available_balance - amount < -before.overdraft_limit
        assert (leg.status == records.INSUFFICIENT_FUNDS) == refused
        if request_id:
            self.requests[key] = payload
        self.transfers.append((debit_id, number))

    @precondition(lambda self: self.transfers)
    @rule(data=st.data())
    def drive(self, data: st.DataObject) -> None:
        """A gateway or a driver reads the debit leg and sends its credit shard's commands."""
        debit_id, number = data.draw(st.sampled_from(self.transfers))
        leg = self.read_leg(debit_id, number)
        assert leg is not None
        if not leg.flags & records.OWED_WORK:
            return
        items = commands_for_credit_shard(Unfinished(leg, b"", ""), self.tick())
        self.in_flight.append(
            Message(self.shard_of(leg.counterparty_account_id), items, (debit_id, number), False)
        )

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), keep=st.booleans())
    def deliver(self, data: st.DataObject, keep: bool) -> None:
        """Deliver any message in flight, now or again later (`keep`)."""
        position = data.draw(st.integers(0, len(self.in_flight) - 1))
        message = self.in_flight[position] if keep else self.in_flight.pop(position)
        answers = [self.apply(message.shard, command) for command in message.commands]
        if message.finishes:
            return
        leg = self.read_leg(*message.transfer)
        assert leg is not None
        step = Step(Unfinished(leg, b"", ""))
        for answer in answers:
            if answer.outcome == OK:
                step.credit_leg = answer.transaction
        if step.credit_leg:
            debit_shard = self.shard_of(message.transfer[0])
            self.in_flight.append(
                Message(debit_shard, [finish_command(step, self.tick())], message.transfer, True)
            )

    @precondition(lambda self: self.transfers)
    @rule(data=st.data(), settle=st.booleans(), amount=st.integers(0, 160))
    def resolve(self, data: st.DataObject, settle: bool, amount: int) -> None:
        debit_id, number = data.draw(st.sampled_from(self.transfers))
        before = self.read_leg(debit_id, number)
        assert before is not None
        now = self.tick()
        result = self.apply(
            self.shard_of(debit_id), commands.resolve_transfer(debit_id, number, settle, amount, now)
        )
        after = self.read_leg(debit_id, number)
        assert after is not None
        if before.status != records.PENDING:
            assert after.status == before.status
            return
        if before.expires_at and now >= before.expires_at:
            assert (result.outcome, after.status) == (core_pb2.OUTCOME_TRANSACTION_EXPIRED, records.EXPIRED)
        elif settle and amount > -before.amount:
            assert (
                result.outcome == core_pb2.OUTCOME_INVALID_SETTLE_AMOUNT and after.status == records.PENDING
            )
        elif settle:
            assert (after.status, after.settled_amount) == (records.SETTLED, -(amount or -before.amount))
        else:
            assert after.status == records.CANCELLED

    @rule(seconds=st.integers(0, 4))
    def pass_time(self, seconds: int) -> None:
        """The leaders propose ExpireDue once their clock passes a deadline."""
        self.now += seconds * SECOND_NS
        for shard in (0, 1):
            deadline = self.cores[shard].earliest_deadline()
            if deadline is not None and deadline <= self.now:
                assert self.apply(shard, commands.expire_due(self.now)).outcome == OK
                assert (self.cores[shard].earliest_deadline() or self.now + 1) > self.now

    # -- invariants --

    @invariant()
    def states_verify(self) -> None:
        for core in self.cores:
            assert core.verify() == []

    @invariant()
    def credit_legs_never_run_ahead(self) -> None:
        for shard in (0, 1):
            for leg in self.legs(shard):
                if not leg.flags & records.CREDIT_LEG:
                    continue
                debit = self.read_leg(leg.counterparty_account_id, leg.linked_number)
                assert debit is not None and debit.flags & records.DEBIT_LEG, "a credit without its debit"
                assert -debit.amount == leg.amount
                if leg.status == records.PENDING:
                    assert debit.status == records.PENDING or debit.flags & records.RESOLVE_OWED
                else:
                    assert (debit.status, -debit.settled_amount) == (leg.status, leg.settled_amount)

    def teardown(self) -> None:
        try:
            self.drive_home()
        finally:
            for core in self.cores:
                core.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def drive_home(self) -> None:
        """What the drivers do once the network heals: every owed step, until none is owed."""
        for _ in range(len(self.transfers) + 2):
            owed = [leg for shard in (0, 1) for leg in self.legs(shard) if leg.flags & records.OWED_WORK]
            if not owed:
                break
            for leg in owed:
                credit_shard = self.shard_of(leg.counterparty_account_id)
                answers = [
                    self.apply(credit_shard, item)
                    for item in commands_for_credit_shard(Unfinished(leg, b"", ""), self.tick())
                ]
                step = Step(Unfinished(leg, b"", ""), credit_leg=answers[-1].transaction)
                assert all(answer.outcome == OK for answer in answers)
                assert (
                    self.apply(self.shard_of(leg.account_id), finish_command(step, self.tick())).outcome == OK
                )
        summaries = []
        for shard, core in enumerate(self.cores):
            assert core.verify() == []
            with core._storage.read() as view:
                summaries.append(verification.transfer_summary(view))
            assert summaries[-1].unfinished == 0, f"shard {shard} still owes work"
        assert (
            sum(summary.debit_legs_hash for summary in summaries) % 2**128
            == sum(summary.credit_legs_hash for summary in summaries) % 2**128
        )
        settled = sum((summary.currencies or {})[""].settled for summary in summaries if summary.currencies)
        pending = sum((summary.currencies or {})[""].pending for summary in summaries if summary.currencies)
        assert (settled, pending) == (0, 0)
        total = sum(self.account(account_id).settled_balance for account_id in self.accounts)
        assert total == START_BALANCE * len(self.accounts)


def test_transfers_between_two_shards_against_their_invariants() -> None:
    run_state_machine_as_test(
        TransferMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
