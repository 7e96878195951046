"""A load generator for a running gateway or standalone server: concurrent clients, a mix of
operations, throughput and latency percentiles, errors by code, CPU per transaction of the
server processes and of the generator itself, and a balance check afterwards.

The clients are coroutines on one event loop sharing one `grpc.aio` channel, so the generator
costs little CPU per call and is not the bottleneck it measures.

Every write carries its own request_id. A write whose outcome is unknown (or that failed in a way
that may still apply) is counted as an error, never as a success, and is re-sent with the same
request_id after the run until it is answered, so the final balances are known exactly and are
compared with what the acknowledged writes imply.

`--mix transfer` moves one unit between two random accounts on different shards (`transfer-same`:
on one shard), settled at once, with CreateTransfer or CreateTransfers; a transfer counts as one
transaction (the PostgreSQL reference counts one transfer as one database transaction). Which
shard an account is on comes from the cluster config, so the accounts of a fresh run are created
evenly over its shards. After a run of writes whose every fate is known (create and transfer
mixes, no settle or cancel), each account's settled balance must equal its balance before the
run plus the net of its acknowledged writes, and the sum of all settled balances must have moved
only by the top-ups and purchases: transfers conserve it.

CPU comes from each server process's Prometheus endpoint (`process_cpu_seconds_total`), read
right before and right after the measured window; the processes are named by their
`ledger_process_info` labels. Endpoints are only ever loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.bench_metrics import (
    METRICS_FETCH_TIMEOUT_SECONDS,
    CpuWindow,
    cpu_us_per_transaction,
    cpu_window,
    loopback_url_problem,
    probe_endpoints,
    sample_endpoints,
)
from ledger_cluster.config import ClusterConfig, ShardConfig
from ledger_cluster.errors import LedgerError
from ledger_cluster.gateway import account_id_for_request
from ledger_cluster.ids import parse_account_id
from ledger_cluster.sdk import AsyncLedgerClient, LedgerApiError, TransactionStatus, TransferStatus
from ledger_cluster.security import public_client_from_environment
from ledger_cluster.sharding import shard_key
from ledger_cluster.status import ErrorDetails, error_details

if TYPE_CHECKING:
    from ledger_cluster.api.v1.ledger_pb2_grpc import LedgerServiceAsyncStub as Stub

TRANSFER_OPERATIONS = ("transfer", "transfer-same")
OPERATIONS = ("create", "settle", "cancel", "read", *TRANSFER_OPERATIONS)
# Mixes of only these leave no write of unknown fate behind (a settle or cancel whose answer was
# lost is not re-sent), so every account's settled balance is known from the acknowledgments.
NET_CHECKED_OPERATIONS = frozenset({"create", "read", *TRANSFER_OPERATIONS})
# Every transfer moves one unit, settled at once: against SETUP_BALANCE none is ever refused.
TRANSFER_AMOUNT = 1
# An account of a shard holding 1/S of the key space takes S request ids on average; past this
# many the shard is too narrow (a config of over 10,000 shards).
ACCOUNT_DRAWS_MAX = 1_000_000
ACCOUNTS_MAX = 100_000
CONCURRENCY_MAX = 512
DURATION_SECONDS_MAX = 3600.0
WARMUP_SECONDS_MAX = 600.0
CALL_TIMEOUT_SECONDS = 10.0
SETUP_BALANCE = 10**12
# `--mix create` draws top-ups and purchases of one unit: against SETUP_BALANCE no purchase is
# ever refused, so every item is a real write.
CREATE_MIX_AMOUNTS = (-1, 1)
# Accounts named by --accounts-file must hold this much, or purchases soon fail on funds and the
# run measures refusals (an account of scripts/preload-state holds SETUP_BALANCE).
ACCOUNTS_FILE_BALANCE_MIN = 10**9
# Calls in flight while accounts are set up, unknown writes re-sent and balances checked: enough
# to hide round trips, few enough not to queue behind each other at the server.
SETUP_CONCURRENCY_MAX = 16
RESEND_CONCURRENCY_MAX = 16
CHECK_CONCURRENCY_MAX = 16
RESEND_ROUNDS_MAX = 50
RESEND_PAUSE_SECONDS = 0.2
LIST_PAGE_SIZE = 1000
# 10^8 transactions on one account; more means the server never ends its listing.
LIST_PAGES_PER_ACCOUNT_MAX = 100_000
PROGRESS_INTERVAL_SECONDS = 1.0
# Throughput is also reported per window of the measured period, so a run that slows down as its
# tables grow shows it (issue 13: no decline beyond 15% from the first to the sixth 10 s).
WINDOW_SECONDS_DEFAULT = 10.0
WINDOW_SECONDS_MIN = 0.1
# A duration that is a whole number of windows (60 s of 10 s) makes that many, not one more
# for a float's last bit.
WINDOW_ROUNDING_SLACK = 1e-9
SETUP_PROGRESS_EVERY_ACCOUNTS = 100
# Past this many latencies a uniform reservoir keeps the percentiles unbiased in bounded memory
# (an hour at 20,000 calls/s would otherwise hold 72 million floats).
LATENCY_SAMPLES_MAX = 1_000_000
# A server that is down refuses a call at once: a client pauses this long after an UNAVAILABLE,
# so that it does not spin, burning the CPU it measures and piling up writes to re-send.
UNAVAILABLE_PAUSE_SECONDS = 0.05
# After the window closes each client finishes the operation it is in: at most two calls (a
# pending write, then its settle or cancel), each bounded by its deadline and pause.
WORKERS_STOP_TIMEOUT_SECONDS = 2 * (CALL_TIMEOUT_SECONDS + UNAVAILABLE_PAUSE_SECONDS) + 5.0
# Writes of unknown outcome held for re-sending; past this the run stops rather than re-send
# without end.
UNRESOLVED_WRITES_MAX = 100_000
# Tasks cancelled after a failure end at their next await; this long is plenty.
CANCELLED_TASKS_WAIT_SECONDS = 5.0


Item = TypeVar("Item")
Answer = TypeVar("Answer")


class BenchError(LedgerError):
    """The bench could not finish: writes that never got an answer, clients that did not stop,
    or a listing that does not end."""


@dataclass
class BenchResult:
    operations: int = 0
    # What `transactions` counts: "transactions", or "transfers" for a mix of transfers only.
    unit: str = "transactions"
    # How the clients call: "grpc" (generated stubs) or "sdk" (`AsyncLedgerClient`).
    client: str = "grpc"
    transactions: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    latency_ms_max: float = 0.0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    measured_seconds: float = 0.0
    balances_checked: int = 0
    balance_mismatches: list[str] = field(default_factory=list)
    cpu: CpuWindow = field(default_factory=lambda: CpuWindow({}, {}))
    load_generator_cpu_seconds: float = 0.0
    window_seconds: float = WINDOW_SECONDS_DEFAULT
    # Transactions of the operations that started in each window; they add up to `transactions`.
    transactions_by_window: list[int] = field(default_factory=list)

    def window_throughputs(self) -> list[float]:
        """Transactions per second of each window; the last one ends with the measured period,
        so it may be a little longer or shorter than the others."""
        rates = []
        for index, transactions in enumerate(self.transactions_by_window):
            start = index * self.window_seconds
            last = index == len(self.transactions_by_window) - 1
            end = self.measured_seconds if last else start + self.window_seconds
            rates.append(round(transactions / max(end - start, 1e-9), 1))
        return rates

    def window_ratio_last_to_first(self) -> float | None:
        """The last window's throughput over the first's; None with fewer than two windows."""
        rates = self.window_throughputs()
        if len(rates) < 2 or rates[0] <= 0:
            return None
        return round(rates[-1] / rates[0], 3)

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.latencies_ms)

        def percentile(fraction: float) -> float:
            if not ordered:
                return 0.0
            return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)

        seconds = max(self.measured_seconds, 1e-9)
        by_process = self.cpu.cpu_seconds_by_process
        return {
            "unit": self.unit,
            "client": self.client,
            "throughput_tx_per_s": round(self.transactions / seconds, 1),
            "operations_per_s": round(self.operations / seconds, 1),
            "transactions": self.transactions,
            "operations": self.operations,
            "latency_ms_p50": round(statistics.median(ordered), 3) if ordered else 0.0,
            "latency_ms_p95": percentile(0.95),
            "latency_ms_p99": percentile(0.99),
            "latency_ms_max": round(self.latency_ms_max, 3),
            "errors_by_code": dict(self.errors_by_code),
            "measured_seconds": round(self.measured_seconds, 3),
            "balances_checked": self.balances_checked,
            "balance_mismatches": self.balance_mismatches,
            "cpu_us_per_tx": (
                cpu_us_per_transaction(sum(by_process.values()), self.transactions) if by_process else None
            ),
            "cpu_us_per_tx_by_process": {
                name: cpu_us_per_transaction(seconds, self.transactions)
                for name, seconds in by_process.items()
            },
            "cpu_seconds_by_process": {name: round(seconds, 3) for name, seconds in by_process.items()},
            "load_generator_cpu_us_per_tx": cpu_us_per_transaction(
                self.load_generator_cpu_seconds, self.transactions
            ),
            "load_generator_cpu_seconds": round(self.load_generator_cpu_seconds, 3),
            "metrics_missing": dict(self.cpu.missing),
            "window_seconds": self.window_seconds,
            "throughput_tx_per_s_by_window": self.window_throughputs(),
            "window_ratio_last_to_first": self.window_ratio_last_to_first(),
        }

    def describe(self) -> str:
        """The summary as one line for people."""
        summary = self.summary()
        by_process = self.cpu.cpu_seconds_by_process
        if by_process:
            processes = ", ".join(
                f"{name} {cpu_us_per_transaction(seconds, self.transactions)}"
                for name, seconds in by_process.items()
            )
            cpu = f"CPU per transaction {summary['cpu_us_per_tx']} µs ({processes})"
        else:
            cpu = "CPU per transaction: no metrics endpoint gave a reading"
        missing = f", metrics missing from {', '.join(self.cpu.missing)}" if self.cpu.missing else ""
        windows = ""
        if len(self.transactions_by_window) > 1:
            rates = ", ".join(f"{rate:,.0f}" for rate in self.window_throughputs())
            windows = (
                f", tx/s per {self.window_seconds:g} s window {rates}"
                f" (last/first {self.window_ratio_last_to_first()})"
            )
        per_second = "transfers/s" if self.unit == "transfers" else "tx/s"
        through = " through the SDK" if self.client == "sdk" else ""
        return (
            f"{summary['throughput_tx_per_s']} {per_second}{through} over {summary['measured_seconds']} s,"
            f" latency ms p50 {summary['latency_ms_p50']} p95 {summary['latency_ms_p95']}"
            f" p99 {summary['latency_ms_p99']} max {summary['latency_ms_max']},"
            f" errors {summary['errors_by_code'] or 'none'},"
            f" balances checked {summary['balances_checked']}, mismatches {len(self.balance_mismatches)},"
            f" {cpu}, load generator {summary['load_generator_cpu_us_per_tx']} µs{missing}{windows}"
        )


# --- load --------------------------------------------------------------------------------------


@dataclass
class _Write:
    request: ledger_pb2.CreateTransactionRequest
    answered: ledger_pb2.Transaction | None = None


@dataclass
class _TransferWrite:
    request: ledger_pb2.CreateTransferRequest
    answered: ledger_pb2.Transfer | None = None


AnyWrite = _Write | _TransferWrite


def account_request_in_shard(lower_bound: int, upper_bound: int) -> tuple[int, str]:
    """A new account of the shard [lower_bound, upper_bound] and its CreateAccount request id:
    the gateway derives the id from the request id, so request ids are drawn until one lands
    in the shard."""
    for _ in range(ACCOUNT_DRAWS_MAX):
        request_id = new_request_id()
        account_id = account_id_for_request(request_id)
        if lower_bound <= shard_key(account_id) <= upper_bound:
            return account_id, request_id
    raise BenchError(f"no account in shard keys {lower_bound}..{upper_bound} after {ACCOUNT_DRAWS_MAX} draws")


def spread_request_ids(shards: Sequence[ShardConfig], count: int) -> list[str]:
    """CreateAccount request ids of `count` new accounts, dealt over `shards` in turn, so every
    shard holds count // len(shards) or one more."""
    return [
        account_request_in_shard(shard.lower_bound, shard.upper_bound)[1]
        for shard in (shards[index % len(shards)] for index in range(count))
    ]


def shards_of(config: ClusterConfig, account_ids: Sequence[str]) -> dict[str, str]:
    """Each account's shard id under `config`."""
    return {
        account_id: config.shard_for_account(parse_account_id(account_id)).shard_id
        for account_id in account_ids
    }


class TransferPairs:
    """Random (debit, credit) pairs of two different accounts, on two different shards
    (`cross_shard`) or on one. Every account that can be in such a pair is the debit account
    equally often, and its partner is uniform among the accounts it can pair with; each draw is
    O(1) over one list of the accounts ordered by shard."""

    def __init__(self, shard_of: dict[str, str], *, cross_shard: bool) -> None:
        by_shard: dict[str, list[str]] = {}
        for account_id, shard_id in shard_of.items():
            by_shard.setdefault(shard_id, []).append(account_id)
        self.cross_shard = cross_shard
        self._ordered: list[str] = []
        # The [start, end) of each account's shard in `_ordered`, by position.
        self._ranges: list[tuple[int, int]] = []
        for shard_id in sorted(by_shard):
            start = len(self._ordered)
            self._ordered.extend(by_shard[shard_id])
            self._ranges.extend([(start, len(self._ordered))] * len(by_shard[shard_id]))
        if cross_shard:
            self._debit_positions = list(range(len(self._ordered))) if len(by_shard) > 1 else []
        else:
            self._debit_positions = [
                position for position, (start, end) in enumerate(self._ranges) if end - start > 1
            ]
        if not self._debit_positions:
            kind = "two shards" if cross_shard else "one shard"
            raise BenchError(
                f"no two of the {len(shard_of)} accounts are on {kind}"
                f" ({len(by_shard)} shards hold them): use more accounts"
            )

    def pick(self, chooser: random.Random) -> tuple[str, str]:
        position = chooser.choice(self._debit_positions)
        start, end = self._ranges[position]
        if self.cross_shard:
            # Uniform over the accounts outside [start, end).
            other = chooser.randrange(len(self._ordered) - (end - start))
            if other >= start:
                other += end - start
        else:
            # Uniform over [start, end) without `position`.
            other = start + chooser.randrange(end - start - 1)
            if other >= position:
                other += 1
        return self._ordered[position], self._ordered[other]


class _Settleable(Protocol):
    """A transaction or transfer, as the API's message or as the SDK's dataclass."""

    @property
    def amount(self) -> int: ...

    @property
    def settled_amount(self) -> int: ...


def settled_amount_of(settled: _Settleable) -> int:
    """What a SETTLED transaction or transfer moved: its settled amount (a partial settle), else
    its amount."""
    return settled.settled_amount or settled.amount


def transfer_moved(transfer: ledger_pb2.Transfer) -> int:
    """What a transfer finally moved from its debit account to its credit account (0 unless SETTLED)."""
    if transfer.status != ledger_pb2.TRANSFER_STATUS_SETTLED:
        return 0
    return settled_amount_of(transfer)


def balance_totals(
    settled_by_account: dict[str, int],
    start_by_account: dict[str, int],
    net_by_account: Counter[str],
    outside_net: int,
) -> list[str]:
    """What the settled balances after a run of known writes get wrong: each account must hold
    its start plus the net of its acknowledged writes, and the sum of all must have moved by
    `outside_net` only (the top-ups and purchases: money that entered or left the ledger), which
    checks conservation apart from the per-account bookkeeping."""
    problems = []
    for account_id, settled in settled_by_account.items():
        expected = start_by_account[account_id] + net_by_account[account_id]
        if settled != expected:
            problems.append(
                f"{account_id}: settled {settled}, its start {start_by_account[account_id]}"
                f" and acknowledged net {net_by_account[account_id]} give {expected}"
            )
    total = sum(settled_by_account.values())
    expected_total = sum(start_by_account[account_id] for account_id in settled_by_account) + outside_net
    if total != expected_total:
        problems.append(
            f"sum of settled balances {total}, expected {expected_total}"
            f" (start plus top-ups and purchases {outside_net:+}): transfers did not conserve it"
        )
    return problems


class _Latencies:
    """At most LATENCY_SAMPLES_MAX latencies, a uniform sample of all (Algorithm R); the
    maximum is exact."""

    def __init__(self, seed: int) -> None:
        self.samples_ms: list[float] = []
        self.maximum_ms = 0.0
        self._seen = 0
        self._random = random.Random(seed)

    def add(self, latency_ms: float) -> None:
        self._seen += 1
        self.maximum_ms = max(self.maximum_ms, latency_ms)
        if len(self.samples_ms) < LATENCY_SAMPLES_MAX:
            self.samples_ms.append(latency_ms)
            return
        slot = self._random.randrange(self._seen)
        if slot < LATENCY_SAMPLES_MAX:
            self.samples_ms[slot] = latency_ms


class _Tally:
    """What all clients count. They are coroutines on one event loop thread, so these plain
    fields need no lock."""

    def __init__(self, window_seconds: float, windows: int) -> None:
        self.counting = False
        self.stopping = False
        self.measure_started_monotonic = 0.0
        self.operations = 0
        self.transactions = 0
        self.window_seconds = window_seconds
        self.transactions_by_window = [0] * windows
        self.latencies = _Latencies(seed=0)
        self.errors: Counter[str] = Counter()
        # Writes whose fate is unknown, re-sent after the run.
        self.unresolved: list[AnyWrite] = []
        # What the acknowledged writes (counted or not) moved: per account, and in sum the
        # writes that are no transfers.
        self.net_by_account: Counter[str] = Counter()
        self.outside_net = 0

    def acknowledge(self, write: AnyWrite) -> None:
        """Book an answered write's effect on settled balances."""
        if isinstance(write, _TransferWrite):
            if write.answered is not None:
                answered = write.answered
                self.book_transfer(
                    answered.debit_account_id, answered.credit_account_id, transfer_moved(answered)
                )
            return
        transaction = write.answered
        if transaction is not None and transaction.status == ledger_pb2.TRANSACTION_STATUS_SETTLED:
            self.book_transaction(transaction.account_id, settled_amount_of(transaction))

    def book_transaction(self, account_id: str, moved: int) -> None:
        """A settled top-up or purchase: money entering or leaving the ledger."""
        self.net_by_account[account_id] += moved
        self.outside_net += moved

    def book_transfer(self, debit_account_id: str, credit_account_id: str, moved: int) -> None:
        """A transfer that moved `moved` (0 unless SETTLED): money changing accounts only."""
        if moved:
            self.net_by_account[debit_account_id] -= moved
            self.net_by_account[credit_account_id] += moved

    def add_transactions(self, count: int, started_monotonic: float) -> None:
        """Count the transactions of an operation that started at `started_monotonic`, in the
        window it started in, as the total counts operations that start inside the period. One
        that starts as the period closes goes to the last window."""
        self.transactions += count
        elapsed = started_monotonic - self.measure_started_monotonic
        index = min(max(0, int(elapsed / self.window_seconds)), len(self.transactions_by_window) - 1)
        self.transactions_by_window[index] += count

    def add_unresolved(self, writes: Sequence[AnyWrite]) -> None:
        if len(self.unresolved) + len(writes) > UNRESOLVED_WRITES_MAX:
            raise BenchError(
                f"more than {UNRESOLVED_WRITES_MAX} writes of unknown outcome: is the server answering?"
            )
        self.unresolved.extend(writes)


def new_request_id() -> str:
    """A request id as a client makes one: random, so every write is idempotent on retry."""
    return f"bench-{uuid.uuid4().hex}"


def _new_write(account_id: str, amount: int, settled: bool) -> _Write:
    return _Write(
        ledger_pb2.CreateTransactionRequest(
            account_id=account_id,
            amount=amount,
            settled=settled,
            description="bench",
            request_id=new_request_id(),
        )
    )


def _new_transfer(debit_account_id: str, credit_account_id: str) -> _TransferWrite:
    return _TransferWrite(
        ledger_pb2.CreateTransferRequest(
            debit_account_id=debit_account_id,
            credit_account_id=credit_account_id,
            amount=TRANSFER_AMOUNT,
            settled=True,
            description="bench",
            request_id=new_request_id(),
        )
    )


def _transfer_status_code(transfer: ledger_pb2.Transfer) -> str:
    """How a transfer that answered but moved nothing (INSUFFICIENT_FUNDS, ...) is counted."""
    return ledger_pb2.TransferStatus.Name(transfer.status)


def _error_code(details: ErrorDetails) -> str:
    return f"{details.code.name}:{details.reason}" if details.reason else details.code.name


def _details_of(error: grpc.RpcError | LedgerApiError) -> ErrorDetails:
    """A failed call's status, whether the stub raised it or the SDK (which has read it already)."""
    if isinstance(error, LedgerApiError):
        return ErrorDetails(error.code, error.message, error.reason, dict(error.metadata))
    return error_details(error)


def _item_error_code(error: ledger_pb2.ItemError) -> str:
    return f"{error.code}:{error.reason}" if error.reason else error.code


class _Client:
    """One simulated client: draws operations from the mix and runs them one after another."""

    def __init__(
        self,
        stub: Stub,
        accounts: list[str],
        mix: list[str],
        *,
        seed: int,
        tally: _Tally,
        batch: int,
        pairs: dict[str, TransferPairs] | None = None,
    ) -> None:
        self._stub = stub
        self._accounts = accounts
        self._mix = mix
        self._batch = batch
        # By transfer operation: where its pairs come from.
        self._pairs = pairs or {}
        self._random = random.Random(seed)
        self._tally = tally
        self._started_monotonic = 0.0

    async def run(self) -> None:
        while not self._tally.stopping:
            # An operation counts when it starts inside the window, as the CPU readings bracket it.
            count = self._tally.counting
            self._started_monotonic = time.monotonic()
            if self._batch > 1:
                await self._run_batch(count)
            else:
                await self._run_one(count)
            self._tally.operations += int(count)

    async def _timed(self, call: Awaitable[Answer], count: bool) -> Answer | None:
        started = time.perf_counter()
        try:
            answer = await call
        except (grpc.RpcError, LedgerApiError) as error:
            details = _details_of(error)
            if count:
                self._tally.errors[_error_code(details)] += 1
            if details.code == grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(UNAVAILABLE_PAUSE_SECONDS)
            return None
        if count:
            self._tally.latencies.add((time.perf_counter() - started) * 1000)
        return answer

    async def _create(self, write: _Write, count: bool) -> str | None:
        """CreateTransaction; the transaction's id when it was answered."""
        answer = await self._timed(
            self._stub.CreateTransaction(write.request, timeout=CALL_TIMEOUT_SECONDS), count
        )
        if answer is None:
            self._tally.add_unresolved([write])  # may still apply: resolve it after the run
            return None
        write.answered = answer.transaction
        self._tally.acknowledge(write)
        return answer.transaction.id

    async def _create_batch(self, writes: list[_Write], count: bool) -> list[_Write]:
        """CreateTransactions with every write; returns those acknowledged. Items whose outcome
        is open (an item UNAVAILABLE, or the whole call failing) are resolved after the run."""
        request = ledger_pb2.CreateTransactionsRequest(items=[write.request for write in writes])
        answer = await self._timed(
            self._stub.CreateTransactions(request, timeout=CALL_TIMEOUT_SECONDS), count
        )
        if answer is None:
            self._tally.add_unresolved(writes)
            return []
        acknowledged = []
        for write, result in zip(writes, answer.results, strict=True):
            if result.HasField("transaction"):
                write.answered = result.transaction
                self._tally.acknowledge(write)
                acknowledged.append(write)
                continue
            if count:
                self._tally.errors[_item_error_code(result.error)] += 1
            if result.error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                self._tally.add_unresolved([write])
        return acknowledged

    def _transferred(self, write: _TransferWrite, transfer: ledger_pb2.Transfer, count: bool) -> bool:
        """Book an answered transfer; True when it moved its amount."""
        write.answered = transfer
        self._tally.acknowledge(write)
        if transfer_moved(transfer):
            return True
        if count:
            self._tally.errors[_transfer_status_code(transfer)] += 1
        return False

    async def _transfer(self, write: _TransferWrite, count: bool) -> bool:
        """CreateTransfer; True when the transfer moved its amount."""
        answer = await self._timed(
            self._stub.CreateTransfer(write.request, timeout=CALL_TIMEOUT_SECONDS), count
        )
        if answer is None:
            self._tally.add_unresolved([write])  # may still apply: resolve it after the run
            return False
        return self._transferred(write, answer.transfer, count)

    async def _transfer_batch(self, writes: list[_TransferWrite], count: bool) -> int:
        """CreateTransfers with every write; returns how many moved their amount. Items whose
        outcome is open (an item UNAVAILABLE, or the whole call failing) are resolved after the run."""
        request = ledger_pb2.CreateTransfersRequest(items=[write.request for write in writes])
        answer = await self._timed(self._stub.CreateTransfers(request, timeout=CALL_TIMEOUT_SECONDS), count)
        if answer is None:
            self._tally.add_unresolved(writes)
            return 0
        moved = 0
        for write, result in zip(writes, answer.results, strict=True):
            if result.HasField("transfer"):
                moved += self._transferred(write, result.transfer, count)
                continue
            if count:
                self._tally.errors[_item_error_code(result.error)] += 1
            if result.error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                self._tally.add_unresolved([write])
        return moved

    async def _finish_batch(self, operation: str, transaction_ids: list[str], count: bool) -> int:
        """SettleTransactions or CancelTransactions; returns how many items succeeded."""
        call: Awaitable[ledger_pb2.TransactionsResponse]
        if operation == "settle":
            call = self._stub.SettleTransactions(
                ledger_pb2.SettleTransactionsRequest(transaction_ids=transaction_ids),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        else:
            call = self._stub.CancelTransactions(
                ledger_pb2.CancelTransactionsRequest(transaction_ids=transaction_ids),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        answer = await self._timed(call, count)
        if answer is None:
            return 0
        succeeded = 0
        for result in answer.results:
            if result.HasField("transaction"):
                succeeded += 1
            elif count:
                self._tally.errors[_item_error_code(result.error)] += 1
        return succeeded

    async def _read(self, account_id: str, count: bool) -> None:
        request = ledger_pb2.GetAccountRequest(account_id=account_id)
        await self._timed(self._stub.GetAccount(request, timeout=CALL_TIMEOUT_SECONDS), count)

    async def _finish(self, operation: str, transaction_id: str, count: bool) -> bool:
        """SettleTransaction or CancelTransaction; True when answered."""
        finish: Awaitable[object]
        if operation == "settle":
            finish = self._stub.SettleTransaction(
                ledger_pb2.SettleTransactionRequest(transaction_id=transaction_id),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        else:
            finish = self._stub.CancelTransaction(
                ledger_pb2.CancelTransactionRequest(transaction_id=transaction_id),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        return await self._timed(finish, count) is not None

    async def _run_batch(self, count: bool) -> None:
        """One batch call of `batch` items (a read stays one unary call)."""
        operation = self._random.choice(self._mix)
        if operation == "read":
            await self._read(self._random.choice(self._accounts), count)
        elif operation in TRANSFER_OPERATIONS:
            pairs = self._pairs[operation]
            transfers = [_new_transfer(*pairs.pick(self._random)) for _ in range(self._batch)]
            moved = await self._transfer_batch(transfers, count)
            if count:
                self._tally.add_transactions(moved, self._started_monotonic)
        elif operation == "create":
            writes = [
                _new_write(
                    self._random.choice(self._accounts), self._random.choice(CREATE_MIX_AMOUNTS), settled=True
                )
                for _ in range(self._batch)
            ]
            acknowledged = await self._create_batch(writes, count)
            if count:
                self._tally.add_transactions(len(acknowledged), self._started_monotonic)
        else:
            pending = [
                _new_write(self._random.choice(self._accounts), -1, settled=False) for _ in range(self._batch)
            ]
            created = await self._create_batch(pending, count)
            if created:
                ids = [write.answered.id for write in created if write.answered is not None]
                succeeded = await self._finish_batch(operation, ids, count)
                if count:
                    self._tally.add_transactions(succeeded, self._started_monotonic)

    async def _run_one(self, count: bool) -> None:
        operation = self._random.choice(self._mix)
        if operation in TRANSFER_OPERATIONS:
            write = _new_transfer(*self._pairs[operation].pick(self._random))
            if await self._transfer(write, count) and count:
                self._tally.add_transactions(1, self._started_monotonic)
            return
        account_id = self._random.choice(self._accounts)
        if operation == "read":
            await self._read(account_id, count)
            return
        if operation == "create":
            amount = self._random.choice(CREATE_MIX_AMOUNTS)
            if await self._create(_new_write(account_id, amount, settled=True), count) and count:
                self._tally.add_transactions(1, self._started_monotonic)
            return
        transaction_id = await self._create(_new_write(account_id, -1, settled=False), count)
        if transaction_id is None:
            return
        # A settle or cancel of unknown fate is not re-sent: the balance check reads each
        # transaction's final status from the ledger, whatever it is.
        if await self._finish(operation, transaction_id, count) and count:
            self._tally.add_transactions(1, self._started_monotonic)


class _SdkClient(_Client):
    """A client whose every call goes through the SDK's `AsyncLedgerClient`, as an application
    would make them: single creates and transfers are auto-batched with the other clients'
    concurrent ones, and retryable failures are retried with the same request id. Batch calls
    (--batch) are the plain client's; the SDK batches by itself."""

    def __init__(
        self,
        sdk: AsyncLedgerClient,
        stub: Stub,
        accounts: list[str],
        mix: list[str],
        *,
        seed: int,
        tally: _Tally,
        pairs: dict[str, TransferPairs] | None = None,
    ) -> None:
        super().__init__(stub, accounts, mix, seed=seed, tally=tally, batch=1, pairs=pairs)
        self._sdk = sdk

    async def _create(self, write: _Write, count: bool) -> str | None:
        request = write.request
        transaction = await self._timed(
            self._sdk.create_transaction(
                request.account_id,
                request.amount,
                settled=request.settled,
                description=request.description,
                request_id=request.request_id,
            ),
            count,
        )
        if transaction is None:
            self._tally.add_unresolved([write])  # may still apply: resolve it after the run
            return None
        if transaction.status is TransactionStatus.SETTLED:
            self._tally.book_transaction(transaction.account_id, settled_amount_of(transaction))
        return transaction.id

    async def _transfer(self, write: _TransferWrite, count: bool) -> bool:
        request = write.request
        transfer = await self._timed(
            self._sdk.create_transfer(
                request.debit_account_id,
                request.credit_account_id,
                request.amount,
                settled=request.settled,
                description=request.description,
                request_id=request.request_id,
            ),
            count,
        )
        if transfer is None:
            self._tally.add_unresolved([write])  # may still apply: resolve it after the run
            return False
        moved = settled_amount_of(transfer) if transfer.status is TransferStatus.SETTLED else 0
        self._tally.book_transfer(transfer.debit_account_id, transfer.credit_account_id, moved)
        if not moved and count:
            self._tally.errors[f"TRANSFER_STATUS_{transfer.status.value}"] += 1
        return bool(moved)

    async def _read(self, account_id: str, count: bool) -> None:
        await self._timed(self._sdk.get_account(account_id), count)

    async def _finish(self, operation: str, transaction_id: str, count: bool) -> bool:
        if operation == "settle":
            return await self._timed(self._sdk.settle_transaction(transaction_id), count) is not None
        return await self._timed(self._sdk.cancel_transaction(transaction_id), count) is not None


# --- phases ------------------------------------------------------------------------------------


async def _for_each(
    items: Sequence[Item], function: Callable[[Item], Awaitable[Answer]], concurrency: int
) -> list[Answer]:
    """`function` on every item, at most `concurrency` at a time; answers in item order. The first
    failure cancels the rest and is raised."""
    answers: dict[int, Answer] = {}
    indexes = iter(range(len(items)))

    async def drain() -> None:
        # One shared iterator: the loop runs one coroutine at a time, so no index is taken twice.
        for index in indexes:
            answers[index] = await function(items[index])

    tasks = [asyncio.create_task(drain()) for _ in range(min(concurrency, len(items)))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            done, _ = await asyncio.wait(tasks, timeout=CANCELLED_TASKS_WAIT_SECONDS)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: a second failure is not logged as unseen
    return [answers[index] for index in range(len(items))]


async def _setup_accounts(
    stub: Stub, request_ids: Sequence[str], progress: Callable[[str], None]
) -> list[str]:
    """One account per CreateAccount request id, each topped up with SETUP_BALANCE."""
    created = 0
    count = len(request_ids)

    async def create(request_id: str) -> str:
        nonlocal created
        account = (
            await stub.CreateAccount(
                ledger_pb2.CreateAccountRequest(request_id=request_id), timeout=CALL_TIMEOUT_SECONDS
            )
        ).account
        await stub.CreateTransaction(
            ledger_pb2.CreateTransactionRequest(
                account_id=account.id,
                amount=SETUP_BALANCE,
                settled=True,
                description="bench setup",
                request_id=new_request_id(),
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        created += 1
        if created % SETUP_PROGRESS_EVERY_ACCOUNTS == 0:
            progress(f"created {created}/{count} accounts")
        return account.id

    return await _for_each(request_ids, create, SETUP_CONCURRENCY_MAX)


async def _check_existing_accounts(stub: Stub, account_ids: Sequence[str]) -> dict[str, int]:
    """Every account named by --accounts-file exists and holds enough to pay for the run; returns
    each one's settled balance. Raises BenchError otherwise: a missing account fails every write
    and a drained one every purchase, and the run would measure refusals."""
    settled: dict[str, int] = {}

    async def check(account_id: str) -> str | None:
        try:
            account = (
                await stub.GetAccount(
                    ledger_pb2.GetAccountRequest(account_id=account_id, consistent=True),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            ).account
        except grpc.RpcError as error:
            if error_details(error).code == grpc.StatusCode.NOT_FOUND:
                return f"{account_id} does not exist"
            raise
        if account.available_balance < ACCOUNTS_FILE_BALANCE_MIN:
            return f"{account_id} holds {account.available_balance}, below {ACCOUNTS_FILE_BALANCE_MIN}"
        settled[account_id] = account.settled_balance
        return None

    problems = [problem for problem in await _for_each(account_ids, check, SETUP_CONCURRENCY_MAX) if problem]
    if problems:
        raise BenchError(
            f"{len(problems)} of the {len(account_ids)} accounts given cannot carry the run"
            f" (was the preloaded state restored?): {'; '.join(problems[:3])}"
        )
    return settled


async def _resolve_unknown(stub: Stub, unresolved: list[AnyWrite], tally: _Tally) -> None:
    """Re-send every write of unknown fate with its request_id until it is answered, and book
    what the answered ones moved."""

    async def resend(write: AnyWrite) -> bool:
        """True while the write's fate is still unknown."""
        try:
            if isinstance(write, _TransferWrite):
                write.answered = (
                    await stub.CreateTransfer(write.request, timeout=CALL_TIMEOUT_SECONDS)
                ).transfer
            else:
                write.answered = (
                    await stub.CreateTransaction(write.request, timeout=CALL_TIMEOUT_SECONDS)
                ).transaction
        except grpc.RpcError as error:
            # Any other answer is definite: the write was refused and applied nothing.
            return error_details(error).code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        tally.acknowledge(write)
        return False

    pending = list(unresolved)
    for _ in range(RESEND_ROUNDS_MAX):
        if not pending:
            return
        still_unknown = await _for_each(pending, resend, RESEND_CONCURRENCY_MAX)
        pending = [write for write, unknown in zip(pending, still_unknown, strict=True) if unknown]
        if pending:
            await asyncio.sleep(RESEND_PAUSE_SECONDS)
    if pending:
        raise BenchError(f"{len(pending)} writes of unknown outcome never got an answer")


@dataclass(frozen=True)
class _AccountCheck:
    settled_balance: int
    mismatch: str | None


async def _balance_mismatch(stub: Stub, account_id: str) -> _AccountCheck:
    """The account's settled balance, and whether its balances equal what its listed
    transactions (transfer legs among them) imply; mismatch None when so."""
    transactions: list[ledger_pb2.Transaction] = []
    token = ""
    for _ in range(LIST_PAGES_PER_ACCOUNT_MAX):
        page = await stub.ListTransactions(
            ledger_pb2.ListTransactionsRequest(
                account_id=account_id, page_size=LIST_PAGE_SIZE, page_token=token
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        transactions.extend(page.transactions)
        token = page.next_page_token
        if not token:
            break
    else:
        raise BenchError(f"{account_id}: more than {LIST_PAGES_PER_ACCOUNT_MAX} pages of transactions")
    settled = sum(
        settled_amount_of(t) for t in transactions if t.status == ledger_pb2.TRANSACTION_STATUS_SETTLED
    )
    held = sum(
        -t.amount for t in transactions if t.status == ledger_pb2.TRANSACTION_STATUS_PENDING and t.amount < 0
    )
    account = (
        await stub.GetAccount(
            ledger_pb2.GetAccountRequest(account_id=account_id, consistent=True), timeout=CALL_TIMEOUT_SECONDS
        )
    ).account
    if (account.settled_balance, account.available_balance) == (settled, settled - held):
        return _AccountCheck(account.settled_balance, None)
    return _AccountCheck(
        account.settled_balance,
        f"{account_id}: stored {account.settled_balance}/{account.available_balance},"
        f" transactions give {settled}/{settled - held}",
    )


async def _report_progress(tally: _Tally, progress: Callable[[str], None], unit: str) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
        if tally.counting:
            elapsed = time.monotonic() - tally.measure_started_monotonic
            done = tally.transactions
            per_second = "transfers/s" if unit == "transfers" else "tx/s"
            progress(f"{elapsed:5.1f} s  {done} {unit}  {done / max(elapsed, 1e-9):,.0f} {per_second}")


async def _run_for(clients: list[asyncio.Task[None]], seconds: float) -> None:
    """Let the clients run for `seconds`; a client that fails (a limit, a bug) ends the run at
    once with its error rather than after the window."""
    done, _ = await asyncio.wait(clients, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()
    if done:
        raise BenchError("a client stopped before the window ended")


async def _measure(
    clients: list[_Client],
    tally: _Tally,
    result: BenchResult,
    *,
    warmup_seconds: float,
    duration_seconds: float,
    metrics_urls: list[str],
    silent_metrics_urls: dict[str, str],
    progress: Callable[[str], None],
) -> None:
    """Run the clients through the warm-up and the window; CPU readings bracket the window."""
    tasks = [asyncio.create_task(client.run()) for client in clients]
    reporter: asyncio.Task[None] | None = None
    try:
        await _run_for(tasks, warmup_seconds)
        before = await sample_endpoints(metrics_urls, METRICS_FETCH_TIMEOUT_SECONDS)
        load_generator_cpu_before = time.process_time()
        tally.measure_started_monotonic = time.monotonic()
        tally.counting = True
        reporter = asyncio.create_task(_report_progress(tally, progress, result.unit))
        await _run_for(tasks, duration_seconds)
        tally.counting = False
        tally.stopping = True
        result.measured_seconds = time.monotonic() - tally.measure_started_monotonic
        result.load_generator_cpu_seconds = time.process_time() - load_generator_cpu_before
        after = await sample_endpoints(metrics_urls, METRICS_FETCH_TIMEOUT_SECONDS)
        window = cpu_window(before, after)
        result.cpu = CpuWindow(window.cpu_seconds_by_process, {**silent_metrics_urls, **window.missing})
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), WORKERS_STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            raise BenchError(
                f"clients still busy {WORKERS_STOP_TIMEOUT_SECONDS} s after the window"
            ) from None
    finally:
        helpers = [*tasks, reporter] if reporter is not None else tasks
        for task in helpers:
            task.cancel()
        done, _ = await asyncio.wait(helpers, timeout=CANCELLED_TASKS_WAIT_SECONDS)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: the failure that matters is already raised


async def run_bench_async(
    address: str,
    *,
    accounts: int,
    duration_seconds: float,
    concurrency: int,
    mix: list[str],
    warmup_seconds: float,
    progress: Callable[[str], None],
    batch: int = 1,
    metrics_urls: Sequence[str] | None = None,
    window_seconds: float = WINDOW_SECONDS_DEFAULT,
    existing_account_ids: Sequence[str] | None = None,
    config: ClusterConfig | None = None,
    sdk: bool = False,
) -> BenchResult:
    """The whole bench on the running loop. `metrics_urls` None tries the dev cluster's ports;
    `existing_account_ids` are used (after a check) instead of `accounts` new accounts; `config`
    (the server's cluster config) places accounts on shards, which transfer mixes need; `sdk`
    makes every client's calls through one shared `AsyncLedgerClient`."""
    if sdk and batch > 1:
        raise ValueError("the SDK batches concurrent single calls itself: use batch 1 with the SDK")
    for url in metrics_urls or ():
        problem = loopback_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
    transfer_operations = sorted(set(mix) & set(TRANSFER_OPERATIONS))
    if transfer_operations and config is None:
        raise ValueError(f"{', '.join(transfer_operations)} need the cluster config to place accounts")
    answering, silent = await probe_endpoints(metrics_urls)
    for url, reason in silent.items():
        progress(f"metrics endpoint {url} does not answer ({reason}); its CPU is not reported")
    progress(f"reading CPU from {', '.join(answering)}" if answering else "no metrics endpoint answers")
    credentials = public_client_from_environment()
    async with contextlib.AsyncExitStack() as stack:
        channel = await stack.enter_async_context(credentials.aio_channel(address))
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        sdk_client = (
            await stack.enter_async_context(
                AsyncLedgerClient(
                    address,
                    credentials=credentials,
                    call_timeout_seconds=CALL_TIMEOUT_SECONDS,
                    # One call's time, retries and its wait for a batch included:
                    # WORKERS_STOP_TIMEOUT_SECONDS counts on it.
                    retry_deadline_seconds=CALL_TIMEOUT_SECONDS,
                )
            )
            if sdk
            else None
        )
        if existing_account_ids is None:
            request_ids = (
                spread_request_ids(config.shards, accounts)
                if transfer_operations and config is not None
                else [new_request_id() for _ in range(accounts)]
            )
            account_ids = await _setup_accounts(stub, request_ids, progress)
            start_by_account = dict.fromkeys(account_ids, SETUP_BALANCE)
        else:
            account_ids = list(existing_account_ids)
            start_by_account = await _check_existing_accounts(stub, account_ids)
            progress(f"using {len(account_ids)} existing accounts")
        pairs: dict[str, TransferPairs] = {}
        if config is not None and transfer_operations:
            shard_of = shards_of(config, account_ids)
            pairs = {
                operation: TransferPairs(shard_of, cross_shard=operation == "transfer")
                for operation in transfer_operations
            }
        windows = max(1, math.ceil(duration_seconds / window_seconds - WINDOW_ROUNDING_SLACK))
        tally = _Tally(window_seconds, windows)
        clients = [
            _SdkClient(sdk_client, stub, account_ids, mix, seed=seed, tally=tally, pairs=pairs)
            if sdk_client is not None
            else _Client(stub, account_ids, mix, seed=seed, tally=tally, batch=batch, pairs=pairs)
            for seed in range(concurrency)
        ]
        only_transfers = set(mix) <= set(TRANSFER_OPERATIONS)
        result = BenchResult(
            window_seconds=window_seconds,
            unit="transfers" if only_transfers else "transactions",
            client="sdk" if sdk else "grpc",
        )
        await _measure(
            clients,
            tally,
            result,
            warmup_seconds=warmup_seconds,
            duration_seconds=duration_seconds,
            metrics_urls=answering,
            silent_metrics_urls=silent,
            progress=progress,
        )
        result.operations = tally.operations
        result.transactions = tally.transactions
        result.transactions_by_window = tally.transactions_by_window
        result.latencies_ms = tally.latencies.samples_ms
        result.latency_ms_max = tally.latencies.maximum_ms
        result.errors_by_code = tally.errors
        if tally.unresolved:
            progress(f"re-sending {len(tally.unresolved)} writes of unknown outcome")
        await _resolve_unknown(stub, tally.unresolved, tally)
        checks = await _for_each(
            account_ids, lambda account_id: _balance_mismatch(stub, account_id), CHECK_CONCURRENCY_MAX
        )
        result.balances_checked = len(account_ids)
        result.balance_mismatches = [check.mismatch for check in checks if check.mismatch is not None]
        if set(mix) <= NET_CHECKED_OPERATIONS:
            settled_by_account = {
                account_id: check.settled_balance
                for account_id, check in zip(account_ids, checks, strict=True)
            }
            result.balance_mismatches.extend(
                balance_totals(settled_by_account, start_by_account, tally.net_by_account, tally.outside_net)
            )
        return result


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
    metrics_urls: Sequence[str] | None = None,
    window_seconds: float = WINDOW_SECONDS_DEFAULT,
    existing_account_ids: Sequence[str] | None = None,
    config: ClusterConfig | None = None,
    sdk: bool = False,
) -> BenchResult:
    """Set up accounts (or check `existing_account_ids`), load `address` for the warm-up and the
    window, re-send writes of unknown outcome, then check every account's balances. Raises
    grpc.RpcError when setup or the check fails, BenchError when the run cannot finish."""
    return asyncio.run(
        run_bench_async(
            address,
            accounts=accounts,
            duration_seconds=duration_seconds,
            concurrency=concurrency,
            mix=mix,
            warmup_seconds=warmup_seconds,
            progress=progress,
            batch=batch,
            metrics_urls=metrics_urls,
            window_seconds=window_seconds,
            existing_account_ids=existing_account_ids,
            config=config,
            sdk=sdk,
        )
    )
