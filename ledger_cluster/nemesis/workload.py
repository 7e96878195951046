"""The clients of a nemesis run: concurrent threads that drive the public gateway with a seeded
mix of account creation (some accounts with an overdraft limit), top-ups, purchases (settled and
pending), settles, cancels, reads and deliberate duplicates of earlier writes (the same
request_id and payload), recording every call in the history.

Transfers (the "transfers" and "mixed" workloads): between two accounts of one shard or, mostly,
of two; settled or pending; a pending one later settled in full or in part, cancelled, or left
to expire after a short timeout_seconds (some settles and cancels race that expiry); unary and
batch (CreateTransfers) creations; duplicates; GetTransfer reads. Both legs of every transfer
the clients learn go into the pool the transaction reads draw from.

Clients never retry on their own: a call that fails with an open outcome stays "unknown" in the
history unless a later duplicate settles it, which is exactly what the checks examine. Every
transaction's and transfer's description is its request_id, so the final listing says which
logical write each stored transaction (or transfer's debit leg) came from.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.gateway import account_id_for_request
from ledger_cluster.ids import format_account_id
from ledger_cluster.nemesis import history as h

Stub = ledger_pb2_grpc.LedgerServiceStub

OPERATION_TIMEOUT_SECONDS = 2.0
LIST_PAGE_SIZE = 1000
# Pages one list-transactions operation reads before it gives up (an account grows by a few
# transactions a second, far below this).
LIST_PAGES_MAX = 100
INITIAL_ACCOUNTS = 12
INITIAL_ACCOUNTS_TIMEOUT_SECONDS = 60.0
SETUP_RETRY_PAUSE_SECONDS = 0.1
# Bounded pools the clients draw their targets from.
ACCOUNTS_MAX = 2_000
PENDING_POOL_MAX = 2_000
WRITE_POOL_MAX = 2_000
TRANSACTION_POOL_MAX = 5_000
TOP_UP_AMOUNT_MAX = 1_000
PURCHASE_AMOUNT_MAX = 1_200
SETTLED_FRACTION = 0.6
CONSISTENT_FRACTION = 0.75
# Of a settle or cancel, the chance that its pending transaction stays in the pool, so a later
# settle or cancel repeats or contradicts it.
PENDING_KEPT_FRACTION = 0.3
# A CreateTransactions call; each of its items is recorded as its own top-up or purchase.
BATCH_CREATE = "batch-create"
BATCH_ITEMS = (2, 8)
# How often each kind is chosen, relative to the others (the transactions workload).
OPERATION_WEIGHTS: dict[str, int] = {
    h.CREATE_ACCOUNT: 3,
    h.TOP_UP: 22,
    h.PURCHASE: 22,
    h.SETTLE: 9,
    h.CANCEL: 6,
    h.DUPLICATE: 8,
    BATCH_CREATE: 5,
    h.GET_ACCOUNT: 10,
    h.GET_TRANSACTION: 12,
    h.LIST_TRANSACTIONS: 8,
}
# Clients pause this long when they have nothing to do (an empty pool), not to spin.
IDLE_PAUSE_SECONDS = 0.01

# Which operations the clients draw from: "transactions" (the original mix), "transfers"
# (transfers, with top-ups that fund them and reads of both), "mixed" (both).
WORKLOAD_TRANSACTIONS = "transactions"
WORKLOAD_TRANSFERS = "transfers"
WORKLOAD_MIXED = "mixed"
WORKLOADS = (WORKLOAD_TRANSACTIONS, WORKLOAD_TRANSFERS, WORKLOAD_MIXED)
WORKLOAD_DEFAULT = WORKLOAD_MIXED
# A CreateTransfers call; each of its items is recorded as its own create-transfer.
BATCH_TRANSFERS = "batch-transfers"
BATCH_TRANSFER_ITEMS = (2, 6)
TRANSFER_WEIGHTS: dict[str, int] = {
    h.CREATE_TRANSFER: 20,
    h.SETTLE_TRANSFER: 8,
    h.CANCEL_TRANSFER: 4,
    h.DUPLICATE_TRANSFER: 6,
    BATCH_TRANSFERS: 4,
    h.GET_TRANSFER: 6,
}
# What a transfers-only run keeps of the transaction mix: accounts, the top-ups that fund the
# transfers, and reads of accounts and of legs.
TRANSFERS_ONLY_BASE_WEIGHTS: dict[str, int] = {
    h.CREATE_ACCOUNT: 3,
    h.TOP_UP: 22,
    h.GET_ACCOUNT: 10,
    h.GET_TRANSACTION: 8,
    h.LIST_TRANSACTIONS: 8,
}
TRANSFER_AMOUNT_MAX = 500
TRANSFER_SETTLED_FRACTION = 0.4
# Of pending transfers, those created with a timeout_seconds drawn from TRANSFER_TIMEOUT_SECONDS:
# short, so many expire during the run and some settles and cancels race the expiry.
TRANSFER_TIMEOUT_FRACTION = 0.4
TRANSFER_TIMEOUT_SECONDS = (2, 5)
# Of transfers, those whose credit account is chosen on the debit account's shard (when the
# clients know one); the rest pick any other account, mostly on another shard.
SAME_SHARD_FRACTION = 0.3
# Of settle-transfers: a partial amount (1..amount-1), the full amount spelt out, else 0 (all).
PARTIAL_SETTLE_FRACTION = 0.4
EXPLICIT_FULL_SETTLE_FRACTION = 0.1
PENDING_TRANSFER_POOL_MAX = 2_000
TRANSFER_POOL_MAX = 5_000
# Overdraft limits drawn at account creation (mostly none).
OVERDRAFT_LIMITS = (0, 0, 0, 500, 2_000)


def operation_weights(workload: str) -> dict[str, int]:
    if workload == WORKLOAD_TRANSACTIONS:
        return dict(OPERATION_WEIGHTS)
    if workload == WORKLOAD_TRANSFERS:
        return {**TRANSFERS_ONLY_BASE_WEIGHTS, **TRANSFER_WEIGHTS}
    if workload == WORKLOAD_MIXED:
        return {**OPERATION_WEIGHTS, **TRANSFER_WEIGHTS}
    raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")


def transaction_view(transaction: ledger_pb2.Transaction) -> dict[str, Any]:
    return {
        "id": transaction.id,
        "account_id": transaction.account_id,
        "amount": transaction.amount,
        "description": transaction.description,
        "status": ledger_pb2.TransactionStatus.Name(transaction.status),
        "settled_amount": transaction.settled_amount,
        "transfer_id": transaction.transfer_id,
        "counterparty_account_id": transaction.counterparty_account_id,
        "expires_at": transaction.expires_at,
        "created_at": transaction.created_at,
        "updated_at": transaction.updated_at,
    }


def account_view(account: ledger_pb2.Account) -> dict[str, Any]:
    return {
        "id": account.id,
        "available_balance": account.available_balance,
        "settled_balance": account.settled_balance,
        "overdraft_limit": account.overdraft_limit,
        "credits_settled": account.credits_settled,
        "debits_settled": account.debits_settled,
        "credits_pending": account.credits_pending,
        "debits_pending": account.debits_pending,
    }


def transfer_view(transfer: ledger_pb2.Transfer) -> dict[str, Any]:
    return {
        "id": transfer.id,
        "debit_account_id": transfer.debit_account_id,
        "credit_account_id": transfer.credit_account_id,
        "amount": transfer.amount,
        "description": transfer.description,
        "status": ledger_pb2.TransferStatus.Name(transfer.status),
        "settled_amount": transfer.settled_amount,
        "expires_at": transfer.expires_at,
        "debit_transaction_id": transfer.debit_transaction_id,
        "credit_transaction_id": transfer.credit_transaction_id,
        "created_at": transfer.created_at,
        "updated_at": transfer.updated_at,
    }


@dataclass(frozen=True)
class _Write:
    account_id: str
    amount: int
    settled: bool
    request_id: str

    def request(self) -> ledger_pb2.CreateTransactionRequest:
        return ledger_pb2.CreateTransactionRequest(
            account_id=self.account_id,
            amount=self.amount,
            description=self.request_id,
            settled=self.settled,
            request_id=self.request_id,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "amount": self.amount,
            "settled": self.settled,
            "request_id": self.request_id,
        }


@dataclass(frozen=True)
class _TransferWrite:
    debit_account_id: str
    credit_account_id: str
    amount: int
    settled: bool
    timeout_seconds: int
    request_id: str
    same_shard: bool

    def request(self) -> ledger_pb2.CreateTransferRequest:
        return ledger_pb2.CreateTransferRequest(
            debit_account_id=self.debit_account_id,
            credit_account_id=self.credit_account_id,
            amount=self.amount,
            description=self.request_id,
            settled=self.settled,
            request_id=self.request_id,
            timeout_seconds=self.timeout_seconds,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "debit_account_id": self.debit_account_id,
            "credit_account_id": self.credit_account_id,
            "amount": self.amount,
            "settled": self.settled,
            "timeout_seconds": self.timeout_seconds,
            "request_id": self.request_id,
            "same_shard": self.same_shard,
        }


@dataclass(frozen=True)
class _PendingTransfer:
    transfer_id: str
    amount: int


class _Pools:
    """What the clients have learned so far, shared between them (bounded, thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accounts: list[str] = []
        self.pending: deque[str] = deque(maxlen=PENDING_POOL_MAX)
        self.writes: deque[_Write] = deque(maxlen=WRITE_POOL_MAX)
        self.transactions: deque[str] = deque(maxlen=TRANSACTION_POOL_MAX)
        self.transfer_writes: deque[_TransferWrite] = deque(maxlen=WRITE_POOL_MAX)
        self.transfers: deque[str] = deque(maxlen=TRANSFER_POOL_MAX)
        self.pending_transfers: deque[_PendingTransfer] = deque(maxlen=PENDING_TRANSFER_POOL_MAX)

    def add_account(self, account_id: str) -> None:
        with self.lock:
            if len(self.accounts) < ACCOUNTS_MAX and account_id not in self.accounts:
                self.accounts.append(account_id)

    def learn_transfer(self, transfer: ledger_pb2.Transfer) -> None:
        with self.lock:
            self.transfers.append(transfer.id)
            self.transactions.extend(
                leg for leg in (transfer.debit_transaction_id, transfer.credit_transaction_id) if leg
            )
            if transfer.status == ledger_pb2.TRANSFER_STATUS_PENDING:
                self.pending_transfers.append(_PendingTransfer(transfer.id, transfer.amount))

    def learn_transaction(self, transaction: ledger_pb2.Transaction) -> None:
        with self.lock:
            self.transactions.append(transaction.id)
            if transaction.status == ledger_pb2.TRANSACTION_STATUS_PENDING:
                self.pending.append(transaction.id)


class Workload:
    """`clients` threads against one gateway until `stop()`."""

    def __init__(
        self,
        gateway_address: str,
        history: h.History,
        seed: int,
        clients: int,
        *,
        workload: str = WORKLOAD_DEFAULT,
        shard_of: Callable[[str], str] | None = None,
    ) -> None:
        self._history = history
        self._seed = seed
        self._clients = clients
        self._weights = operation_weights(workload)
        # Without it every transfer counts as "any pair" (the same shard only by chance).
        self._shard_of = None if shard_of is None else functools.lru_cache(maxsize=ACCOUNTS_MAX)(shard_of)
        self._pools = _Pools()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._channel = grpc.insecure_channel(
            gateway_address,
            options=[("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)],
        )
        self._stub = Stub(self._channel)
        self._request_counter = 0
        self._counter_lock = threading.Lock()

    # -- lifecycle --

    def create_initial_accounts(self, count: int = INITIAL_ACCOUNTS) -> list[str]:
        """Accounts every client can use from the start; each is re-sent with its request_id
        until it is answered (the cluster is healthy now, but a call may still time out)."""
        deadline = time.monotonic() + INITIAL_ACCOUNTS_TIMEOUT_SECONDS
        for index in range(count):
            request_id = f"nemesis-{self._seed}-initial-{index}"
            overdraft_limit = OVERDRAFT_LIMITS[index % len(OVERDRAFT_LIMITS)]
            while not self._create_account(-1, request_id, overdraft_limit):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not create {count} initial accounts in time")
                time.sleep(SETUP_RETRY_PAUSE_SECONDS)
        return list(self._pools.accounts)

    def start(self) -> None:
        for client in range(self._clients):
            thread = threading.Thread(
                target=self._run_client, args=(client,), name=f"nemesis-client-{client}"
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask every client to stop after its current call, and wait for them."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        self._channel.close()

    def known_accounts(self) -> list[str]:
        with self._pools.lock:
            return list(self._pools.accounts)

    # -- one client --

    def _run_client(self, client: int) -> None:
        rng = random.Random(f"{self._seed}-client-{client}")
        kinds = list(self._weights)
        weights = [self._weights[kind] for kind in kinds]
        actions: dict[str, Callable[[int, random.Random], bool]] = {
            h.CREATE_ACCOUNT: lambda c, r: self._create_account(
                c, self._new_request_id(c), r.choice(OVERDRAFT_LIMITS)
            ),
            h.TOP_UP: lambda c, r: self._create_transaction(c, r, h.TOP_UP),
            h.PURCHASE: lambda c, r: self._create_transaction(c, r, h.PURCHASE),
            h.SETTLE: lambda c, r: self._finish_pending(c, r, h.SETTLE),
            h.CANCEL: lambda c, r: self._finish_pending(c, r, h.CANCEL),
            h.DUPLICATE: self._duplicate,
            BATCH_CREATE: self._batch_create,
            h.GET_ACCOUNT: self._get_account,
            h.GET_TRANSACTION: self._get_transaction,
            h.LIST_TRANSACTIONS: self._list_transactions,
            h.CREATE_TRANSFER: self._create_transfer,
            h.DUPLICATE_TRANSFER: self._duplicate_transfer,
            BATCH_TRANSFERS: self._batch_transfers,
            h.SETTLE_TRANSFER: lambda c, r: self._finish_transfer(c, r, h.SETTLE_TRANSFER),
            h.CANCEL_TRANSFER: lambda c, r: self._finish_transfer(c, r, h.CANCEL_TRANSFER),
            h.GET_TRANSFER: self._get_transfer,
        }
        while not self._stopping.is_set() and not self._history.is_full:
            kind = rng.choices(kinds, weights)[0]
            if not actions[kind](client, rng):
                time.sleep(IDLE_PAUSE_SECONDS)

    def _new_request_id(self, client: int) -> str:
        with self._counter_lock:
            self._request_counter += 1
            return f"nemesis-{self._seed}-{client}-{self._request_counter}"

    def _pick(self, rng: random.Random, pool: list[str] | deque[str]) -> str | None:
        with self._pools.lock:
            return pool[rng.randrange(len(pool))] if pool else None

    def _call(self, operation: h.Operation, call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        try:
            result = call()
        except grpc.RpcError as error:
            self._history.fail(operation, error)
            return None
        except Exception as error:  # a client bug must not hide its call from the checks
            self._history.complete(operation, h.OUTCOME_UNKNOWN, {"error": repr(error)}, "CLIENT_ERROR")
            return None
        self._history.complete(operation, h.OUTCOME_OK, result)
        return result

    # -- writes --

    def _create_account(self, client: int, request_id: str, overdraft_limit: int = 0) -> bool:
        derived = format_account_id(account_id_for_request(request_id))
        operation = self._history.invoke(
            client,
            h.CREATE_ACCOUNT,
            {"request_id": request_id, "account_id": derived, "overdraft_limit": overdraft_limit},
        )

        def call() -> dict[str, Any]:
            request = ledger_pb2.CreateAccountRequest(request_id=request_id, overdraft_limit=overdraft_limit)
            account = self._stub.CreateAccount(request, timeout=OPERATION_TIMEOUT_SECONDS).account
            self._pools.add_account(account.id)
            return {"account": account_view(account)}

        return self._call(operation, call) is not None

    def _create_transaction(self, client: int, rng: random.Random, kind: str) -> bool:
        account_id = self._pick(rng, self._pools.accounts)
        if account_id is None:
            return False
        if kind == h.TOP_UP:
            amount = rng.randint(1, TOP_UP_AMOUNT_MAX)
        else:
            amount = -rng.randint(1, PURCHASE_AMOUNT_MAX)
        write = _Write(account_id, amount, rng.random() < SETTLED_FRACTION, self._new_request_id(client))
        with self._pools.lock:
            self._pools.writes.append(write)
        self._send_write(client, kind, write)
        return True

    def _send_write(self, client: int, kind: str, write: _Write) -> None:
        operation = self._history.invoke(client, kind, write.as_dict())

        def call() -> dict[str, Any]:
            response = self._stub.CreateTransaction(write.request(), timeout=OPERATION_TIMEOUT_SECONDS)
            self._pools.learn_transaction(response.transaction)
            return {"transaction": transaction_view(response.transaction)}

        self._call(operation, call)

    def _batch_create(self, client: int, rng: random.Random) -> bool:
        """Several writes in one CreateTransactions call, each recorded as its own operation
        with the call's invoke and completion times and its own item's outcome."""
        writes = []
        for _ in range(rng.randint(*BATCH_ITEMS)):
            account_id = self._pick(rng, self._pools.accounts)
            if account_id is None:
                return False
            top_up = rng.random() < 0.5
            amount = rng.randint(1, TOP_UP_AMOUNT_MAX) if top_up else -rng.randint(1, PURCHASE_AMOUNT_MAX)
            writes.append(
                _Write(account_id, amount, rng.random() < SETTLED_FRACTION, self._new_request_id(client))
            )
        with self._pools.lock:
            self._pools.writes.extend(writes)
        operations = [
            self._history.invoke(
                client, h.TOP_UP if write.amount > 0 else h.PURCHASE, {**write.as_dict(), "batch": True}
            )
            for write in writes
        ]
        request = ledger_pb2.CreateTransactionsRequest(items=[write.request() for write in writes])
        try:
            results = self._stub.CreateTransactions(request, timeout=OPERATION_TIMEOUT_SECONDS).results
        except grpc.RpcError as error:
            for operation in operations:
                self._history.fail(operation, error)
            return True
        except Exception as error:  # a client bug must not hide its calls from the checks
            for operation in operations:
                self._history.complete(operation, h.OUTCOME_UNKNOWN, {"error": repr(error)}, "CLIENT_ERROR")
            return True
        for operation, result in zip(operations, results, strict=True):
            if result.HasField("transaction"):
                self._pools.learn_transaction(result.transaction)
                self._history.complete(
                    operation, h.OUTCOME_OK, {"transaction": transaction_view(result.transaction)}
                )
            else:
                outcome, code, reason = h.classify_item_error(result.error.code, result.error.reason)
                self._history.complete(operation, outcome, {}, code, reason)
        return True

    def _duplicate(self, client: int, rng: random.Random) -> bool:
        with self._pools.lock:
            if not self._pools.writes:
                return False
            write = self._pools.writes[rng.randrange(len(self._pools.writes))]
        self._send_write(client, h.DUPLICATE, write)
        return True

    def _finish_pending(self, client: int, rng: random.Random, kind: str) -> bool:
        with self._pools.lock:
            if not self._pools.pending:
                return False
            index = rng.randrange(len(self._pools.pending))
            transaction_id = self._pools.pending[index]
            if rng.random() >= PENDING_KEPT_FRACTION:
                del self._pools.pending[index]
        operation = self._history.invoke(client, kind, {"transaction_id": transaction_id})

        def call() -> dict[str, Any]:
            if kind == h.SETTLE:
                settle = ledger_pb2.SettleTransactionRequest(transaction_id=transaction_id)
                transaction = self._stub.SettleTransaction(
                    settle, timeout=OPERATION_TIMEOUT_SECONDS
                ).transaction
            else:
                cancel = ledger_pb2.CancelTransactionRequest(transaction_id=transaction_id)
                transaction = self._stub.CancelTransaction(
                    cancel, timeout=OPERATION_TIMEOUT_SECONDS
                ).transaction
            return {"transaction": transaction_view(transaction)}

        self._call(operation, call)
        return True

    # -- transfers --

    def _transfer_pair(self, rng: random.Random) -> tuple[str, str, bool] | None:
        """(debit, credit, chosen on one shard): two distinct known accounts; for a share of
        transfers the credit account is drawn among those on the debit account's shard."""
        with self._pools.lock:
            accounts = list(self._pools.accounts)
        if len(accounts) < 2:
            return None
        debit = accounts[rng.randrange(len(accounts))]
        if self._shard_of is not None and rng.random() < SAME_SHARD_FRACTION:
            shard = self._shard_of(debit)
            neighbours = [a for a in accounts if a != debit and self._shard_of(a) == shard]
            if neighbours:
                return debit, neighbours[rng.randrange(len(neighbours))], True
        credit = debit
        while credit == debit:
            credit = accounts[rng.randrange(len(accounts))]
        same_shard = self._shard_of is not None and self._shard_of(debit) == self._shard_of(credit)
        return debit, credit, same_shard

    def _new_transfer(self, client: int, rng: random.Random) -> _TransferWrite | None:
        pair = self._transfer_pair(rng)
        if pair is None:
            return None
        settled = rng.random() < TRANSFER_SETTLED_FRACTION
        timeout = 0
        if not settled and rng.random() < TRANSFER_TIMEOUT_FRACTION:
            timeout = rng.randint(*TRANSFER_TIMEOUT_SECONDS)
        return _TransferWrite(
            debit_account_id=pair[0],
            credit_account_id=pair[1],
            amount=rng.randint(1, TRANSFER_AMOUNT_MAX),
            settled=settled,
            timeout_seconds=timeout,
            request_id=self._new_request_id(client),
            same_shard=pair[2],
        )

    def _create_transfer(self, client: int, rng: random.Random) -> bool:
        write = self._new_transfer(client, rng)
        if write is None:
            return False
        with self._pools.lock:
            self._pools.transfer_writes.append(write)
        self._send_transfer(client, h.CREATE_TRANSFER, write)
        return True

    def _send_transfer(self, client: int, kind: str, write: _TransferWrite) -> None:
        operation = self._history.invoke(client, kind, write.as_dict())

        def call() -> dict[str, Any]:
            response = self._stub.CreateTransfer(write.request(), timeout=OPERATION_TIMEOUT_SECONDS)
            self._pools.learn_transfer(response.transfer)
            return {"transfer": transfer_view(response.transfer)}

        self._call(operation, call)

    def _duplicate_transfer(self, client: int, rng: random.Random) -> bool:
        with self._pools.lock:
            if not self._pools.transfer_writes:
                return False
            write = self._pools.transfer_writes[rng.randrange(len(self._pools.transfer_writes))]
        self._send_transfer(client, h.DUPLICATE_TRANSFER, write)
        return True

    def _batch_transfers(self, client: int, rng: random.Random) -> bool:
        """Several transfers in one CreateTransfers call, each recorded as its own
        create-transfer with the call's invoke and completion times and its own item's outcome."""
        writes = []
        for _ in range(rng.randint(*BATCH_TRANSFER_ITEMS)):
            write = self._new_transfer(client, rng)
            if write is None:
                return False
            writes.append(write)
        with self._pools.lock:
            self._pools.transfer_writes.extend(writes)
        operations = [
            self._history.invoke(client, h.CREATE_TRANSFER, {**write.as_dict(), "batch": True})
            for write in writes
        ]
        request = ledger_pb2.CreateTransfersRequest(items=[write.request() for write in writes])
        try:
            results = self._stub.CreateTransfers(request, timeout=OPERATION_TIMEOUT_SECONDS).results
        except grpc.RpcError as error:
            for operation in operations:
                self._history.fail(operation, error)
            return True
        except Exception as error:  # a client bug must not hide its calls from the checks
            for operation in operations:
                self._history.complete(operation, h.OUTCOME_UNKNOWN, {"error": repr(error)}, "CLIENT_ERROR")
            return True
        for operation, result in zip(operations, results, strict=True):
            if result.HasField("transfer"):
                self._pools.learn_transfer(result.transfer)
                self._history.complete(operation, h.OUTCOME_OK, {"transfer": transfer_view(result.transfer)})
            else:
                outcome, code, reason = h.classify_item_error(result.error.code, result.error.reason)
                self._history.complete(operation, outcome, {}, code, reason)
        return True

    def _finish_transfer(self, client: int, rng: random.Random, kind: str) -> bool:
        """Settle (in full or in part) or cancel a pending transfer; it may have expired."""
        with self._pools.lock:
            if not self._pools.pending_transfers:
                return False
            index = rng.randrange(len(self._pools.pending_transfers))
            pending = self._pools.pending_transfers[index]
            if rng.random() >= PENDING_KEPT_FRACTION:
                del self._pools.pending_transfers[index]
        request: dict[str, Any] = {"transfer_id": pending.transfer_id}
        amount = 0
        if kind == h.SETTLE_TRANSFER:
            draw = rng.random()
            if draw < PARTIAL_SETTLE_FRACTION and pending.amount > 1:
                amount = rng.randint(1, pending.amount - 1)
            elif draw < PARTIAL_SETTLE_FRACTION + EXPLICIT_FULL_SETTLE_FRACTION:
                amount = pending.amount
            request.update(amount=amount, transfer_amount=pending.amount)
        operation = self._history.invoke(client, kind, request)

        def call() -> dict[str, Any]:
            if kind == h.SETTLE_TRANSFER:
                settle = ledger_pb2.SettleTransferRequest(transfer_id=pending.transfer_id, amount=amount)
                transfer = self._stub.SettleTransfer(settle, timeout=OPERATION_TIMEOUT_SECONDS).transfer
            else:
                cancel = ledger_pb2.CancelTransferRequest(transfer_id=pending.transfer_id)
                transfer = self._stub.CancelTransfer(cancel, timeout=OPERATION_TIMEOUT_SECONDS).transfer
            return {"transfer": transfer_view(transfer)}

        self._call(operation, call)
        return True

    # -- reads --

    def _get_account(self, client: int, rng: random.Random) -> bool:
        account_id = self._pick(rng, self._pools.accounts)
        if account_id is None:
            return False
        consistent = rng.random() < CONSISTENT_FRACTION
        operation = self._history.invoke(
            client, h.GET_ACCOUNT, {"account_id": account_id, "consistent": consistent}
        )

        def call() -> dict[str, Any]:
            request = ledger_pb2.GetAccountRequest(account_id=account_id, consistent=consistent)
            return {
                "account": account_view(
                    self._stub.GetAccount(request, timeout=OPERATION_TIMEOUT_SECONDS).account
                )
            }

        self._call(operation, call)
        return True

    def _get_transaction(self, client: int, rng: random.Random) -> bool:
        transaction_id = self._pick(rng, self._pools.transactions)
        if transaction_id is None:
            return False
        consistent = rng.random() < CONSISTENT_FRACTION
        operation = self._history.invoke(
            client, h.GET_TRANSACTION, {"transaction_id": transaction_id, "consistent": consistent}
        )

        def call() -> dict[str, Any]:
            request = ledger_pb2.GetTransactionRequest(transaction_id=transaction_id, consistent=consistent)
            transaction = self._stub.GetTransaction(request, timeout=OPERATION_TIMEOUT_SECONDS).transaction
            return {"transaction": transaction_view(transaction)}

        self._call(operation, call)
        return True

    def _get_transfer(self, client: int, rng: random.Random) -> bool:
        transfer_id = self._pick(rng, self._pools.transfers)
        if transfer_id is None:
            return False
        consistent = rng.random() < CONSISTENT_FRACTION
        operation = self._history.invoke(
            client, h.GET_TRANSFER, {"transfer_id": transfer_id, "consistent": consistent}
        )

        def call() -> dict[str, Any]:
            request = ledger_pb2.GetTransferRequest(transfer_id=transfer_id, consistent=consistent)
            return {
                "transfer": transfer_view(
                    self._stub.GetTransfer(request, timeout=OPERATION_TIMEOUT_SECONDS).transfer
                )
            }

        self._call(operation, call)
        return True

    def _list_transactions(self, client: int, rng: random.Random) -> bool:
        """All pages of one account's listing, every page a consistent read: a write
        acknowledged before the first page was asked for is in one of them."""
        account_id = self._pick(rng, self._pools.accounts)
        if account_id is None:
            return False
        operation = self._history.invoke(
            client, h.LIST_TRANSACTIONS, {"account_id": account_id, "consistent": True}
        )

        def call() -> dict[str, Any]:
            listed: list[dict[str, Any]] = []
            token = ""
            for _ in range(LIST_PAGES_MAX):
                request = ledger_pb2.ListTransactionsRequest(
                    account_id=account_id, page_size=LIST_PAGE_SIZE, page_token=token, consistent=True
                )
                page = self._stub.ListTransactions(request, timeout=OPERATION_TIMEOUT_SECONDS)
                listed.extend(transaction_view(transaction) for transaction in page.transactions)
                token = page.next_page_token
                if not token:
                    return {"transactions": listed, "complete": True}
            return {"transactions": listed, "complete": False}

        self._call(operation, call)
        return True
