"""Log entries written by the first wave (PySyncObj's @replicated: a protocol-2 pickle of
`(method id, (envelope,))`) are still applied after an upgrade, read without any class but the
one protocol 2 needs for bytes; anything else a pickle names is refused. The whole upgrade, old
data directories under the new code, was also run by hand (see the issue's note)."""

from __future__ import annotations

import os
import pickle

import pytest
from pysyncobj.pickle import dumps

from ledger_cluster.core import commands
from ledger_cluster.errors import ReplicaBrokenError
from ledger_cluster.replica import _first_wave_envelope


class _RunsACommand:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_a_first_wave_entry_yields_its_envelope() -> None:
    envelope = commands.noop()
    assert _first_wave_envelope(dumps((0, (envelope,)))) == envelope
    assert _first_wave_envelope(dumps((0, (envelope,), {}))) == envelope


def test_a_first_wave_entry_that_names_anything_else_is_refused() -> None:
    with pytest.raises(ReplicaBrokenError, match=r"names posix\.system"):
        _first_wave_envelope(pickle.dumps((0, (_RunsACommand(),)), protocol=2))


def test_a_first_wave_entry_of_another_shape_is_refused() -> None:
    with pytest.raises(ReplicaBrokenError, match="shape"):
        _first_wave_envelope(dumps("not a method call"))
