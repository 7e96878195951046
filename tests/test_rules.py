"""The rules on commands (`core.rules`), written once for the gateway and the core: each bound
holds exactly, in UTF-8 bytes (not characters), with the reason and message the API returns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger_cluster.core import rules
from ledger_cluster.core.rules import Problem
from ledger_cluster.limits import (
    BATCH_ITEMS_MAX,
    DESCRIPTION_BYTES_MAX,
    INT64_MAX,
    INT64_MIN,
    REQUEST_ID_BYTES_MAX,
)

TWO_BYTES = "é"
FOUR_BYTES = "😀"


@pytest.mark.parametrize("amount", [1, -1, INT64_MAX, INT64_MIN])
def test_any_amount_but_zero_is_allowed(amount: int) -> None:
    assert rules.amount_problem(amount) is None


def test_a_zero_amount_is_refused() -> None:
    assert rules.amount_problem(0) == Problem(
        "INVALID_AMOUNT", "amount must not be zero: > 0 is a top-up, < 0 a purchase"
    )


@pytest.mark.parametrize(
    "description",
    [
        "",
        "x" * DESCRIPTION_BYTES_MAX,
        TWO_BYTES * (DESCRIPTION_BYTES_MAX // 2),
        FOUR_BYTES * (DESCRIPTION_BYTES_MAX // 4),
        # More characters than fit at 4 bytes each, fewer bytes than the bound.
        "x" + TWO_BYTES * (DESCRIPTION_BYTES_MAX // 2 - 1) + "x",
    ],
)
def test_a_description_of_at_most_the_bound_in_bytes_is_allowed(description: str) -> None:
    assert rules.description_problem(description) is None


@pytest.mark.parametrize(
    ("description", "size"),
    [
        ("x" * (DESCRIPTION_BYTES_MAX + 1), DESCRIPTION_BYTES_MAX + 1),
        (TWO_BYTES * (DESCRIPTION_BYTES_MAX // 2) + "x", DESCRIPTION_BYTES_MAX + 1),
        # Under the bound in characters, over it in bytes.
        (FOUR_BYTES * (DESCRIPTION_BYTES_MAX // 4 + 1), DESCRIPTION_BYTES_MAX + 4),
    ],
)
def test_a_description_one_byte_over_the_bound_is_refused(description: str, size: int) -> None:
    assert rules.description_problem(description) == Problem(
        "DESCRIPTION_TOO_LONG", f"description is {size} UTF-8 bytes; at most {DESCRIPTION_BYTES_MAX}"
    )


def test_a_request_id_is_bounded_in_bytes() -> None:
    assert rules.request_id_problem("") is None
    assert rules.request_id_problem("x" * REQUEST_ID_BYTES_MAX) is None
    assert rules.request_id_problem("ü" * (REQUEST_ID_BYTES_MAX // 2)) is None
    assert rules.request_id_problem("ü" * (REQUEST_ID_BYTES_MAX // 2) + "x") == Problem(
        "REQUEST_ID_TOO_LONG",
        f"request_id is {REQUEST_ID_BYTES_MAX + 1} UTF-8 bytes; at most {REQUEST_ID_BYTES_MAX}",
    )
    too_long = rules.request_id_problem("x" * (REQUEST_ID_BYTES_MAX + 1))
    assert too_long is not None and too_long.reason == "REQUEST_ID_TOO_LONG"


@given(text=st.text(alphabet=st.sampled_from(["x", TWO_BYTES, "€", FOUR_BYTES]), max_size=1100))
def test_the_bounds_count_utf8_bytes(text: str) -> None:
    size = len(text.encode())
    assert (rules.description_problem(text) is None) == (size <= DESCRIPTION_BYTES_MAX)
    assert (rules.request_id_problem(text) is None) == (size <= REQUEST_ID_BYTES_MAX)


def test_a_create_transaction_reports_its_first_problem() -> None:
    long_description = "x" * (DESCRIPTION_BYTES_MAX + 1)
    long_request_id = "x" * (REQUEST_ID_BYTES_MAX + 1)
    assert rules.create_transaction_problem(5, "coffee", "r-1") is None

    def reason(amount: int, description: str, request_id: str) -> str | None:
        problem = rules.create_transaction_problem(amount, description, request_id)
        return None if problem is None else problem.reason

    assert reason(0, long_description, long_request_id) == "INVALID_AMOUNT"
    assert reason(1, long_description, long_request_id) == "DESCRIPTION_TOO_LONG"
    assert reason(1, "", long_request_id) == "REQUEST_ID_TOO_LONG"


def test_a_batch_holds_at_most_the_bound() -> None:
    assert rules.batch_size_problem(0) is None
    assert rules.batch_size_problem(BATCH_ITEMS_MAX) is None
    assert rules.batch_size_problem(BATCH_ITEMS_MAX + 1) == Problem(
        "BATCH_TOO_LARGE", f"{BATCH_ITEMS_MAX + 1} items; a batch holds at most {BATCH_ITEMS_MAX}"
    )


def test_the_rules_import_nothing_of_the_public_api_or_grpc() -> None:
    """The core calls them, and the core may not import the public API."""
    assert rules.__file__ is not None
    tree = ast.parse(Path(rules.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    forbidden = {name for name in imported if name.startswith(("grpc", "ledger_cluster.api"))}
    assert not forbidden
    assert "ledger_cluster.limits" in imported  # the walk did see the module's imports


# -- the second wave's fields -------------------------------------------------------------------


@pytest.mark.parametrize("currency", ["", "USD", "EUR_2", "A" * 16, "0"])
def test_currencies_within_the_rule_are_allowed(currency: str) -> None:
    assert rules.currency_problem(currency) is None


@pytest.mark.parametrize("currency", ["usd", "US D", "A" * 17, "€", "USD\n"])
def test_currencies_outside_the_rule_are_refused(currency: str) -> None:
    problem = rules.currency_problem(currency)
    assert problem is not None and problem.reason == "INVALID_CURRENCY"


def test_an_overdraft_limit_is_never_negative() -> None:
    assert rules.overdraft_limit_problem(0) is None
    assert rules.overdraft_limit_problem(INT64_MAX) is None
    problem = rules.overdraft_limit_problem(-1)
    assert problem is not None and problem.reason == "INVALID_OVERDRAFT_LIMIT"


def test_metadata_bounds_hold_exactly() -> None:
    sixteen = [(f"k{index:02}", "v") for index in range(16)]
    assert rules.metadata_problem(sixteen) is None
    assert rules.metadata_problem([("k" * 64, TWO_BYTES * 128)]) is None
    refused = [
        [*sixteen, ("k16", "v")],
        [("k" * 65, "v")],
        [("", "v")],
        [("Key", "v")],
        [("k", TWO_BYTES * 128 + "x")],
        [("k", "a"), ("k", "b")],
    ]
    for entries in refused:
        problem = rules.metadata_problem(entries)
        assert problem is not None and problem.reason == "INVALID_METADATA", entries


def test_a_timeout_belongs_to_pending_writes_of_at_most_30_days() -> None:
    assert rules.timeout_problem(0, settled=True) is None
    assert rules.timeout_problem(30 * 86400, settled=False) is None
    for timeout_seconds, settled in [(1, True), (-1, False), (30 * 86400 + 1, False)]:
        problem = rules.timeout_problem(timeout_seconds, settled)
        assert problem is not None and problem.reason == "INVALID_TIMEOUT"
    assert rules.expires_at_of(5, 0) == 0
    assert rules.expires_at_of(5, 2) == 5 + 2_000_000_000
    assert rules.expires_at_of(INT64_MAX - 1, 10) == INT64_MAX


def test_a_settle_amount_has_the_transactions_sign_and_at_most_its_size() -> None:
    assert rules.settle_amount_problem(0, -50) is None
    assert rules.settle_amount_problem(-50, -50) is None
    assert rules.settle_amount_problem(20, 50) is None
    for requested, amount in [(10, -50), (-51, -50), (51, 50), (-1, 50)]:
        problem = rules.settle_amount_problem(requested, amount)
        assert problem is not None and problem.reason == "INVALID_SETTLE_AMOUNT"


def test_a_transfer_names_two_accounts_and_a_positive_amount() -> None:
    assert rules.create_transfer_problem(1, 2, 5, "", "", (), 0, True) is None
    for debit, credit, amount, reason in [
        (1, 1, 5, "SAME_ACCOUNT"),
        (1, 2, 0, "INVALID_AMOUNT"),
        (1, 2, -5, "INVALID_AMOUNT"),
    ]:
        problem = rules.create_transfer_problem(debit, credit, amount, "", "", (), 0, True)
        assert problem is not None and problem.reason == reason
