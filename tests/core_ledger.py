"""A test harness that drives one AccountsCore the way a replica does."""

from __future__ import annotations

from pathlib import Path

from ledger_cluster.api.v1 import core_pb2, ledger_pb2
from ledger_cluster.core import TABLE_NAMES, AccountsCore, commands
from ledger_cluster.storage import Storage

FULL_RANGE = (0, 2**32 - 1)
ACCOUNT = 0x00000000000000A1
OTHER_ACCOUNT = 0x00000000000000B2
PENDING = ledger_pb2.TRANSACTION_STATUS_PENDING
SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
CANCELLED = ledger_pb2.TRANSACTION_STATUS_CANCELLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS
OK = core_pb2.OUTCOME_OK


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

    def submit(self, command: bytes) -> core_pb2.CommandResult:
        self.log.append(command)
        return self.core.apply(command, len(self.log))

    def create_account(
        self, now: int, account_id: int = ACCOUNT, request_id: str = ""
    ) -> core_pb2.CommandResult:
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
    ) -> core_pb2.CommandResult:
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

    def settle(self, now: int, number: int, account_id: int = ACCOUNT) -> core_pb2.CommandResult:
        return self.submit(commands.settle_transaction(account_id, number, now))

    def cancel(self, now: int, number: int, account_id: int = ACCOUNT) -> core_pb2.CommandResult:
        return self.submit(commands.cancel_transaction(account_id, number, now))

    def account(self, account_id: int = ACCOUNT) -> ledger_pb2.Account:
        query = core_pb2.ReadQuery(get_account=core_pb2.GetAccountQuery(account_id=account_id))
        result = self.core.read(query)
        assert result.outcome == OK, core_pb2.Outcome.Name(result.outcome)
        return result.account

    def balances(self, account_id: int = ACCOUNT) -> tuple[int, int]:
        account = self.account(account_id)
        return account.available_balance, account.settled_balance

    def transaction(self, number: int, account_id: int = ACCOUNT) -> core_pb2.ReadResult:
        query = core_pb2.ReadQuery(
            get_transaction=core_pb2.GetTransactionQuery(account_id=account_id, transaction_number=number)
        )
        return self.core.read(query)

    def listing(self, start: int, limit: int, account_id: int = ACCOUNT) -> core_pb2.ReadResult:
        query = core_pb2.ReadQuery(
            list_transactions=core_pb2.ListTransactionsQuery(
                account_id=account_id, start_sequence=start, limit=limit
            )
        )
        return self.core.read(query)
