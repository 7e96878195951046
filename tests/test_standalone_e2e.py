"""End-to-end tests of a real `ledger-standalone` process over real gRPC on 127.0.0.1, checked
against the public contract in shared/API.md.

Most tests share one server per module (and per config: the repo's cluster_config.json and a
small generated one); the restart and kill -9 tests start their own.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.gateway import account_id_for_request
from ledger_cluster.ids import format_account_id
from ledger_cluster.sdk.retry import DEFAULT_RETRY_DEADLINE_SECONDS as SDK_DEFAULT_RETRY_DEADLINE_SECONDS
from ledger_cluster.status import ERROR_DOMAIN, ErrorDetails, error_details
from tests.processes import (
    LEDGER_SERVICE_NAME,
    LOOPBACK_HOST,
    REPO_CONFIG_PATH,
    REPO_ROOT,
    StandaloneServer,
    free_port,
    health_status,
    log_tail,
    managed_process,
    run_dev_cli,
    standalone_command,
    standalone_server,
    write_generated_config,
)

RPC_TIMEOUT_SECONDS = 10.0
CLI_TIMEOUT_SECONDS = 60.0
WRITER_START_TIMEOUT_SECONDS = 20.0
WRITER_JOIN_TIMEOUT_SECONDS = RPC_TIMEOUT_SECONDS + 5.0
# The kill -9 lands at a random moment this long after the writer has some acknowledged writes.
KILL_JITTER_SECONDS = 0.3
WRITES_BEFORE_KILL = 20
KILL_ROUNDS = 2
# Freshly stamped times must be close to this machine's clock.
CLOCK_SKEW_MAX_NS = 60 * 10**9

INT64_MAX = 2**63 - 1
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
DESCRIPTION_BYTES_MAX = 1024
REQUEST_ID_BYTES_MAX = 128

PENDING = ledger_pb2.TRANSACTION_STATUS_PENDING
SETTLED = ledger_pb2.TRANSACTION_STATUS_SETTLED
CANCELLED = ledger_pb2.TRANSACTION_STATUS_CANCELLED
INSUFFICIENT_FUNDS = ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

LEDGER_METHODS = {
    "CreateAccount",
    "GetAccount",
    "CreateTransaction",
    "GetTransaction",
    "ListTransactions",
    "SettleTransaction",
    "CancelTransaction",
    "CreateTransactions",
    "SettleTransactions",
    "CancelTransactions",
}
ACCOUNT_ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
TRANSACTION_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
PORT_IN_USE_LOG = re.compile(r"address already in use|cannot listen", re.IGNORECASE)

Stub = ledger_pb2_grpc.LedgerServiceStub
State = tuple[ledger_pb2.Account, list[ledger_pb2.Transaction]]


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["repo-config", "generated-config"])
def config_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's cluster_config.json, and a small generated config (3 nodes, 4 shards)."""
    if request.param == "repo-config":
        return REPO_CONFIG_PATH
    return write_generated_config(tmp_path_factory.mktemp("config") / "cluster_config.json", 3, 4, 3)


@pytest.fixture(scope="module")
def server(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    base = tmp_path_factory.mktemp("standalone")
    with standalone_server(base / "data", config_path, base / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: StandaloneServer) -> Iterator[Stub]:
    with grpc.insecure_channel(server.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


def test_http_port_is_off_unless_given(server: StandaloneServer) -> None:
    assert server.http_port is None
    assert "HTTP API" not in server.process.log_path.read_text()


# -- helpers --------------------------------------------------------------------------------------


def new_account(stub: Stub, request_id: str = "") -> ledger_pb2.Account:
    request = ledger_pb2.CreateAccountRequest(request_id=request_id)
    return stub.CreateAccount(request, timeout=RPC_TIMEOUT_SECONDS).account


def create(
    stub: Stub,
    account_id: str,
    amount: int,
    *,
    settled: bool = True,
    description: str = "",
    request_id: str = "",
) -> ledger_pb2.Transaction:
    request = ledger_pb2.CreateTransactionRequest(
        account_id=account_id,
        amount=amount,
        description=description,
        settled=settled,
        request_id=request_id,
    )
    return stub.CreateTransaction(request, timeout=RPC_TIMEOUT_SECONDS).transaction


def settle(stub: Stub, transaction_id: str) -> ledger_pb2.Transaction:
    request = ledger_pb2.SettleTransactionRequest(transaction_id=transaction_id)
    return stub.SettleTransaction(request, timeout=RPC_TIMEOUT_SECONDS).transaction


def cancel(stub: Stub, transaction_id: str) -> ledger_pb2.Transaction:
    request = ledger_pb2.CancelTransactionRequest(transaction_id=transaction_id)
    return stub.CancelTransaction(request, timeout=RPC_TIMEOUT_SECONDS).transaction


def get_account(stub: Stub, account_id: str, consistent: bool = True) -> ledger_pb2.Account:
    request = ledger_pb2.GetAccountRequest(account_id=account_id, consistent=consistent)
    return stub.GetAccount(request, timeout=RPC_TIMEOUT_SECONDS).account


def get_transaction(stub: Stub, transaction_id: str, consistent: bool = True) -> ledger_pb2.Transaction:
    request = ledger_pb2.GetTransactionRequest(transaction_id=transaction_id, consistent=consistent)
    return stub.GetTransaction(request, timeout=RPC_TIMEOUT_SECONDS).transaction


def list_page(
    stub: Stub, account_id: str, page_size: int = 0, page_token: str = "", consistent: bool = True
) -> ledger_pb2.ListTransactionsResponse:
    request = ledger_pb2.ListTransactionsRequest(
        account_id=account_id, page_size=page_size, page_token=page_token, consistent=consistent
    )
    return stub.ListTransactions(request, timeout=RPC_TIMEOUT_SECONDS)


def list_all(stub: Stub, account_id: str, page_size: int = PAGE_SIZE_MAX) -> list[ledger_pb2.Transaction]:
    transactions: list[ledger_pb2.Transaction] = []
    token = ""
    while True:
        page = list_page(stub, account_id, page_size=page_size, page_token=token)
        transactions.extend(page.transactions)
        token = page.next_page_token
        if not token:
            return transactions


def state_of(stub: Stub, account_id: str) -> State:
    return get_account(stub, account_id), list_all(stub, account_id)


def unknown_account_id() -> str:
    """A well-formed account id that no account has (one in 2**64 chance otherwise)."""
    return format_account_id(secrets.randbits(64))


def error_infos(error: grpc.RpcError) -> list[error_details_pb2.ErrorInfo]:
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None, f"no google.rpc.Status in the trailers of {error!r}"
    infos: list[error_details_pb2.ErrorInfo] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    return infos


def expect_error(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> ErrorDetails:
    """Run `call`; it must fail with `code` and exactly one ErrorInfo (`reason`, our domain)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    details = error_details(caught.value)
    assert (details.code, details.reason) == (code, reason), details
    infos = error_infos(caught.value)
    assert [(info.reason, info.domain) for info in infos] == [(reason, ERROR_DOMAIN)], infos
    return details


def settled_sum(transactions: list[ledger_pb2.Transaction]) -> int:
    return sum(t.amount for t in transactions if t.status == SETTLED)


def assert_fresh_timestamps(created_at: int, updated_at: int) -> None:
    assert abs(created_at - time.time_ns()) < CLOCK_SKEW_MAX_NS, created_at
    assert updated_at == created_at


# -- scenario-1 through the dev CLI ---------------------------------------------------------------

SCENARIO_LINE = re.compile(
    r"^(?P<step>\d+)\s{2}(?P<action>.+?)\s{2,}(?P<transaction>[0-9a-f]{32}|-)\s+(?P<amount>-?\d+|-)\s+"
    r"(?P<status>[A-Z_]+|-)\s+available/settled (?P<available>-?\d+)/(?P<settled>-?\d+)$"
)


def run_dev(*arguments: str) -> subprocess.CompletedProcess[str]:
    completed = run_dev_cli(arguments, CLI_TIMEOUT_SECONDS, cwd=REPO_ROOT)
    assert completed.returncode == 0, (
        f"ledger-dev {' '.join(arguments)} exited {completed.returncode}"
        f"\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    return completed


def test_scenario_1_via_dev_cli(server: StandaloneServer, stub: Stub) -> None:
    seeded = run_dev("seed-accounts", "--count", "3", "--gateway", server.address)
    account_ids = seeded.stdout.split()
    assert len(account_ids) == 3, seeded.stdout
    assert len(set(account_ids)) == 3
    for account_id in account_ids:
        assert ACCOUNT_ID_PATTERN.match(account_id), account_id
        assert get_account(stub, account_id).id == account_id

    account_id = account_ids[1]
    output = run_dev("scenario-1", "--account-id", account_id, "--gateway", server.address).stdout
    steps = [match for line in output.splitlines() if (match := SCENARIO_LINE.match(line))]
    assert [int(step["step"]) for step in steps] == [1, 2, 3, 4, 5], output
    balances = [(int(step["available"]), int(step["settled"])) for step in steps]
    assert balances == [(0, 0), (100, 100), (90, 100), (90, 90), (90, 90)], output
    assert steps[0]["transaction"] == "-"
    assert [step["status"] for step in steps[1:]] == [
        "SETTLED",
        "PENDING",
        "SETTLED",
        "INSUFFICIENT_FUNDS",
    ], output
    assert [int(step["amount"]) for step in steps[1:]] == [100, -10, -10, -1000], output
    assert steps[2]["transaction"] == steps[3]["transaction"], "step 4 settles the purchase of step 3"

    # The server agrees with what the CLI printed; the other seeded accounts are untouched.
    stored = list_all(stub, account_id)
    assert [t.id for t in stored] == [
        steps[1]["transaction"],
        steps[2]["transaction"],
        steps[4]["transaction"],
    ]
    assert [(t.amount, t.status) for t in stored] == [
        (100, SETTLED),
        (-10, SETTLED),
        (-1000, INSUFFICIENT_FUNDS),
    ]
    account = get_account(stub, account_id)
    assert (account.available_balance, account.settled_balance) == (90, 90)
    for other in (account_ids[0], account_ids[2]):
        assert list_all(stub, other) == []


def test_scenario_1_refusals_end_the_command_with_the_status_and_reason(server: StandaloneServer) -> None:
    missing = run_dev_cli(
        ["scenario-1", "--account-id", "00000000000000ff", "--gateway", server.address],
        CLI_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
    )
    assert missing.returncode == 1
    assert "NOT_FOUND ACCOUNT_NOT_FOUND: account not found" in missing.stderr
    # Nothing listens there: retried within --timeout-seconds, then its status without a
    # reason (the channel's own failure carries none).
    nobody = f"{LOOPBACK_HOST}:{free_port()}"
    started = time.monotonic()
    unreachable = run_dev_cli(
        ["scenario-1", "--account-id", "00000000000000ff", "--gateway", nobody, "--timeout-seconds", "1"],
        CLI_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
    )
    assert unreachable.returncode == 1
    assert f"Error: {nobody}: UNAVAILABLE: " in unreachable.stderr
    # Given up after its 1 s, not the SDK's default deadline (30 s); the rest is start-up.
    assert time.monotonic() - started < SDK_DEFAULT_RETRY_DEADLINE_SECONDS / 2


# -- INVALID_ARGUMENT -----------------------------------------------------------------------------


def test_invalid_account_id(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 50)
    before = state_of(stub, account.id)
    bad_ids = [
        "",
        account.id.upper() if account.id.upper() != account.id else "ABCDEF0123456789",
        "ABCDEF0123456789",
        account.id[:-1],
        account.id + "0",
        "0123456789abcdeg",
        " " + account.id[1:],
        account.id + account.id,  # a transaction id is not an account id
    ]
    for bad in bad_ids:
        expect_error(partial(get_account, stub, bad), INVALID_ARGUMENT, "INVALID_ACCOUNT_ID")
        expect_error(partial(get_account, stub, bad, False), INVALID_ARGUMENT, "INVALID_ACCOUNT_ID")
        expect_error(partial(create, stub, bad, 10), INVALID_ARGUMENT, "INVALID_ACCOUNT_ID")
        expect_error(partial(list_page, stub, bad), INVALID_ARGUMENT, "INVALID_ACCOUNT_ID")
    assert state_of(stub, account.id) == before


def test_invalid_transaction_id(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 50)
    pending = create(stub, account.id, -20, settled=False)
    before = state_of(stub, account.id)
    upper = pending.id.upper() if pending.id.upper() != pending.id else "A" * 32
    bad_ids = ["", upper, pending.id[:-1], pending.id + "0", account.id, pending.id[:-1] + "g"]
    for bad in bad_ids:
        for call in (get_transaction, settle, cancel):
            expect_error(partial(call, stub, bad), INVALID_ARGUMENT, "INVALID_TRANSACTION_ID")
    assert state_of(stub, account.id) == before
    assert get_transaction(stub, pending.id).status == PENDING


def test_zero_amount_is_invalid(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 5)
    before = state_of(stub, account.id)
    for settled in (True, False):
        expect_error(
            partial(create, stub, account.id, 0, settled=settled), INVALID_ARGUMENT, "INVALID_AMOUNT"
        )
    assert state_of(stub, account.id) == before


def test_description_limit_counts_utf8_bytes(stub: Stub) -> None:
    account = new_account(stub)
    before = state_of(stub, account.id)
    too_long = ["a" * (DESCRIPTION_BYTES_MAX + 1), "é" * (DESCRIPTION_BYTES_MAX // 2) + "a", "€" * 342]
    for description in too_long:
        assert len(description.encode()) > DESCRIPTION_BYTES_MAX
        expect_error(
            partial(create, stub, account.id, 10, description=description),
            INVALID_ARGUMENT,
            "DESCRIPTION_TOO_LONG",
        )
    assert state_of(stub, account.id) == before

    fitting = ["é" * (DESCRIPTION_BYTES_MAX // 2), "€" * 341 + "a", "a" * DESCRIPTION_BYTES_MAX]
    for description in fitting:
        assert len(description.encode()) == DESCRIPTION_BYTES_MAX
        created = create(stub, account.id, 10, description=description)
        assert created.description == description
        assert get_transaction(stub, created.id).description == description
    assert [t.description for t in list_all(stub, account.id)] == fitting


def test_request_id_limit_counts_utf8_bytes(stub: Stub) -> None:
    account = new_account(stub)
    before = state_of(stub, account.id)
    too_long = ["r" * (REQUEST_ID_BYTES_MAX + 1), "é" * (REQUEST_ID_BYTES_MAX // 2) + "x"]
    for request_id in too_long:
        assert len(request_id.encode()) == REQUEST_ID_BYTES_MAX + 1
        expect_error(
            partial(create, stub, account.id, 10, request_id=request_id),
            INVALID_ARGUMENT,
            "REQUEST_ID_TOO_LONG",
        )
        expect_error(partial(new_account, stub, request_id), INVALID_ARGUMENT, "REQUEST_ID_TOO_LONG")
        # Nothing stored: not the account that request_id would have created either.
        would_be = format_account_id(account_id_for_request(request_id))
        expect_error(partial(get_account, stub, would_be), NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert state_of(stub, account.id) == before

    suffix = secrets.token_hex(4)
    fitting = "r" * (REQUEST_ID_BYTES_MAX - len(suffix)) + suffix
    multi_byte = "é" * (REQUEST_ID_BYTES_MAX // 2 - len(suffix)) + suffix
    for request_id in (fitting, multi_byte):
        assert len(request_id.encode()) <= REQUEST_ID_BYTES_MAX
        create(stub, account.id, 10, request_id=request_id)
        assert ACCOUNT_ID_PATTERN.match(new_account(stub, request_id=request_id).id)
    assert len(list_all(stub, account.id)) == 2


def test_negative_page_size_is_invalid(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 5)
    for page_size in (-1, -1000, -(2**31)):
        expect_error(partial(list_page, stub, account.id, page_size), INVALID_ARGUMENT, "INVALID_PAGE_SIZE")
    assert len(list_all(stub, account.id)) == 1


def test_invalid_page_token(stub: Stub) -> None:
    account = new_account(stub)
    other = new_account(stub)
    for amount in (1, 2, 3):
        create(stub, account.id, amount)
        create(stub, other.id, amount)
    before = state_of(stub, account.id)
    own_token = list_page(stub, account.id, page_size=1).next_page_token
    other_token = list_page(stub, other.id, page_size=1).next_page_token
    assert own_token
    assert other_token
    tampered = own_token[:-2] + ("AA" if own_token[-2:] != "AA" else "BB")
    for token in ("garbage", "!!!", other_token, tampered, own_token[:-4], own_token + "AAAA"):
        expect_error(partial(list_page, stub, account.id, 1, token), INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert state_of(stub, account.id) == before
    # The genuine token still works.
    assert list(list_page(stub, account.id, page_size=1, page_token=own_token).transactions) == before[1][1:2]


# -- NOT_FOUND ------------------------------------------------------------------------------------


def test_unknown_account_is_not_found(stub: Stub) -> None:
    missing = unknown_account_id()
    for consistent in (True, False):
        expect_error(partial(get_account, stub, missing, consistent), NOT_FOUND, "ACCOUNT_NOT_FOUND")
        expect_error(partial(list_page, stub, missing, 0, "", consistent), NOT_FOUND, "ACCOUNT_NOT_FOUND")
    for settled in (True, False):
        expect_error(partial(create, stub, missing, 10, settled=settled), NOT_FOUND, "ACCOUNT_NOT_FOUND")
    # Still unknown: the failed creates made no account.
    expect_error(partial(get_account, stub, missing), NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_unknown_transaction_is_not_found(stub: Stub) -> None:
    account = new_account(stub)
    known = create(stub, account.id, 10, settled=False)
    before = state_of(stub, account.id)
    number = int(known.id[16:], 16)
    missing_here = account.id + f"{(number + 1) % 2**64:016x}"
    for call in (get_transaction, settle, cancel):
        expect_error(partial(call, stub, missing_here), NOT_FOUND, "TRANSACTION_NOT_FOUND")
    assert state_of(stub, account.id) == before
    # A transaction id under an account that does not exist is NOT_FOUND as well.
    missing_account = unknown_account_id() + known.id[16:]
    for call in (get_transaction, settle, cancel):
        with pytest.raises(grpc.RpcError) as caught:
            call(stub, missing_account)
        details = error_details(caught.value)
        assert details.code == NOT_FOUND, details
        assert details.reason in {"TRANSACTION_NOT_FOUND", "ACCOUNT_NOT_FOUND"}, details


# -- FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE ----------------------------------------------


def test_finishing_a_non_pending_transaction_fails(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 100)
    cancelled = cancel(stub, create(stub, account.id, -30, settled=False).id)
    settled = settle(stub, create(stub, account.id, -20, settled=False).id)
    instant = create(stub, account.id, 5, settled=True)
    refused = create(stub, account.id, -1000, settled=True)
    refused_pending = create(stub, account.id, -1000, settled=False)
    assert (cancelled.status, settled.status, instant.status) == (CANCELLED, SETTLED, SETTLED)
    assert (refused.status, refused_pending.status) == (INSUFFICIENT_FUNDS, INSUFFICIENT_FUNDS)
    before = state_of(stub, account.id)
    assert (before[0].available_balance, before[0].settled_balance) == (85, 85)

    failing = [
        (settle, cancelled.id),
        (cancel, settled.id),
        (cancel, instant.id),
        (settle, refused.id),
        (cancel, refused.id),
        (settle, refused_pending.id),
        (cancel, refused_pending.id),
    ]
    for call, transaction_id in failing:
        expect_error(
            partial(call, stub, transaction_id),
            grpc.StatusCode.FAILED_PRECONDITION,
            "TRANSACTION_NOT_PENDING",
        )
    assert state_of(stub, account.id) == before


def test_request_id_reused_with_other_payload(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 100)
    original = create(stub, account.id, 10, settled=False, description="first", request_id="order-1")
    before = state_of(stub, account.id)
    # (amount, settled, description): each differs from the original in one field.
    variants = [(11, False, "first"), (10, True, "first"), (10, False, "second"), (-10, False, "first")]
    for amount, settled, description in variants:
        expect_error(
            partial(
                create,
                stub,
                account.id,
                amount,
                settled=settled,
                description=description,
                request_id="order-1",
            ),
            grpc.StatusCode.ALREADY_EXISTS,
            "REQUEST_ID_REUSED",
        )
    assert state_of(stub, account.id) == before
    # The scope is one account: another account may use the same request_id.
    other = new_account(stub)
    elsewhere = create(stub, other.id, 11, request_id="order-1")
    assert elsewhere.id != original.id
    assert elsewhere.account_id == other.id


def test_balance_overflow_is_out_of_range(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 1)
    before = state_of(stub, account.id)
    for settled in (True, False):
        expect_error(
            partial(create, stub, account.id, INT64_MAX, settled=settled),
            grpc.StatusCode.OUT_OF_RANGE,
            "BALANCE_OVERFLOW",
        )
    assert state_of(stub, account.id) == before
    # Exactly up to the limit is fine.
    create(stub, account.id, INT64_MAX - 1)
    full = get_account(stub, account.id)
    assert (full.available_balance, full.settled_balance) == (INT64_MAX, INT64_MAX)
    expect_error(partial(create, stub, account.id, 1), grpc.StatusCode.OUT_OF_RANGE, "BALANCE_OVERFLOW")
    assert get_account(stub, account.id) == full


def test_balance_overflow_counts_pending_top_ups(stub: Stub) -> None:
    account = new_account(stub)
    pending = create(stub, account.id, INT64_MAX, settled=False)
    before = state_of(stub, account.id)
    assert (before[0].available_balance, before[0].settled_balance) == (0, 0)
    for settled in (True, False):
        expect_error(
            partial(create, stub, account.id, 1, settled=settled),
            grpc.StatusCode.OUT_OF_RANGE,
            "BALANCE_OVERFLOW",
        )
    assert state_of(stub, account.id) == before
    # Settling the held top-up reaches exactly int64 max; cancelling it instead frees the room.
    cancel(stub, pending.id)
    create(stub, account.id, 1)
    assert get_account(stub, account.id).settled_balance == 1

    second = new_account(stub)
    held = create(stub, second.id, INT64_MAX, settled=False)
    assert settle(stub, held.id).status == SETTLED
    assert get_account(stub, second.id).settled_balance == INT64_MAX


# -- semantics -------------------------------------------------------------------------------------


def test_balances_follow_pending_settle_and_cancel(stub: Stub) -> None:
    account = new_account(stub)
    assert_fresh_timestamps(account.created_at, account.updated_at)
    assert (account.available_balance, account.settled_balance) == (0, 0)

    def balances() -> tuple[int, int]:
        current = get_account(stub, account.id)
        return current.available_balance, current.settled_balance

    pending_top_up = create(stub, account.id, 40, settled=False, description="held top-up")
    assert pending_top_up.status == PENDING
    assert TRANSACTION_ID_PATTERN.match(pending_top_up.id)
    assert pending_top_up.id.startswith(account.id)
    assert pending_top_up.account_id == account.id
    assert pending_top_up.description == "held top-up"
    assert_fresh_timestamps(pending_top_up.created_at, pending_top_up.updated_at)
    assert balances() == (0, 0)
    settled_top_up = settle(stub, pending_top_up.id)
    assert settled_top_up.status == SETTLED
    assert settled_top_up.created_at == pending_top_up.created_at
    assert settled_top_up.updated_at >= settled_top_up.created_at
    assert balances() == (40, 40)

    assert create(stub, account.id, 60).status == SETTLED
    assert balances() == (100, 100)
    hold = create(stub, account.id, -30, settled=False)
    assert balances() == (70, 100)
    assert cancel(stub, hold.id).status == CANCELLED
    assert balances() == (100, 100)
    hold = create(stub, account.id, -25, settled=False)
    assert balances() == (75, 100)
    assert settle(stub, hold.id).status == SETTLED
    assert balances() == (75, 75)
    dropped_top_up = create(stub, account.id, 500, settled=False)
    assert cancel(stub, dropped_top_up.id).status == CANCELLED
    assert balances() == (75, 75)
    assert create(stub, account.id, -75).status == SETTLED
    assert balances() == (0, 0)
    assert create(stub, account.id, -1).status == INSUFFICIENT_FUNDS
    assert create(stub, account.id, -1, settled=False).status == INSUFFICIENT_FUNDS
    assert balances() == (0, 0)

    final = get_account(stub, account.id)
    assert final.created_at == account.created_at
    assert final.updated_at > final.created_at
    transactions = list_all(stub, account.id)
    assert final.settled_balance == settled_sum(transactions)


def test_settle_settled_and_cancel_cancelled_return_unchanged(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 100)
    settled = settle(stub, create(stub, account.id, -10, settled=False).id)
    cancelled = cancel(stub, create(stub, account.id, -20, settled=False).id)
    instant = create(stub, account.id, 7, settled=True)
    before = state_of(stub, account.id)
    for _ in range(2):
        assert settle(stub, settled.id) == settled
        assert cancel(stub, cancelled.id) == cancelled
        assert settle(stub, instant.id) == instant
    assert state_of(stub, account.id) == before
    assert (before[0].available_balance, before[0].settled_balance) == (97, 97)


def test_transaction_request_id_repeat_returns_original(stub: Stub) -> None:
    account = new_account(stub)
    create(stub, account.id, 100)
    original = create(stub, account.id, -40, settled=False, description="order", request_id="pay-1")
    after_first = state_of(stub, account.id)
    repeat = create(stub, account.id, -40, settled=False, description="order", request_id="pay-1")
    assert repeat == original
    assert state_of(stub, account.id) == after_first
    assert (after_first[0].available_balance, after_first[0].settled_balance) == (60, 100)

    # Still the original result after the transaction has moved on, and still not stored twice.
    settle(stub, original.id)
    after_settle = state_of(stub, account.id)
    again = create(stub, account.id, -40, settled=False, description="order", request_id="pay-1")
    assert again.id == original.id
    assert again.created_at == original.created_at
    assert (again.amount, again.description) == (-40, "order")
    assert state_of(stub, account.id) == after_settle
    assert [t.id for t in after_settle[1]].count(original.id) == 1

    # An INSUFFICIENT_FUNDS result is the original result too.
    refused = create(stub, account.id, -1000, request_id="pay-2")
    assert refused.status == INSUFFICIENT_FUNDS
    assert create(stub, account.id, -1000, request_id="pay-2") == refused


def test_account_request_id_repeat_returns_same_account(stub: Stub) -> None:
    request_id = f"signup-{secrets.token_hex(8)}"
    first = new_account(stub, request_id=request_id)
    repeat = new_account(stub, request_id=request_id)
    assert repeat.id == first.id
    assert repeat.created_at == first.created_at
    create(stub, first.id, 10)
    later = new_account(stub, request_id=request_id)
    assert later.id == first.id
    assert get_account(stub, first.id).settled_balance == 10
    assert new_account(stub, request_id=request_id + "-other").id != first.id
    # Without a request_id every call creates a new account.
    assert new_account(stub).id != new_account(stub).id


@pytest.fixture(scope="module")
def account_with_250(stub: Stub) -> tuple[str, list[str]]:
    account = new_account(stub)
    ids = [create(stub, account.id, 1 + index % 7, description=f"t{index}").id for index in range(250)]
    return account.id, ids


def test_list_transactions_pages_in_creation_order(
    stub: Stub, account_with_250: tuple[str, list[str]]
) -> None:
    account_id, created = account_with_250
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = list_page(stub, account_id, page_size=100, page_token=token)
        sizes.append(len(page.transactions))
        seen.extend(t.id for t in page.transactions)
        token = page.next_page_token
        if not token:
            break
    assert sizes == [100, 100, 50]
    assert seen == created
    assert [t.description for t in list_all(stub, account_id)] == [f"t{index}" for index in range(250)]


def test_page_size_zero_means_default_and_exact_last_page_has_no_token(
    stub: Stub, account_with_250: tuple[str, list[str]]
) -> None:
    account_id, created = account_with_250
    first = list_page(stub, account_id, page_size=0)
    assert [t.id for t in first.transactions] == created[:PAGE_SIZE_DEFAULT]
    assert first.next_page_token
    second = list_page(stub, account_id, page_token=first.next_page_token)
    assert [t.id for t in second.transactions] == created[PAGE_SIZE_DEFAULT : 2 * PAGE_SIZE_DEFAULT]
    # 250 = 5 * 50: the fifth page is the last one and carries no token.
    sizes: list[int] = []
    token = ""
    while True:
        page = list_page(stub, account_id, page_size=50, page_token=token)
        sizes.append(len(page.transactions))
        token = page.next_page_token
        if not token:
            break
    assert sizes == [50] * 5
    everything = list_page(stub, account_id, page_size=250)
    assert [t.id for t in everything.transactions] == created
    assert everything.next_page_token == ""
    # An account without transactions lists one empty last page.
    empty = list_page(stub, new_account(stub).id)
    assert (list(empty.transactions), empty.next_page_token) == ([], "")


def test_page_size_above_max_is_clamped(stub: Stub) -> None:
    account = new_account(stub)
    created = [create(stub, account.id, 1).id for _ in range(PAGE_SIZE_MAX + 1)]
    for page_size in (PAGE_SIZE_MAX + 1, 5000, 2**31 - 1):
        first = list_page(stub, account.id, page_size=page_size)
        assert [t.id for t in first.transactions] == created[:PAGE_SIZE_MAX]
        assert first.next_page_token
        rest = list_page(stub, account.id, page_size=page_size, page_token=first.next_page_token)
        assert [t.id for t in rest.transactions] == created[PAGE_SIZE_MAX:]
        assert rest.next_page_token == ""
    assert get_account(stub, account.id).settled_balance == PAGE_SIZE_MAX + 1


def test_consistent_reads(stub: Stub) -> None:
    account = new_account(stub)
    for index in range(20):
        written = create(stub, account.id, 10 + index, settled=index % 2 == 0)
        # A consistent read started after the acknowledgement sees the write.
        assert get_transaction(stub, written.id, consistent=True) == written
        assert get_account(stub, account.id, consistent=True).available_balance == sum(
            10 + i for i in range(0, index + 1, 2)
        )
        listed = list_page(stub, account.id, page_size=PAGE_SIZE_MAX, consistent=True).transactions
        assert listed[-1] == written
        assert len(listed) == index + 1
    assert get_account(stub, account.id, consistent=True) == get_account(stub, account.id, consistent=False)
    assert list_page(stub, account.id, consistent=True) == list_page(stub, account.id, consistent=False)


# -- health and reflection ------------------------------------------------------------------------


def test_health_is_serving(server: StandaloneServer) -> None:
    assert health_status(server.address, "") == "SERVING"
    assert health_status(server.address, LEDGER_SERVICE_NAME) == "SERVING"
    with pytest.raises(grpc.RpcError) as caught:
        health_status(server.address, "no.such.Service")
    assert cast(grpc.Call, caught.value).code() == NOT_FOUND


def test_reflection_lists_ledger_service(server: StandaloneServer) -> None:
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=LEDGER_SERVICE_NAME),
    ]
    with grpc.insecure_channel(server.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(reflection.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT_SECONDS))
    assert len(responses) == 2
    services = {str(service.name) for service in responses[0].list_services_response.service}
    assert LEDGER_SERVICE_NAME in services
    assert "grpc.health.v1.Health" in services

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in responses[1].file_descriptor_response.file_descriptor_proto
    ]
    ledger_files = [f for f in files if f.package == "ledger_cluster.api.v1"]
    assert ledger_files, [f.name for f in files]
    service = next(s for f in ledger_files for s in f.service if s.name == "LedgerService")
    assert {method.name for method in service.method} >= LEDGER_METHODS


# -- durability -----------------------------------------------------------------------------------


def test_graceful_restart_keeps_everything(config_path: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "server.log"
    with standalone_server(data_dir, config_path, log_path) as first:
        with grpc.insecure_channel(first.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            accounts = [new_account(stub, request_id="restart-account"), new_account(stub), new_account(stub)]
            keyed: ledger_pb2.Transaction | None = None
            held: ledger_pb2.Transaction | None = None
            for index, account in enumerate(accounts):
                create(stub, account.id, 100 + index, description=f"top-up {index}")
                held = create(stub, account.id, -10, settled=False, description="held")
                cancel(stub, create(stub, account.id, -5, settled=False).id)
                settle(stub, create(stub, account.id, -7, settled=False).id)
                create(stub, account.id, -10_000)
                keyed = create(stub, account.id, 3, settled=False, request_id="restart-tx")
            before = {account.id: state_of(stub, account.id) for account in accounts}
        exit_code = first.process.stop()
        if exit_code != 0:
            first.process.fail(f"exit code {exit_code} after SIGTERM; expected 0")
    assert keyed is not None
    assert held is not None

    with standalone_server(data_dir, config_path, log_path) as second:
        with grpc.insecure_channel(second.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            after = {account.id: state_of(stub, account.id) for account in accounts}
            assert after == before
            for account_id, (account, _) in before.items():
                assert (account.available_balance, account.settled_balance) != (0, 0), account_id
            # Idempotency keys survived too.
            assert new_account(stub, request_id="restart-account").id == accounts[0].id
            assert create(stub, keyed.account_id, 3, settled=False, request_id="restart-tx").id == keyed.id
            # Writing goes on where it stopped: new transactions come last, holds can be settled.
            assert settle(stub, held.id).status == SETTLED
            appended = create(stub, held.account_id, 1)
            assert list_all(stub, held.account_id)[-1] == appended
            assert len(list_all(stub, held.account_id)) == len(before[held.account_id][1]) + 1
        exit_code = second.process.stop()
        if exit_code != 0:
            second.process.fail(f"exit code {exit_code} after SIGTERM; expected 0")


@dataclass
class WriterLog:
    acknowledged: list[ledger_pb2.Transaction] = field(default_factory=list)
    error: BaseException | None = None


def run_writer(address: str, account_ids: list[str], stop: threading.Event, log: WriterLog) -> None:
    """Create transactions one at a time until stopped or the server goes away."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            index = 0
            while not stop.is_set():
                account_id = account_ids[index % len(account_ids)]
                amount = -23 if index % 4 == 3 else 5 + index % 17
                log.acknowledged.append(create(stub, account_id, amount, description=f"w{index}"))
                index += 1
    except BaseException as error:  # the server's death ends the writer; the test inspects it
        log.error = error


def verify_after_crash(
    stub: Stub, account_ids: list[str], acknowledged: list[ledger_pb2.Transaction], unacknowledged_max: int
) -> None:
    unacknowledged = 0
    for account_id in account_ids:
        stored = list_all(stub, account_id)
        stored_ids = [t.id for t in stored]
        assert len(stored_ids) == len(set(stored_ids)), f"{account_id}: a transaction is listed twice"
        by_id = {t.id: t for t in stored}
        mine = [t for t in acknowledged if t.account_id == account_id]
        for transaction in mine:
            assert by_id.get(transaction.id) == transaction, f"acknowledged {transaction.id} lost or changed"
        # Acknowledged transactions are listed in the order they were acknowledged.
        acknowledged_ids = {t.id for t in mine}
        assert [i for i in stored_ids if i in acknowledged_ids] == [t.id for t in mine]
        unacknowledged += len(stored_ids) - len(mine)
        account = get_account(stub, account_id)
        assert account.settled_balance == settled_sum(stored), account
        assert account.available_balance == account.settled_balance, account
    # One writer, one request in flight per crash: at most that many writes the client never heard of.
    assert 0 <= unacknowledged <= unacknowledged_max


def test_kill_9_keeps_every_acknowledged_transaction(config_path: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "server.log"
    acknowledged: list[ledger_pb2.Transaction] = []
    account_ids: list[str] = []
    for crash in range(KILL_ROUNDS):
        with standalone_server(data_dir, config_path, log_path) as running:
            with grpc.insecure_channel(running.address) as channel:
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                if not account_ids:
                    account_ids = [new_account(stub).id for _ in range(4)]
                verify_after_crash(stub, account_ids, acknowledged, unacknowledged_max=crash)

            log = WriterLog()
            stop = threading.Event()
            writer = threading.Thread(
                target=run_writer, args=(running.address, account_ids, stop, log), name="writer"
            )
            writer.start()
            try:
                deadline = time.monotonic() + WRITER_START_TIMEOUT_SECONDS
                while len(log.acknowledged) < WRITES_BEFORE_KILL:
                    if not writer.is_alive():
                        running.process.fail(f"writer ended before the kill: {log.error!r}")
                    if time.monotonic() > deadline:
                        running.process.fail(f"only {len(log.acknowledged)} writes acknowledged")
                    time.sleep(0.01)
                time.sleep(random.uniform(0, KILL_JITTER_SECONDS))  # an arbitrary moment
                assert running.process.kill() == -signal.SIGKILL
                writer.join(WRITER_JOIN_TIMEOUT_SECONDS)
                assert not writer.is_alive(), "writer still running after the server was killed"
            finally:
                stop.set()
                writer.join(WRITER_JOIN_TIMEOUT_SECONDS)
            assert isinstance(log.error, grpc.RpcError), log.error
            acknowledged.extend(log.acknowledged)

    with (
        standalone_server(data_dir, config_path, log_path) as final,
        grpc.insecure_channel(final.address) as channel,
    ):
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        verify_after_crash(stub, account_ids, acknowledged, unacknowledged_max=KILL_ROUNDS)
        assert len(acknowledged) >= KILL_ROUNDS * WRITES_BEFORE_KILL


def test_second_server_on_same_port_fails(server: StandaloneServer, stub: Stub, tmp_path: Path) -> None:
    command = standalone_command(server.port, tmp_path / "data", server.config_path)
    with managed_process("second ledger-standalone", command, tmp_path / "second.log") as second:
        exit_code = second.wait_exit()
        if exit_code == 0:
            second.fail(f"a second server on the taken port {server.port} exited 0")
        # It failed because of the port, not for some other reason.
        if not PORT_IN_USE_LOG.search(log_tail(second.log_path)):
            second.fail(f"exited {exit_code}, but the log does not say the port is in use")
    # The first server is unharmed and still answers alone on its port.
    assert health_status(server.address) == "SERVING"
    account = new_account(stub)
    assert get_account(stub, account.id).id == account.id


def test_second_server_on_same_data_dir_fails(server: StandaloneServer, stub: Stub, tmp_path: Path) -> None:
    command = standalone_command(free_port(), server.data_dir, server.config_path)
    with managed_process("second ledger-standalone", command, tmp_path / "second.log") as second:
        exit_code = second.wait_exit()
        if exit_code == 0:
            second.fail("a second server on the same data directory exited 0")
        if "in use by another process" not in log_tail(second.log_path):
            second.fail(f"exited {exit_code}, but the log does not say the data directory is in use")
    # The first server still owns its data and keeps serving.
    account = new_account(stub)
    assert get_account(stub, account.id).id == account.id


def test_dev_bench_reports_json_and_checks_balances(server: StandaloneServer) -> None:
    command = [
        sys.executable,
        "-m",
        "ledger_cluster.cli.dev",
        "bench",
        "--gateway",
        server.address,
        "--accounts",
        "5",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--concurrency",
        "4",
        "--json",
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, cwd=REPO_ROOT, check=False
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["transactions"] > 0
    assert summary["throughput_tx_per_s"] > 0
    assert 0 < summary["latency_ms_p50"] <= summary["latency_ms_p99"] <= summary["latency_ms_max"]
    assert summary["errors_by_code"] == {}
    assert summary["balances_checked"] == 5
    assert summary["balance_mismatches"] == []
    # The servers' CPU needs a metrics endpoint, which this test does not count on; the load
    # generator's own CPU is always measured.
    assert summary["load_generator_cpu_us_per_tx"] > 0
    for key in ("cpu_us_per_tx", "cpu_us_per_tx_by_process", "cpu_seconds_by_process", "metrics_missing"):
        assert key in summary, key


def test_dev_bench_rejects_an_unknown_operation(server: StandaloneServer) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "ledger_cluster.cli.dev",
            "bench",
            "--gateway",
            server.address,
            "--mix",
            "fly",
        ],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
        check=False,
    )
    assert completed.returncode == 2
    assert "unknown operations ['fly']" in completed.stderr
