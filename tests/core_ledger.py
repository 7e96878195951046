"""A test harness that drives one AccountsCore the way a replica does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.core import TABLE_NAMES, AccountsCore, commands
from ledger_cluster.gateway import views
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.storage import Storage

FULL_RANGE = (0, 2**32 - 1)
ACCOUNT = 0x00000000000000A1
OTHER_ACCOUNT = 0x00000000000000B2
# Outside BOUNDS_WITHOUT_FAR_ACCOUNT, which hold ACCOUNT and OTHER_ACCOUNT: a transfer to it
# crosses shards (tests/test_restore_refusals.py checks the keys).
FAR_ACCOUNT = 0x00000000000000F4
BOUNDS_WITHOUT_FAR_ACCOUNT = (62_340_941, 3_251_094_547)
PENDING = ledger_pb2.TRANSACTION_STATUS_PENDING
SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
CANCELLED = ledger_pb2.TRANSACTION_STATUS_CANCELLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS
OK = core_pb2.OUTCOME_OK


@dataclass
class Answer:
    """A core answer with its records turned into the public views the gateway would build, so
    tests compare what a client would see. Reads and writes share it; unused fields stay empty."""

    outcome: core_pb2.Outcome.ValueType
    message: str = ""
    log_index: int = 0
    account: ledger_pb2.Account = field(default_factory=ledger_pb2.Account)
    transaction: ledger_pb2.Transaction = field(default_factory=ledger_pb2.Transaction)
    item_results: list[Answer] = field(default_factory=list)
    transactions: list[ledger_pb2.Transaction] = field(default_factory=list)
    next_sequence: int = 0
    applied_index: int = 0


def viewed(result: core_pb2.CommandResult) -> Answer:
    return Answer(
        outcome=result.outcome,
        message=result.message,
        log_index=result.log_index,
        account=views.account_view(result.account, result.repeat) if result.account else ledger_pb2.Account(),
        transaction=(
            views.transaction_view(result.transaction, result.repeat)
            if result.transaction
            else ledger_pb2.Transaction()
        ),
        item_results=[viewed(item) for item in result.item_results],
    )


def viewed_read(result: core_pb2.ReadResult) -> Answer:
    return Answer(
        outcome=result.outcome,
        message=result.message,
        account=views.account_view(result.account) if result.account else ledger_pb2.Account(),
        transaction=views.transaction_view(result.transaction)
        if result.transaction
        else ledger_pb2.Transaction(),
        transactions=[views.transaction_view(data) for data in result.transactions],
        next_sequence=result.next_sequence,
        applied_index=result.applied_index,
    )


def create_item(now: int, number: int, amount: int, request_id: str = "", account_id: int = ACCOUNT) -> bytes:
    """A settled CreateTransaction command, as a log entry or a batch item."""
    return commands.create_transaction(
        account_id=account_id,
        transaction_number=number,
        amount=amount,
        description="",
        settled=True,
        request_id=request_id,
        now=now,
    )


class Ledger:
    """Drives one core the way a replica would: encoded commands, increasing log indices."""

    def __init__(self, directory: Path, bounds: tuple[int, int] = FULL_RANGE) -> None:
        self.directory = directory
        self.bounds = bounds
        self.storage = Storage(directory, TABLE_NAMES)
        self.core = AccountsCore(self.storage, *bounds)
        self.log: list[bytes] = []

    def reopen(self) -> None:
        self.storage.close()
        self.storage = Storage(self.directory, TABLE_NAMES)
        self.core = AccountsCore(self.storage, *self.bounds)

    def submit(self, command: bytes) -> Answer:
        self.log.append(command)
        return viewed(self.core.apply(command, len(self.log)))

    def create_account(self, now: int, account_id: int = ACCOUNT, request_id: str = "") -> Answer:
        return self.submit(commands.create_account(account_id, request_id, now))

    def create(
        self,
        *,
        now: int,
        number: int,
        amount: int,
        settled: bool,
        account_id: int = ACCOUNT,
        request_id: str = "",
        description: str = "",
    ) -> Answer:
        command = commands.create_transaction(
            account_id=account_id,
            transaction_number=number,
            amount=amount,
            description=description,
            settled=settled,
            request_id=request_id,
            now=now,
        )
        return self.submit(command)

    def settle(self, now: int, number: int, account_id: int = ACCOUNT) -> Answer:
        return self.submit(commands.settle_transaction(account_id, number, now))

    def cancel(self, now: int, number: int, account_id: int = ACCOUNT) -> Answer:
        return self.submit(commands.cancel_transaction(account_id, number, now))

    def account(self, account_id: int = ACCOUNT) -> ledger_pb2.Account:
        query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id))
        result = viewed_read(self.core.read(query))
        assert result.outcome == OK, core_pb2.Outcome.Name(result.outcome)
        return result.account

    def balances(self, account_id: int = ACCOUNT) -> tuple[int, int]:
        account = self.account(account_id)
        return account.available_balance, account.settled_balance

    def transaction(self, number: int, account_id: int = ACCOUNT) -> Answer:
        query = core_pb2.ReadQuery(
            get_transaction=core_pb2.GetTransactionQuery(account_id=account_id, transaction_number=number)
        )
        return viewed_read(self.core.read(query))

    def listing(self, start: int, limit: int, account_id: int = ACCOUNT) -> Answer:
        query = core_pb2.ReadQuery(
            list_transactions=core_pb2.ListTransactionsQuery(
                account_id=account_id, start_sequence=start, limit=limit
            )
        )
        return viewed_read(self.core.read(query))
