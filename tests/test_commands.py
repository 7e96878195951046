"""The command format (`core.commands`): what the constructors build parses back to the same
fields, the bytes on the wire stay what the log already holds, and bytes that are no command
parse to a refusal, never an exception."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from ledger_cluster.core import commands
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.limits import INT64_MAX, INT64_MIN

IDS = st.integers(min_value=0, max_value=2**64 - 1)
INT64S = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
TEXTS = st.text(max_size=40)
GARBAGE = b"\xff\xff garbage"


@given(account_id=IDS, request_id=TEXTS, now=INT64S)
def test_create_account_parses_back(account_id: int, request_id: str, now: int) -> None:
    command = commands.create_account(account_id, request_id, now)
    assert commands.parse(command) == commands.CreateAccount(account_id, request_id, now)


@given(
    st.builds(
        commands.CreateTransaction,
        account_id=IDS,
        transaction_number=IDS,
        amount=INT64S,
        description=TEXTS,
        settled=st.booleans(),
        request_id=TEXTS,
        now=INT64S,
    )
)
def test_create_transaction_parses_back(wanted: commands.CreateTransaction) -> None:
    command = commands.create_transaction(
        account_id=wanted.account_id,
        transaction_number=wanted.transaction_number,
        amount=wanted.amount,
        description=wanted.description,
        settled=wanted.settled,
        request_id=wanted.request_id,
        now=wanted.now,
    )
    assert commands.parse(command) == wanted


@given(account_id=IDS, number=IDS, now=INT64S)
def test_settle_and_cancel_parse_back_as_themselves(account_id: int, number: int, now: int) -> None:
    settle = commands.parse(commands.settle_transaction(account_id, number, now))
    cancel = commands.parse(commands.cancel_transaction(account_id, number, now))
    # Same fields, other command: they must never be taken for each other.
    assert settle != cancel
    assert settle == commands.SettleTransaction(account_id, number, now)
    assert cancel == commands.CancelTransaction(account_id, number, now)


@given(now=INT64S)
def test_noop_parses_back(now: int) -> None:
    assert commands.parse(commands.noop(now)) == commands.Noop(now)


@given(items=st.lists(st.binary(max_size=30), max_size=20))
def test_a_batch_keeps_its_items_byte_for_byte_and_in_order(items: list[bytes]) -> None:
    command = commands.batch(items)
    assert commands.parse(command) == commands.Batch(tuple(items))
    assert commands.parse_batch(command) == commands.Batch(tuple(items))
    payload = core_pb2.CommandEnvelope.FromString(command).payload
    assert commands.parse_batch_items(payload) == tuple(items)


def test_the_wire_bytes_never_change() -> None:
    """DESIGN §2 rule 6: type numbers and field numbers are frozen, so every replica reads the
    log it already holds (and a proto move or regeneration changes no byte)."""
    assert commands.create_account(0x1122334455667788, "r", 7).hex() == "080110071a0c098877665544332211120172"
    assert commands.create_transaction(
        account_id=0xA1, transaction_number=2, amount=-3, description="d", settled=True, request_id="r", now=5
    ).hex() == ("080210051a2509a10000000000000011020000000000000018fdffffffffffffffff012201642801320172")
    assert commands.settle_transaction(0xA1, 2, 6).hex() == "080310061a1209a100000000000000110200000000000000"
    assert commands.cancel_transaction(0xA1, 2, 6).hex() == "080410061a1209a100000000000000110200000000000000"
    assert commands.noop().hex() == "0805"
    assert commands.batch([commands.noop(9)]).hex() == "08061a060a0408051009"


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (GARBAGE, "undecodable command"),
        (commands.envelope(core_pb2.CommandType.ValueType(99), 1, b""), "unknown command type 99"),
        (commands.envelope(core_pb2.COMMAND_TYPE_UNSPECIFIED, 1, b""), "unknown command type 0"),
        (commands.envelope(core_pb2.COMMAND_TYPE_CREATE_ACCOUNT, 1, GARBAGE), "undecodable command"),
        (commands.envelope(core_pb2.COMMAND_TYPE_CREATE_TRANSACTION, 1, GARBAGE), "undecodable command"),
        (commands.envelope(core_pb2.COMMAND_TYPE_SETTLE_TRANSACTION, 1, GARBAGE), "undecodable command"),
        (commands.envelope(core_pb2.COMMAND_TYPE_CANCEL_TRANSACTION, 1, GARBAGE), "undecodable command"),
        (commands.envelope(core_pb2.COMMAND_TYPE_BATCH, 0, GARBAGE), "undecodable command"),
    ],
)
def test_bytes_that_are_no_command_parse_to_a_refusal(command: bytes, reason: str) -> None:
    parsed = commands.parse(command)
    assert isinstance(parsed, commands.Undecodable)
    assert parsed.reason.startswith(reason)


@given(data=st.binary(max_size=64))
def test_parse_never_raises(data: bytes) -> None:
    commands.parse(data)
    commands.parse_item(data)
    commands.parse_batch(data)


def test_parse_batch_tells_a_batch_from_anything_else() -> None:
    assert commands.parse_batch(commands.noop()) is None
    assert commands.parse_batch(commands.create_account(1, "", 1)) is None
    # Not even an envelope: a core takes it as one item (and refuses it).
    assert commands.parse_batch(GARBAGE) is None
    # A batch whose items do not decode: refused whole.
    broken = commands.parse_batch(commands.envelope(core_pb2.COMMAND_TYPE_BATCH, 0, GARBAGE))
    assert isinstance(broken, commands.Undecodable)
    with pytest.raises(DecodeError):
        commands.parse_batch_items(GARBAGE)


def test_a_batch_item_may_be_anything_but_a_batch() -> None:
    item = commands.create_account(1, "", 1)
    assert commands.parse_item(item) == commands.parse(item)
    nested = commands.Undecodable("a batch item cannot be a batch")
    assert commands.parse_item(commands.batch([item])) == nested
    # Refused for being a batch, before (and whatever) its items are.
    assert commands.parse_item(commands.envelope(core_pb2.COMMAND_TYPE_BATCH, 0, GARBAGE)) == nested
