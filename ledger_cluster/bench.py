"""A load generator for a running gateway or standalone server: concurrent clients, a mix of
operations, throughput and latency percentiles, errors by code, and a balance check afterwards.

Every write carries its own request_id. A write whose outcome is unknown (or that failed in a way
that may still apply) is counted as an error, never as a success, and is re-sent with the same
request_id after the run until it is answered, so the final balances are known exactly and are
compared with what the acknowledged writes imply.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.status import error_details

OPERATIONS = ("create", "settle", "cancel", "read")
ACCOUNTS_MAX = 100_000
CONCURRENCY_MAX = 512
DURATION_SECONDS_MAX = 3600.0
CALL_TIMEOUT_SECONDS = 10.0
SETUP_BALANCE = 10**12
RESEND_ROUNDS_MAX = 50
RESEND_PAUSE_SECONDS = 0.2
PROGRESS_INTERVAL_SECONDS = 1.0

Stub = ledger_pb2_grpc.LedgerServiceStub


@dataclass
class BenchResult:
    operations: int = 0
    transactions: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors_by_code: Counter[str] = field(default_factory=Counter)
    measured_seconds: float = 0.0
    balances_checked: int = 0
    balance_mismatches: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.latencies_ms)

        def percentile(fraction: float) -> float:
            if not ordered:
                return 0.0
            return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)

        seconds = max(self.measured_seconds, 1e-9)
        return {
            "throughput_tx_per_s": round(self.transactions / seconds, 1),
            "operations_per_s": round(self.operations / seconds, 1),
            "transactions": self.transactions,
            "operations": self.operations,
            "latency_ms_p50": round(statistics.median(ordered), 3) if ordered else 0.0,
            "latency_ms_p95": percentile(0.95),
            "latency_ms_p99": percentile(0.99),
            "latency_ms_max": round(ordered[-1], 3) if ordered else 0.0,
            "errors_by_code": dict(self.errors_by_code),
            "measured_seconds": round(self.measured_seconds, 3),
            "balances_checked": self.balances_checked,
            "balance_mismatches": self.balance_mismatches,
        }


@dataclass
class _Write:
    request: ledger_pb2.CreateTransactionRequest
    answered: ledger_pb2.Transaction | None = None


class _Ledger:
    """The writes whose fate is unknown, shared by the workers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.unresolved: list[_Write] = []


def _new_write(account_id: str, amount: int, settled: bool) -> _Write:
    return _Write(
        ledger_pb2.CreateTransactionRequest(
            account_id=account_id,
            amount=amount,
            settled=settled,
            description="bench",
            request_id=f"bench-{uuid.uuid4().hex}",
        )
    )


def _error_code(error: grpc.RpcError) -> str:
    details = error_details(error)
    return f"{details.code.name}:{details.reason}" if details.reason else details.code.name


def _item_error_code(error: ledger_pb2.ItemError) -> str:
    return f"{error.code}:{error.reason}" if error.reason else error.code


class _Worker:
    def __init__(
        self, stub: Stub, accounts: list[str], mix: list[str], *, seed: int, ledger: _Ledger, batch: int = 1
    ) -> None:
        self._stub = stub
        self._accounts = accounts
        self._mix = mix
        self._batch = batch
        self._random = random.Random(seed)
        self._ledger = ledger
        self.operations = 0
        self.transactions = 0
        self.latencies_ms: list[float] = []
        self.errors: Counter[str] = Counter()

    def _timed(self, call: Callable[[], object], count: bool) -> bool:
        started = time.perf_counter()
        try:
            call()
        except grpc.RpcError as error:
            if count:
                self.errors[_error_code(error)] += 1
            return False
        if count:
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
        return True

    def _create(self, write: _Write, count: bool) -> bool:
        def call() -> None:
            write.answered = self._stub.CreateTransaction(
                write.request, timeout=CALL_TIMEOUT_SECONDS
            ).transaction

        if self._timed(call, count):
            return True
        with self._ledger.lock:
            self._ledger.unresolved.append(write)  # may still apply: resolve it after the run
        return False

    def _create_batch(self, writes: list[_Write], count: bool) -> list[_Write]:
        """CreateTransactions with every write; returns those acknowledged. Items whose outcome
        is open (an item UNAVAILABLE, or the whole call failing) are resolved after the run."""
        request = ledger_pb2.CreateTransactionsRequest(items=[write.request for write in writes])
        answer: list[ledger_pb2.CreateTransactionsResponse] = []

        def call() -> None:
            answer.append(self._stub.CreateTransactions(request, timeout=CALL_TIMEOUT_SECONDS))

        if not self._timed(call, count):
            with self._ledger.lock:
                self._ledger.unresolved.extend(writes)
            return []
        acknowledged = []
        for write, result in zip(writes, answer[0].results, strict=True):
            if result.HasField("transaction"):
                write.answered = result.transaction
                acknowledged.append(write)
                continue
            if count:
                self.errors[_item_error_code(result.error)] += 1
            if result.error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                with self._ledger.lock:
                    self._ledger.unresolved.append(write)
        return acknowledged

    def _finish_batch(self, operation: str, transaction_ids: list[str], count: bool) -> int:
        """SettleTransactions or CancelTransactions; returns how many items succeeded."""
        answer: list[ledger_pb2.TransactionsResponse] = []

        def call() -> None:
            if operation == "settle":
                settle = ledger_pb2.SettleTransactionsRequest(transaction_ids=transaction_ids)
                answer.append(self._stub.SettleTransactions(settle, timeout=CALL_TIMEOUT_SECONDS))
            else:
                cancel = ledger_pb2.CancelTransactionsRequest(transaction_ids=transaction_ids)
                answer.append(self._stub.CancelTransactions(cancel, timeout=CALL_TIMEOUT_SECONDS))

        if not self._timed(call, count):
            return 0
        succeeded = 0
        for result in answer[0].results:
            if result.HasField("transaction"):
                succeeded += 1
            elif count:
                self.errors[_item_error_code(result.error)] += 1
        return succeeded

    def run_batch(self, count: bool) -> None:
        """One batch call of `batch` items (a read stays one unary call)."""
        operation = self._random.choice(self._mix)
        if operation == "read":
            self._read(self._random.choice(self._accounts), count)
        elif operation == "create":
            writes = [
                _new_write(self._random.choice(self._accounts), self._random.choice((-1, 1)), settled=True)
                for _ in range(self._batch)
            ]
            self.transactions += len(self._create_batch(writes, count)) if count else 0
        else:
            pending = [
                _new_write(self._random.choice(self._accounts), -1, settled=False) for _ in range(self._batch)
            ]
            created = self._create_batch(pending, count)
            if created:
                ids = [write.answered.id for write in created if write.answered is not None]
                succeeded = self._finish_batch(operation, ids, count)
                self.transactions += succeeded if count else 0
        self.operations += int(count)

    def _read(self, account: str, count: bool) -> None:
        self._timed(
            lambda: self._stub.GetAccount(
                ledger_pb2.GetAccountRequest(account_id=account), timeout=CALL_TIMEOUT_SECONDS
            ),
            count,
        )

    def run_one(self, count: bool) -> None:
        if self._batch > 1:
            self.run_batch(count)
            return
        operation = self._random.choice(self._mix)
        account = self._random.choice(self._accounts)
        if operation == "read":
            self._read(account, count)
        elif operation == "create":
            amount = self._random.choice((-1, 1))
            if self._create(_new_write(account, amount, settled=True), count) and count:
                self.transactions += 1
        else:
            pending = _new_write(account, -1, settled=False)
            if not self._create(pending, count):
                self.operations += int(count)
                return
            assert pending.answered is not None
            transaction_id = pending.answered.id
            if operation == "settle":
                finish: Callable[[], object] = lambda: self._stub.SettleTransaction(  # noqa: E731
                    ledger_pb2.SettleTransactionRequest(transaction_id=transaction_id),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            else:
                finish = lambda: self._stub.CancelTransaction(  # noqa: E731
                    ledger_pb2.CancelTransactionRequest(transaction_id=transaction_id),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            # A settle or cancel of unknown fate is not re-sent: the balance check reads each
            # transaction's final status from the ledger, whatever it is.
            if self._timed(finish, count) and count:
                self.transactions += 1
        self.operations += int(count)


def _setup_accounts(stub: Stub, count: int, progress: Callable[[str], None]) -> list[str]:
    accounts = []
    for index in range(count):
        account = stub.CreateAccount(ledger_pb2.CreateAccountRequest(), timeout=CALL_TIMEOUT_SECONDS).account
        stub.CreateTransaction(
            ledger_pb2.CreateTransactionRequest(
                account_id=account.id, amount=SETUP_BALANCE, settled=True, description="bench setup"
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        accounts.append(account.id)
        if (index + 1) % 100 == 0:
            progress(f"created {index + 1}/{count} accounts")
    return accounts


def _resolve_unknown(stub: Stub, ledger: _Ledger) -> None:
    """Re-send every write of unknown fate with its request_id until it is answered."""
    pending = list(ledger.unresolved)
    for _ in range(RESEND_ROUNDS_MAX):
        still = []
        for write in pending:
            try:
                write.answered = stub.CreateTransaction(
                    write.request, timeout=CALL_TIMEOUT_SECONDS
                ).transaction
            except grpc.RpcError as error:
                details = error_details(error)
                if details.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    still.append(write)
                # Any other answer is definite: the write was refused and applied nothing.
        if not still:
            return
        pending = still
        time.sleep(RESEND_PAUSE_SECONDS)
    raise RuntimeError(f"{len(pending)} writes of unknown outcome never got an answer")


def _check_balances(stub: Stub, accounts: list[str], result: BenchResult) -> None:
    """Each account's balances must equal what its listed transactions imply."""
    for account_id in accounts:
        transactions: list[ledger_pb2.Transaction] = []
        token = ""
        while True:
            page = stub.ListTransactions(
                ledger_pb2.ListTransactionsRequest(account_id=account_id, page_size=1000, page_token=token),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            transactions.extend(page.transactions)
            token = page.next_page_token
            if not token:
                break
        settled = sum(t.amount for t in transactions if t.status == ledger_pb2.TRANSACTION_STATUS_SETTLED)
        held = sum(
            -t.amount
            for t in transactions
            if t.status == ledger_pb2.TRANSACTION_STATUS_PENDING and t.amount < 0
        )
        account = stub.GetAccount(
            ledger_pb2.GetAccountRequest(account_id=account_id, consistent=True), timeout=CALL_TIMEOUT_SECONDS
        ).account
        if (account.settled_balance, account.available_balance) != (settled, settled - held):
            result.balance_mismatches.append(
                f"{account_id}: stored {account.settled_balance}/{account.available_balance},"
                f" transactions give {settled}/{settled - held}"
            )
        result.balances_checked += 1


def run_bench(
    address: str,
    *,
    accounts: int,
    duration_seconds: float,
    concurrency: int,
    mix: list[str],
    warmup_seconds: float,
    progress: Callable[[str], None],
    batch: int = 1,
) -> BenchResult:
    with grpc.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        account_ids = _setup_accounts(stub, accounts, progress)
        ledger = _Ledger()
        workers = [
            _Worker(stub, account_ids, mix, seed=seed, ledger=ledger, batch=batch)
            for seed in range(concurrency)
        ]
        started = time.monotonic()
        measure_from = started + warmup_seconds
        measure_until = measure_from + duration_seconds

        def drive(worker: _Worker) -> None:
            while (now := time.monotonic()) < measure_until:
                worker.run_one(count=now >= measure_from)

        threads = [threading.Thread(target=drive, args=(worker,), daemon=True) for worker in workers]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(PROGRESS_INTERVAL_SECONDS / len(threads))
            elapsed = time.monotonic() - measure_from
            done = sum(worker.transactions for worker in workers)
            if elapsed > 0:
                progress(f"{elapsed:5.1f} s  {done} transactions  {done / elapsed:,.0f} tx/s")
        result = BenchResult(measured_seconds=duration_seconds)
        for worker in workers:
            result.operations += worker.operations
            result.transactions += worker.transactions
            result.latencies_ms.extend(worker.latencies_ms)
            result.errors_by_code.update(worker.errors)
        _resolve_unknown(stub, ledger)
        _check_balances(stub, account_ids, result)
        return result
