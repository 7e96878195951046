"""A hypothesis state machine: a real AccountsCore on real LMDB files against a plain model.

Every command is built the way the gateway builds it (by `core.commands`, with an explicit,
strictly increasing `now`) and applied at the next log index. After every step the core's
answer (outcome, the full Account or Transaction, the log index) must equal the model's, and
every account's balances, the stored row counts and the applied index must agree.

The model follows API.md, plus the core's own documented choices where API.md leaves room:

- a top-up is refused with BALANCE_OVERFLOW when the settled balance plus every pending top-up
  plus the new amount would leave int64 (room is reserved so settling can never overflow), or
  when the account's lifetime credits (settled and pending) plus the amount would; a purchase
  that would be taken, when its lifetime debits would;
- request ids move from the recent table into the main one every RECENT_REQUESTS_MAX new ids
  (lowered here so that a run moves them many times): lookups find them in either;
- a gateway-chosen id that meets an existing object is an ID_COLLISION (the gateway draws again),
  except for an exact re-delivery of the command that created it (same payload, same `now`);
- an entry at or below the applied index answers what a repeat would answer and changes nothing.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import TypeAlias

import pytest
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

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core import TABLE_NAMES, AccountsCore, accounts_core, commands, records, tables
from ledger_cluster.gateway import account_id_for_request
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import (
    DESCRIPTION_BYTES_MAX,
    INT64_MAX,
    INT64_MIN,
    PAGE_SIZE_MAX,
    REQUEST_ID_BYTES_MAX,
)
from ledger_cluster.storage import Storage
from tests.core_ledger import Answer, viewed, viewed_read

SHARD_BOUNDS = (0, 2**32 - 1)
# Small, so a run of 50 steps moves its request ids from the recent table several times.
RECENT_REQUESTS_MAX = 3
UINT64_MAX = 2**64 - 1

OK = core_pb2.OUTCOME_OK
ACCOUNT_NOT_FOUND = core_pb2.OUTCOME_ACCOUNT_NOT_FOUND
TRANSACTION_NOT_FOUND = core_pb2.OUTCOME_TRANSACTION_NOT_FOUND
TRANSACTION_NOT_PENDING = core_pb2.OUTCOME_TRANSACTION_NOT_PENDING
REQUEST_ID_REUSED = core_pb2.OUTCOME_REQUEST_ID_REUSED
BALANCE_OVERFLOW = core_pb2.OUTCOME_BALANCE_OVERFLOW
ACCOUNT_ID_COLLISION = core_pb2.OUTCOME_ACCOUNT_ID_COLLISION
TRANSACTION_ID_COLLISION = core_pb2.OUTCOME_TRANSACTION_ID_COLLISION
INVALID_COMMAND = core_pb2.OUTCOME_INVALID_COMMAND
INVALID_PAGE_TOKEN = core_pb2.OUTCOME_INVALID_PAGE_TOKEN

PENDING = ledger_pb2.TRANSACTION_STATUS_PENDING
SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
CANCELLED = ledger_pb2.TRANSACTION_STATUS_CANCELLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS

Outcome: TypeAlias = core_pb2.Outcome.ValueType
Status: TypeAlias = ledger_pb2.TransactionStatus.ValueType

# Outcomes that a later re-delivery of the same bytes must answer identically: nothing that can
# happen afterwards turns them into something else. (ACCOUNT_NOT_FOUND, TRANSACTION_NOT_FOUND,
# BALANCE_OVERFLOW and TRANSACTION_ID_COLLISION stored nothing, so a re-delivery is evaluated
# afresh against the state it meets; the model covers those.)
FINAL_OUTCOMES: frozenset[Outcome] = frozenset(
    {OK, TRANSACTION_NOT_PENDING, REQUEST_ID_REUSED, ACCOUNT_ID_COLLISION, INVALID_COMMAND}
)


# -- strategies ------------------------------------------------------------------------------

GAPS = st.integers(min_value=1, max_value=10**6)
IDS_64 = st.integers(min_value=0, max_value=UINT64_MAX)
ACCOUNT_REQUEST_IDS = st.sampled_from(["", "", "", "acct-1", "acct-2", "ü" * (REQUEST_ID_BYTES_MAX // 2)])
TRANSACTION_REQUEST_IDS = st.sampled_from(["", "", "", "r1", "r2", "é", "x" * REQUEST_ID_BYTES_MAX])
DESCRIPTIONS = st.one_of(
    st.sampled_from(["", "coffee", "top-up"]),
    st.text(max_size=6),
    st.just("d" * DESCRIPTION_BYTES_MAX),
)
AMOUNTS = st.one_of(
    st.integers(min_value=1, max_value=1_000),
    st.integers(min_value=-1_000, max_value=-1),
    st.integers(min_value=INT64_MAX - 1_000, max_value=INT64_MAX),
    st.integers(min_value=-INT64_MAX, max_value=-INT64_MAX + 1_000),
    st.integers(min_value=INT64_MIN, max_value=INT64_MIN + 2),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX).filter(lambda amount: amount != 0),
)
LIMITS = st.one_of(
    st.integers(min_value=1, max_value=5), st.sampled_from([0, PAGE_SIZE_MAX, PAGE_SIZE_MAX + 1])
)


# -- commands, encoded exactly as the gateway encodes them ----------------------------------


@dataclass(frozen=True)
class CreateAccount:
    now: int
    account_id: int
    request_id: str

    def encode(self) -> bytes:
        return commands.create_account(self.account_id, self.request_id, self.now)


@dataclass(frozen=True)
class CreateTransaction:
    now: int
    account_id: int
    number: int
    amount: int
    description: str
    settled: bool
    request_id: str

    def encode(self) -> bytes:
        return commands.create_transaction(
            account_id=self.account_id,
            transaction_number=self.number,
            amount=self.amount,
            description=self.description,
            settled=self.settled,
            request_id=self.request_id,
            now=self.now,
        )

    def payload(self) -> tuple[int, str, bool, str]:
        return (self.amount, self.description, self.settled, self.request_id)


@dataclass(frozen=True)
class Finish:
    """Settle (target SETTLED) or cancel (target CANCELLED)."""

    now: int
    account_id: int
    number: int
    target: Status

    def encode(self) -> bytes:
        finish = commands.settle_transaction if self.target == SETTLED else commands.cancel_transaction
        return finish(self.account_id, self.number, self.now)


@dataclass(frozen=True)
class Noop:
    now: int

    def encode(self) -> bytes:
        return commands.noop(self.now)


Command = CreateAccount | CreateTransaction | Finish | Noop


# -- the model ---------------------------------------------------------------------------------


def account_hex(account_id: int) -> str:
    return f"{account_id:016x}"


@dataclass
class ModelAccount:
    account_id: int
    request_id: str
    created_at: int
    updated_at: int
    available: int = 0
    settled: int = 0
    # Sum of pending top-ups: the core keeps room for them below int64's maximum.
    pending_credits: int = 0
    pending_debits: int = 0
    # Lifetime totals of settled money in and out, which must fit int64 too.
    credits_settled: int = 0
    debits_settled: int = 0
    # Transaction numbers in the order the ledger applied them.
    order: list[int] = field(default_factory=list)

    def view(self) -> ledger_pb2.Account:
        return ledger_pb2.Account(
            id=account_hex(self.account_id),
            available_balance=self.available,
            settled_balance=self.settled,
            created_at=self.created_at,
            updated_at=self.updated_at,
            credits_settled=self.credits_settled,
            debits_settled=self.debits_settled,
            credits_pending=self.pending_credits,
            debits_pending=self.pending_debits,
        )

    def original_view(self) -> ledger_pb2.Account:
        """What CreateAccount answered when it created this account."""
        return ledger_pb2.Account(
            id=account_hex(self.account_id), created_at=self.created_at, updated_at=self.created_at
        )


@dataclass
class ModelTransaction:
    account_id: int
    number: int
    amount: int
    description: str
    settled_requested: bool
    request_id: str
    initial_status: Status
    status: Status
    created_at: int
    updated_at: int

    def payload(self) -> tuple[int, str, bool, str]:
        return (self.amount, self.description, self.settled_requested, self.request_id)

    def view(self) -> ledger_pb2.Transaction:
        return ledger_pb2.Transaction(
            id=f"{self.account_id:016x}{self.number:016x}",
            amount=self.amount,
            description=self.description,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            account_id=account_hex(self.account_id),
            settled_amount=self.amount if self.status == SETTLED else 0,
        )

    def original_view(self) -> ledger_pb2.Transaction:
        """What CreateTransaction answered when it created this transaction."""
        view = self.view()
        view.status = self.initial_status
        view.updated_at = self.created_at
        view.settled_amount = self.amount if self.initial_status == SETTLED else 0
        return view


def _failure(outcome: Outcome) -> Answer:
    return Answer(outcome=outcome)


def same_request_id(request_id: str) -> object:
    return request_id


def colliding_digest(request_id: str) -> bytes:
    """Two digests for every request id there is (by its length's parity): with it, distinct
    ids of one account collide all the time, which the real digest never lets a test see."""
    return bytes([1 + len(request_id) % 2]) * records.REQUEST_DIGEST_BYTES


@dataclass
class Model:
    accounts: dict[int, ModelAccount] = field(default_factory=dict)
    transactions: dict[tuple[int, int], ModelTransaction] = field(default_factory=dict)
    # (account id, request key) -> transaction number
    requests: dict[tuple[int, object], int] = field(default_factory=dict)
    applied_index: int = 0
    # What stands for a request id: the id itself, or (CollidingModel) its digest, so two ids
    # with one digest are one id, as the core's written collision rule says.
    request_key = staticmethod(same_request_id)

    def same_payload(self, stored: tuple[int, str, bool, str], asked: tuple[int, str, bool, str]) -> bool:
        return stored[:3] == asked[:3] and self.request_key(stored[3]) == self.request_key(asked[3])

    # -- writes --

    def apply(self, command: Command) -> Answer:
        """The answer to `command` (without log index and message); updates the model."""
        if isinstance(command, CreateAccount):
            return self._create_account(command)
        if isinstance(command, CreateTransaction):
            return self._create_transaction(command)
        if isinstance(command, Finish):
            return self._finish(command)
        return Answer(outcome=OK)

    def _create_account(self, command: CreateAccount) -> Answer:
        if len(command.request_id.encode()) > REQUEST_ID_BYTES_MAX:
            return _failure(INVALID_COMMAND)
        existing = self.accounts.get(command.account_id)
        if existing is not None:
            repeat_by_request = bool(command.request_id) and command.request_id == existing.request_id
            redelivery = command.request_id == existing.request_id and command.now == existing.created_at
            if repeat_by_request or redelivery:
                return Answer(outcome=OK, account=existing.original_view())
            return _failure(ACCOUNT_ID_COLLISION)
        account = ModelAccount(
            account_id=command.account_id,
            request_id=command.request_id,
            created_at=command.now,
            updated_at=command.now,
        )
        self.accounts[command.account_id] = account
        return Answer(outcome=OK, account=account.view())

    def _create_transaction(self, command: CreateTransaction) -> Answer:
        if (
            command.amount == 0
            or len(command.description.encode()) > DESCRIPTION_BYTES_MAX
            or len(command.request_id.encode()) > REQUEST_ID_BYTES_MAX
        ):
            return _failure(INVALID_COMMAND)
        account = self.accounts.get(command.account_id)
        if account is None:
            return _failure(ACCOUNT_NOT_FOUND)
        request = (command.account_id, self.request_key(command.request_id))
        if command.request_id and request in self.requests:
            number = self.requests[request]
            earlier = self.transactions[(command.account_id, number)]
            if self.same_payload(earlier.payload(), command.payload()):
                return Answer(outcome=OK, transaction=earlier.original_view())
            return _failure(REQUEST_ID_REUSED)
        existing = self.transactions.get((command.account_id, command.number))
        if existing is not None:
            if (
                self.same_payload(existing.payload(), command.payload())
                and existing.created_at == command.now
            ):
                return Answer(outcome=OK, transaction=existing.original_view())
            return _failure(TRANSACTION_ID_COLLISION)
        if self._overflows(account, command.amount):
            return _failure(BALANCE_OVERFLOW)
        amount = command.amount

        status = self._record_balances(account, command)
        transaction = ModelTransaction(
            account_id=command.account_id,
            number=command.number,
            amount=amount,
            description=command.description,
            settled_requested=command.settled,
            request_id=command.request_id,
            initial_status=status,
            status=status,
            created_at=command.now,
            updated_at=command.now,
        )
        self.transactions[(command.account_id, command.number)] = transaction
        account.order.append(command.number)
        if command.request_id:
            self.requests[request] = command.number
        return Answer(outcome=OK, transaction=transaction.view())

    @staticmethod
    def _overflows(account: ModelAccount, amount: int) -> bool:
        if amount > 0:
            return (
                account.settled + account.pending_credits + amount > INT64_MAX
                or account.credits_settled + account.pending_credits + amount > INT64_MAX
            )
        refused = account.available + amount < 0
        return not refused and account.debits_settled + account.pending_debits - amount > INT64_MAX

    @staticmethod
    def _record_balances(account: ModelAccount, command: CreateTransaction) -> Status:
        """The balance changes of a new transaction, as API.md states them; its status."""
        amount = command.amount
        before = (account.available, account.settled)
        if amount < 0 and account.available + amount < 0:
            status = INSUFFICIENT_FUNDS
        elif command.settled:
            status = SETTLED
            account.available += amount
            account.settled += amount
            if amount > 0:
                account.credits_settled += amount
            else:
                account.debits_settled -= amount
        else:
            status = PENDING
            if amount < 0:
                account.available += amount  # the hold
                account.pending_debits -= amount
            else:
                account.pending_credits += amount
        if (account.available, account.settled) != before:
            account.updated_at = command.now
        return status

    def _finish(self, command: Finish) -> Answer:
        transaction = self.transactions.get((command.account_id, command.number))
        if transaction is None:
            return _failure(TRANSACTION_NOT_FOUND)
        if transaction.status == command.target:
            return Answer(outcome=OK, transaction=transaction.view())
        if transaction.status != PENDING:
            return _failure(TRANSACTION_NOT_PENDING)
        account = self.accounts[command.account_id]
        before = (account.available, account.settled)
        amount = transaction.amount
        if command.target == SETTLED:
            if amount > 0:
                account.pending_credits -= amount
                account.available += amount
                account.settled += amount
                account.credits_settled += amount
            else:
                account.settled += amount  # the hold becomes settled
                account.pending_debits += amount
                account.debits_settled -= amount
        elif amount < 0:
            account.available -= amount  # the hold returns
            account.pending_debits += amount
        else:
            account.pending_credits -= amount
        if (account.available, account.settled) != before:
            account.updated_at = command.now
        transaction.status = command.target
        transaction.updated_at = command.now
        return Answer(outcome=OK, transaction=transaction.view())

    # -- reads (every answer names the applied index of the state it read) --

    def _read_failure(self, outcome: Outcome) -> Answer:
        return Answer(outcome=outcome, applied_index=self.applied_index)

    def get_account(self, account_id: int) -> Answer:
        account = self.accounts.get(account_id)
        if account is None:
            return self._read_failure(ACCOUNT_NOT_FOUND)
        return Answer(outcome=OK, account=account.view(), applied_index=self.applied_index)

    def get_transaction(self, account_id: int, number: int) -> Answer:
        transaction = self.transactions.get((account_id, number))
        if transaction is None:
            return self._read_failure(TRANSACTION_NOT_FOUND)
        return Answer(outcome=OK, transaction=transaction.view(), applied_index=self.applied_index)

    def list_transactions(self, account_id: int, start: int, limit: int) -> Answer:
        if not 1 <= limit <= PAGE_SIZE_MAX:
            return self._read_failure(INVALID_COMMAND)
        account = self.accounts.get(account_id)
        if account is None:
            return self._read_failure(ACCOUNT_NOT_FOUND)
        if start > len(account.order):
            return self._read_failure(INVALID_PAGE_TOKEN)
        page = account.order[start : start + limit]
        following = start + len(page)
        return Answer(
            outcome=OK,
            transactions=[self.transactions[(account_id, number)].view() for number in page],
            next_sequence=following if following < len(account.order) else 0,
            applied_index=self.applied_index,
        )


# -- comparison helpers --------------------------------------------------------------------------


def _outcome_name(outcome: Outcome) -> str:
    return core_pb2.Outcome.Name(outcome)


def check_answer(actual: Answer, expected: Answer) -> None:
    """Equal in every field but the free-text message, which is present exactly on failures."""
    assert bool(actual.message) == (actual.outcome != OK), (
        f"{_outcome_name(actual.outcome)} with message {actual.message!r}"
    )
    stripped = replace(actual, message="")
    assert stripped == expected, f"core answered\n{stripped}\nmodel expects\n{expected}"


def without_log_index(result: Answer) -> Answer:
    return replace(result, log_index=0)


@dataclass(frozen=True)
class LogEntry:
    command: Command
    data: bytes
    index: int
    result: Answer


# -- the state machine ------------------------------------------------------------------------------


class CoreModelMachine(RuleBasedStateMachine):
    model_class: type[Model] = Model

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="core-model-"))
        self.storage = Storage(self.directory / "shard", TABLE_NAMES)
        self.core = AccountsCore(self.storage, *SHARD_BOUNDS, recent_requests_max=RECENT_REQUESTS_MAX)
        self.model = self.model_class()
        self.now = 0
        self.log: list[LogEntry] = []
        # First answers, kept apart from the model: a repeat must return exactly these.
        self.account_answers: dict[str, ledger_pb2.Account] = {}
        self.request_answers: dict[tuple[int, object], ledger_pb2.Transaction] = {}

    def teardown(self) -> None:
        self.storage.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- plumbing --

    def tick(self, gap: int) -> int:
        self.now += gap
        return self.now

    def submit(self, command: Command, data: bytes | None = None) -> Answer:
        """Apply `command` (or its exact bytes `data`) at the next log index, on both sides."""
        encoded = command.encode() if data is None else data
        index = self.model.applied_index + 1
        expected = self.model.apply(command)
        expected.log_index = index
        self.model.applied_index = index
        actual = viewed(self.core.apply(encoded, index))
        check_answer(actual, expected)
        self.log.append(LogEntry(command, encoded, index, actual))
        return actual

    def digest(self) -> str:
        return self.core.state_digest()[1]

    def read(self, query: core_pb2.ReadQuery) -> Answer:
        return viewed_read(self.core.read(query))

    def draw_account_id(self, data: st.DataObject) -> int:
        """Mostly an existing account, sometimes any id (usually unknown)."""
        if self.model.accounts and data.draw(st.integers(0, 3), label="pick") > 0:
            return data.draw(st.sampled_from(sorted(self.model.accounts)), label="account")
        return data.draw(IDS_64, label="account id")

    def draw_transaction(self, data: st.DataObject, status: Status | None = None) -> ModelTransaction:
        keys = sorted(
            key
            for key, transaction in self.model.transactions.items()
            if status is None or transaction.status == status
        )
        return self.model.transactions[data.draw(st.sampled_from(keys), label="transaction")]

    # -- setup --

    @initialize(
        start=st.integers(min_value=1, max_value=2 * 10**18),
        random_id=IDS_64,
        request_id=ACCOUNT_REQUEST_IDS,
    )
    def start_with_one_account(self, start: int, random_id: int, request_id: str) -> None:
        self.now = start
        self.create_account(gap=1, random_id=random_id, request_id=request_id)

    # -- accounts --

    @rule(gap=GAPS, random_id=IDS_64, request_id=ACCOUNT_REQUEST_IDS)
    def create_account(self, gap: int, random_id: int, request_id: str) -> None:
        # As the gateway does: a request_id decides the account id, so repeats meet the account.
        account_id = account_id_for_request(request_id) if request_id else random_id
        result = self.submit(CreateAccount(self.tick(gap), account_id, request_id))
        if request_id and result.outcome == OK:
            first = self.account_answers.setdefault(request_id, result.account)
            assert result.account == first, "a CreateAccount repeat must return the original account"
            assert result.account.updated_at == result.account.created_at

    @precondition(lambda self: bool(self.model.accounts))
    @rule(gap=GAPS, data=st.data())
    def create_account_with_taken_id(self, gap: int, data: st.DataObject) -> None:
        account_id = data.draw(st.sampled_from(sorted(self.model.accounts)), label="account")
        before = self.digest()
        result = self.submit(CreateAccount(self.tick(gap), account_id, ""))
        assert result.outcome == ACCOUNT_ID_COLLISION
        assert self.digest() == before

    # -- transactions --

    def _create(self, command: CreateTransaction) -> Answer:
        key = (command.account_id, self.model.request_key(command.request_id))
        is_new_request = bool(command.request_id) and key not in self.model.requests
        result = self.submit(command)
        if is_new_request and result.outcome == OK:
            self.request_answers[key] = result.transaction
        return result

    @rule(
        gap=GAPS,
        data=st.data(),
        number=IDS_64,
        amount=AMOUNTS,
        description=DESCRIPTIONS,
        settled=st.booleans(),
        request_id=TRANSACTION_REQUEST_IDS,
    )
    def create_transaction(
        self,
        *,
        gap: int,
        data: st.DataObject,
        number: int,
        amount: int,
        description: str,
        settled: bool,
        request_id: str,
    ) -> None:
        account_id = self.draw_account_id(data)
        command = CreateTransaction(
            self.tick(gap), account_id, number, amount, description, settled, request_id
        )
        self._create(command)

    @precondition(lambda self: bool(self.model.accounts))
    @rule(
        gap=GAPS,
        data=st.data(),
        number=IDS_64,
        amount=st.integers(min_value=1, max_value=1_000),
        settled=st.booleans(),
        request_id=TRANSACTION_REQUEST_IDS,
    )
    def top_up(
        self, *, gap: int, data: st.DataObject, number: int, amount: int, settled: bool, request_id: str
    ) -> None:
        account_id = data.draw(st.sampled_from(sorted(self.model.accounts)), label="account")
        self._create(CreateTransaction(self.tick(gap), account_id, number, amount, "", settled, request_id))

    @precondition(lambda self: bool(self.model.accounts))
    @rule(
        gap=GAPS,
        data=st.data(),
        number=IDS_64,
        share=st.fractions(min_value=0, max_value=1.2),
        settled=st.booleans(),
        request_id=TRANSACTION_REQUEST_IDS,
    )
    def purchase(
        self,
        *,
        gap: int,
        data: st.DataObject,
        number: int,
        share: Fraction,
        settled: bool,
        request_id: str,
    ) -> None:
        """A purchase of about `share` of the available balance (above 1: insufficient funds)."""
        account = self.model.accounts[data.draw(st.sampled_from(sorted(self.model.accounts)))]
        amount = -min(max(1, int(account.available * share)), -INT64_MIN)
        command = CreateTransaction(
            self.tick(gap), account.account_id, number, amount, "", settled, request_id
        )
        self._create(command)

    @precondition(lambda self: bool(self.model.accounts))
    @rule(gap=GAPS, data=st.data(), number=IDS_64, settled=st.booleans(), request_id=TRANSACTION_REQUEST_IDS)
    def create_transaction_at_a_limit(
        self, gap: int, data: st.DataObject, number: int, settled: bool, request_id: str
    ) -> None:
        """Amounts right at the edges: spend exactly the available balance or one more; top up
        exactly to int64's maximum (counting pending top-ups) or one more."""
        account = self.model.accounts[data.draw(st.sampled_from(sorted(self.model.accounts)))]
        room = INT64_MAX - max(account.settled, account.credits_settled) - account.pending_credits
        candidates = [-account.available, -account.available - 1, room, room + 1]
        amounts = [amount for amount in candidates if amount != 0 and INT64_MIN <= amount <= INT64_MAX]
        amount = data.draw(st.sampled_from(amounts), label="amount")
        command = CreateTransaction(
            self.tick(gap), account.account_id, number, amount, "", settled, request_id
        )
        self._create(command)

    @precondition(lambda self: bool(self.model.requests))
    @rule(gap=GAPS, data=st.data(), number=IDS_64)
    def repeat_request_id_same_payload(self, gap: int, data: st.DataObject, number: int) -> None:
        """A client retry: same request, so the gateway stamps a new `now` and a new number."""
        key = data.draw(st.sampled_from(sorted(self.model.requests)), label="request")
        original = self.model.transactions[(key[0], self.model.requests[key])]
        command = CreateTransaction(
            self.tick(gap),
            original.account_id,
            number,
            original.amount,
            original.description,
            original.settled_requested,
            original.request_id,
        )
        before = self.digest()
        result = self.submit(command)
        assert result.outcome == OK
        assert result.transaction == self.request_answers[key], "a repeat must return the original result"
        assert result.transaction.status == original.initial_status
        assert result.transaction.updated_at == result.transaction.created_at == original.created_at
        assert self.digest() == before, "a repeat must change nothing"

    @precondition(lambda self: bool(self.model.requests))
    @rule(
        gap=GAPS, data=st.data(), number=IDS_64, change=st.sampled_from(["amount", "description", "settled"])
    )
    def reuse_request_id_other_payload(self, gap: int, data: st.DataObject, number: int, change: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.requests)), label="request")
        original = self.model.transactions[(key[0], self.model.requests[key])]
        amount, description, settled = original.amount, original.description, original.settled_requested
        if change == "amount":
            amount = -amount if amount != INT64_MIN else 1
        elif change == "description":
            description = description[:-1] if description else "changed"
        else:
            settled = not settled
        command = CreateTransaction(
            self.tick(gap), original.account_id, number, amount, description, settled, original.request_id
        )
        before = self.digest()
        result = self.submit(command)
        assert result.outcome == REQUEST_ID_REUSED
        assert self.digest() == before

    @precondition(lambda self: bool(self.model.transactions))
    @rule(gap=GAPS, data=st.data(), same_payload=st.booleans(), fresh_request=st.booleans())
    def create_transaction_with_taken_number(
        self, gap: int, data: st.DataObject, same_payload: bool, fresh_request: bool
    ) -> None:
        """A gateway-drawn number that is taken: ID collision, nothing stored (not even the new
        request_id), unless this is an exact re-delivery (covered elsewhere: `now` differs here)."""
        taken = self.draw_transaction(data)
        amount = taken.amount if same_payload else (1 if taken.amount != 1 else 2)
        request_id = f"fresh-{self.model.applied_index}" if fresh_request else ""
        command = CreateTransaction(
            self.tick(gap),
            taken.account_id,
            taken.number,
            amount,
            taken.description,
            taken.settled_requested,
            request_id,
        )
        # With colliding digests a "fresh" id may stand for one taken already: then that answers.
        known_request = (taken.account_id, self.model.request_key(request_id)) in self.model.requests
        before = self.digest()
        result = self.submit(command)
        if not (request_id and known_request):
            assert result.outcome == TRANSACTION_ID_COLLISION
        assert self.digest() == before

    @rule(
        gap=GAPS,
        data=st.data(),
        number=IDS_64,
        problem=st.sampled_from(["zero", "description", "request_id", "account_request_id"]),
    )
    def invalid_command(self, gap: int, data: st.DataObject, number: int, problem: str) -> None:
        """Limits the gateway enforces; the core must refuse them too and store nothing."""
        now = self.tick(gap)
        command: Command
        if problem == "account_request_id":
            request_id = "ü" * (REQUEST_ID_BYTES_MAX // 2) + "x"
            command = CreateAccount(now, account_id_for_request(request_id), request_id)
        else:
            amount = 0 if problem == "zero" else data.draw(AMOUNTS, label="amount")
            description = "é" * (DESCRIPTION_BYTES_MAX // 2) + "x" if problem == "description" else ""
            request_id = "y" * (REQUEST_ID_BYTES_MAX + 1) if problem == "request_id" else ""
            account_id = self.draw_account_id(data)
            command = CreateTransaction(now, account_id, number, amount, description, True, request_id)
        before = self.digest()
        result = self.submit(command)
        assert result.outcome == INVALID_COMMAND
        assert self.digest() == before

    # -- settle and cancel --

    def _finish(self, gap: int, account_id: int, number: int, target: Status) -> None:
        existing = self.model.transactions.get((account_id, number))
        status_before = None if existing is None else existing.status
        view_before = None if existing is None else existing.view()
        now = self.tick(gap)
        result = self.submit(Finish(now, account_id, number, target))
        # The rules of API.md, stated directly (the model says the same).
        if status_before is None:
            assert result.outcome == TRANSACTION_NOT_FOUND
        elif status_before == target:
            assert result.outcome == OK
            assert result.transaction == view_before, "a retry must return the transaction unchanged"
        elif status_before == PENDING:
            assert result.outcome == OK
            assert result.transaction.status == target
            assert result.transaction.updated_at == now
        else:
            assert result.outcome == TRANSACTION_NOT_PENDING

    def has_pending(self) -> bool:
        return any(transaction.status == PENDING for transaction in self.model.transactions.values())

    @precondition(lambda self: self.has_pending())
    @rule(gap=GAPS, data=st.data(), action=st.sampled_from([SETTLED, CANCELLED]))
    def finish_pending(self, gap: int, data: st.DataObject, action: Status) -> None:
        """Settle (action SETTLED) or cancel (action CANCELLED) a pending transaction."""
        chosen = self.draw_transaction(data, PENDING)
        self._finish(gap, chosen.account_id, chosen.number, action)

    @precondition(lambda self: bool(self.model.transactions))
    @rule(gap=GAPS, data=st.data(), action=st.sampled_from([SETTLED, CANCELLED]))
    def finish_any(self, gap: int, data: st.DataObject, action: Status) -> None:
        """Settle or cancel a transaction in any state: settled, cancelled, insufficient funds."""
        chosen = self.draw_transaction(data)
        self._finish(gap, chosen.account_id, chosen.number, action)

    @rule(gap=GAPS, data=st.data(), action=st.sampled_from([SETTLED, CANCELLED]), number=IDS_64)
    def finish_unknown(self, gap: int, data: st.DataObject, action: Status, number: int) -> None:
        """An unknown number on a known account, or an unknown account (usually)."""
        self._finish(gap, self.draw_account_id(data), number, action)

    @rule(gap=GAPS)
    def noop(self, gap: int) -> None:
        before = self.digest()
        assert self.submit(Noop(self.tick(gap))).outcome == OK
        assert self.digest() == before

    # -- delivery: at least once, applied exactly once --

    @precondition(lambda self: bool(self.log))
    @rule(data=st.data())
    def redeliver_at_new_index(self, data: st.DataObject) -> None:
        """The same bytes committed again (a retry whose first attempt did commit)."""
        entry = data.draw(st.sampled_from(self.log), label="entry")
        before = self.digest()
        result = self.submit(entry.command, entry.data)
        if entry.result.outcome in FINAL_OUTCOMES:
            assert without_log_index(result) == without_log_index(entry.result), (
                "a re-delivered command must return the original result"
            )
        if entry.result.outcome == OK:
            assert self.digest() == before, "a re-delivered command must change nothing"

    @precondition(lambda self: bool(self.log))
    @rule(data=st.data())
    def reapply_at_old_index(self, data: st.DataObject) -> None:
        """A journal replay after restart: entries at or below the applied index are skipped,
        answering what a repeat of them would answer."""
        entry = data.draw(st.sampled_from(self.log), label="entry")
        applied_index, before = self.core.state_digest()
        repeat = copy.deepcopy(self.model).apply(entry.command)
        repeat.log_index = entry.index
        result = viewed(self.core.apply(entry.data, entry.index))
        check_answer(result, repeat)
        if entry.result.outcome in FINAL_OUTCOMES:
            assert without_log_index(result) == without_log_index(entry.result)
        # Not asserted for the other outcomes: the core re-evaluates rather than returning a stored
        # result, so e.g. a BALANCE_OVERFLOW entry may now answer OK for a transaction it does
        # not store (DESIGN.md section 2 rule 3 says "its stored result is returned").
        assert self.core.state_digest() == (applied_index, before), "a replayed entry must change nothing"

    # -- reads --

    @rule(data=st.data())
    def get_account(self, data: st.DataObject) -> None:
        account_id = self.draw_account_id(data)
        query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id))
        check_answer(self.read(query), self.model.get_account(account_id))

    @rule(data=st.data(), which=st.sampled_from(["known", "unknown number", "other account"]), number=IDS_64)
    def get_transaction(self, data: st.DataObject, which: str, number: int) -> None:
        account_id = self.draw_account_id(data)
        if which != "unknown number" and self.model.transactions:
            chosen = self.draw_transaction(data)
            number = chosen.number
            if which == "known":
                account_id = chosen.account_id
        query = core_pb2.ReadQuery(
            get_transaction=core_pb2.GetTransactionQuery(account_id=account_id, transaction_number=number)
        )
        check_answer(self.read(query), self.model.get_transaction(account_id, number))

    @rule(data=st.data(), limit=LIMITS)
    def list_transactions(self, data: st.DataObject, limit: int) -> None:
        account_id = self.draw_account_id(data)
        account = self.model.accounts.get(account_id)
        count = 0 if account is None else len(account.order)
        start = data.draw(st.integers(min_value=0, max_value=count + 2), label="start")
        query = core_pb2.ReadQuery(
            list_transactions=core_pb2.ListTransactionsQuery(
                account_id=account_id, start_sequence=start, limit=limit
            )
        )
        check_answer(self.read(query), self.model.list_transactions(account_id, start, limit))

    @precondition(lambda self: bool(self.model.accounts))
    @rule(data=st.data(), limit=st.integers(min_value=1, max_value=4))
    def list_every_page(self, data: st.DataObject, limit: int) -> None:
        """Following next_sequence from 0 yields every transaction once, in apply order."""
        account = self.model.accounts[data.draw(st.sampled_from(sorted(self.model.accounts)))]
        seen: list[str] = []
        start = 0
        for _ in range(len(account.order) // limit + 1):
            query = core_pb2.ReadQuery(
                list_transactions=core_pb2.ListTransactionsQuery(
                    account_id=account.account_id, start_sequence=start, limit=limit
                )
            )
            result = self.read(query)
            check_answer(result, self.model.list_transactions(account.account_id, start, limit))
            seen.extend(transaction.id for transaction in result.transactions)
            start = result.next_sequence
            if start == 0:
                break
        assert start == 0, "paging did not end"
        assert seen == [f"{account.account_id:016x}{number:016x}" for number in account.order]

    # -- invariants --

    @invariant()
    def balances_match(self) -> None:
        for account_id, account in sorted(self.model.accounts.items()):
            query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id))
            result = self.read(query)
            assert result.outcome == OK
            assert result.account == account.view(), f"core {result.account} model {account.view()}"
            assert 0 <= result.account.available_balance <= result.account.settled_balance
            assert 0 <= account.pending_credits <= INT64_MAX - account.settled

    @invariant()
    def core_verifies(self) -> None:
        assert self.core.verify() == []

    @invariant()
    def applied_index_matches(self) -> None:
        assert self.core.applied_index() == self.model.applied_index

    @invariant()
    def nothing_else_stored(self) -> None:
        """Failed commands store nothing: row counts equal the model's."""
        with self.storage.read() as view:
            counts = {
                name: view.count(name)
                for name in (tables.ACCOUNTS, tables.TRANSACTIONS, tables.ACCOUNT_TRANSACTIONS)
            }
            recent = sum(
                len(value) // tables.RECENT_REQUEST.size for _, value in view.iterate(tables.RECENT_REQUESTS)
            )
            request_ids = view.count(tables.REQUESTS) + recent
        assert counts == {
            tables.ACCOUNTS: len(self.model.accounts),
            tables.TRANSACTIONS: len(self.model.transactions),
            tables.ACCOUNT_TRANSACTIONS: len(self.model.transactions),
        }
        assert request_ids == len(self.model.requests)
        assert recent < RECENT_REQUESTS_MAX


SETTINGS = settings(
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_core_matches_model() -> None:
    run_state_machine_as_test(CoreModelMachine, settings=SETTINGS)


class CollidingModel(Model):
    request_key = staticmethod(colliding_digest)


class CollidingCoreModelMachine(CoreModelMachine):
    model_class = CollidingModel


def test_core_matches_model_when_request_digests_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """The collision rule, run as a model: with a digest that collides for most pairs of
    request ids, the core answers exactly as a model that keys requests by that digest."""
    monkeypatch.setattr(accounts_core, "request_digest", colliding_digest)
    run_state_machine_as_test(CollidingCoreModelMachine, settings=SETTINGS)
