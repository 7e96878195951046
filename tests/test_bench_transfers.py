"""The pure parts of `ledger-dev bench --mix transfer`: pairs of accounts by shard, accounts
spread over shards, the bookkeeping of acknowledged transfers, and the balance check that
accounts for them. No server: the end-to-end run is in tests/test_scenario_2.py's module."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ledger_cluster import bench
from ledger_cluster import config as cluster_config
from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.gateway import account_id_for_request
from ledger_cluster.ids import format_account_id

DRAWS = 20_000
# Each debit account of a uniform draw over N accounts gets DRAWS / N; far from it, it is not uniform.
UNIFORM_TOLERANCE = 0.25


def accounts_on(layout: dict[str, int]) -> dict[str, str]:
    """Made-up account ids (16 hex chars) placed on shards: `layout` gives each shard's count."""
    shard_of: dict[str, str] = {}
    for shard_id, count in layout.items():
        for _ in range(count):
            shard_of[format_account_id(len(shard_of) + 1)] = shard_id
    return shard_of


def draw(pairs: bench.TransferPairs, times: int = DRAWS) -> list[tuple[str, str]]:
    chooser = random.Random(7)
    return [pairs.pick(chooser) for _ in range(times)]


def test_cross_shard_pairs_are_on_two_shards_and_uniform() -> None:
    shard_of = accounts_on({"shard-a": 1, "shard-b": 3, "shard-c": 6})
    drawn = draw(bench.TransferPairs(shard_of, cross_shard=True))
    assert all(shard_of[debit] != shard_of[credit] for debit, credit in drawn)
    debits = Counter(debit for debit, _ in drawn)
    assert set(debits) == set(shard_of), "every account is a debit account"
    for count in debits.values():
        assert abs(count - DRAWS / len(shard_of)) < UNIFORM_TOLERANCE * DRAWS / len(shard_of)
    # The lone account of shard-a pairs with each of the other nine.
    lone = next(account for account, shard in shard_of.items() if shard == "shard-a")
    assert {credit for debit, credit in drawn if debit == lone} == set(shard_of) - {lone}


def test_same_shard_pairs_stay_on_one_shard_and_skip_lone_accounts() -> None:
    shard_of = accounts_on({"shard-a": 1, "shard-b": 2, "shard-c": 4})
    drawn = draw(bench.TransferPairs(shard_of, cross_shard=False))
    assert all(shard_of[debit] == shard_of[credit] and debit != credit for debit, credit in drawn)
    debits = Counter(debit for debit, _ in drawn)
    lone = next(account for account, shard in shard_of.items() if shard == "shard-a")
    assert lone not in debits
    assert len(debits) == 6
    on_c = [account for account, shard in shard_of.items() if shard == "shard-c"]
    for account in on_c:
        assert {credit for debit, credit in drawn if debit == account} == set(on_c) - {account}


@pytest.mark.parametrize(
    ("layout", "cross_shard", "kind"),
    [
        ({"shard-a": 5}, True, "two shards"),
        ({"shard-a": 1, "shard-b": 1, "shard-c": 1}, False, "one shard"),
    ],
)
def test_pairs_refuse_accounts_that_cannot_pair(layout: dict[str, int], cross_shard: bool, kind: str) -> None:
    with pytest.raises(
        bench.BenchError, match=f"no two of the {sum(layout.values())} accounts are on {kind}"
    ):
        bench.TransferPairs(accounts_on(layout), cross_shard=cross_shard)


def test_spread_request_ids_deal_accounts_over_the_shards_in_turn() -> None:
    config = cluster_config.generate(3, 4, 3)
    request_ids = bench.spread_request_ids(config.shards, 10)
    assert len(set(request_ids)) == 10
    account_ids = [format_account_id(account_id_for_request(request_id)) for request_id in request_ids]
    shard_of = bench.shards_of(config, account_ids)
    assert [shard_of[account_id] for account_id in account_ids] == [
        config.shards[index % 4].shard_id for index in range(10)
    ]


def transfer(
    debit: str, credit: str, amount: int, status: ledger_pb2.TransferStatus.ValueType, settled_amount: int = 0
) -> ledger_pb2.Transfer:
    return ledger_pb2.Transfer(
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        status=status,
        settled_amount=settled_amount,
    )


def acknowledged(tally: bench._Tally, answered: ledger_pb2.Transfer) -> None:
    write = bench._TransferWrite(ledger_pb2.CreateTransferRequest(), answered)
    tally.acknowledge(write)


def test_acknowledged_transfers_move_only_what_settled() -> None:
    tally = bench._Tally(window_seconds=1.0, windows=1)
    settled = ledger_pb2.TRANSFER_STATUS_SETTLED
    acknowledged(tally, transfer("a", "b", 1, settled))
    acknowledged(tally, transfer("b", "c", 30, settled, settled_amount=20))
    acknowledged(tally, transfer("a", "c", 5, ledger_pb2.TRANSFER_STATUS_INSUFFICIENT_FUNDS))
    acknowledged(tally, transfer("a", "c", 5, ledger_pb2.TRANSFER_STATUS_PENDING))
    top_up = bench._Write(
        ledger_pb2.CreateTransactionRequest(),
        ledger_pb2.Transaction(account_id="c", amount=7, status=ledger_pb2.TRANSACTION_STATUS_SETTLED),
    )
    tally.acknowledge(top_up)
    refused = bench._Write(
        ledger_pb2.CreateTransactionRequest(),
        ledger_pb2.Transaction(
            account_id="a", amount=-9, status=ledger_pb2.TRANSACTION_STATUS_INSUFFICIENT_FUNDS
        ),
    )
    tally.acknowledge(refused)
    assert tally.net_by_account == Counter({"a": -1, "b": 1 - 20, "c": 20 + 7})
    assert tally.outside_net == 7, "transfers are not money entering or leaving the ledger"


def test_balance_totals_accept_conserving_transfers() -> None:
    start = {"a": 100, "b": 100, "c": 0}
    net = Counter({"a": -3, "b": 1, "c": 2})
    assert bench.balance_totals({"a": 97, "b": 101, "c": 2}, start, net, outside_net=0) == []
    # A top-up of 5 on c is money in: the sum moves by it.
    net["c"] += 5
    assert bench.balance_totals({"a": 97, "b": 101, "c": 7}, start, net, outside_net=5) == []


def test_balance_totals_name_the_account_and_the_broken_sum() -> None:
    start = {"a": 100, "b": 100}
    net = Counter({"a": -1, "b": 1})
    # b was credited twice: b is wrong and the sum is no longer conserved.
    problems = bench.balance_totals({"a": 99, "b": 102}, start, net, outside_net=0)
    assert problems == [
        "b: settled 102, its start 100 and acknowledged net 1 give 101",
        "sum of settled balances 201, expected 200 (start plus top-ups and purchases +0):"
        " transfers did not conserve it",
    ]
    # Half a transfer (debited, never credited) breaks the sum but not a's own bookkeeping.
    problems = bench.balance_totals({"a": 99, "b": 100}, start, net, outside_net=0)
    assert problems[0].startswith("b: settled 100")
    assert problems[1].startswith("sum of settled balances 199, expected 200")


def test_net_checked_operations_leave_out_settles_and_cancels() -> None:
    assert {"transfer", "transfer-same", "create", "read"} == set(bench.NET_CHECKED_OPERATIONS)
    assert set(bench.TRANSFER_OPERATIONS) <= set(bench.OPERATIONS)
