"""The import rules of DESIGN.md §1, read from the source: a layer that reached past its
neighbours would still run, so only a check of the imports themselves notices."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ledger_cluster"
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def sources() -> list[Path]:
    return [path for path in PACKAGE.rglob("*.py") if not path.name.endswith(GENERATED)]


def importers_of(prefix: str) -> set[str]:
    return {
        str(path.relative_to(PACKAGE))
        for path in sources()
        if any(module == prefix or module.startswith(prefix + ".") for module in imported_modules(path))
    }


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        ("lmdb", {"storage.py"}),
        (
            "pysyncobj",
            {"replica.py", "raft_loop.py", "replica_dump.py", "replica_leadership.py", "replica_journal.py"},
        ),
    ],
)
def test_a_library_is_imported_by_its_one_layer(library: str, allowed: set[str]) -> None:
    assert importers_of(library) <= allowed


@pytest.mark.parametrize("forbidden", ["ledger_cluster.api", "grpc", "time", "random", "uuid", "secrets"])
def test_the_core_imports_no_public_api_clock_or_randomness(forbidden: str) -> None:
    core = {name for name in importers_of(forbidden) if name.startswith("core/")}
    assert core == set(), f"{sorted(core)} import {forbidden}"


def test_the_check_sees_imports() -> None:
    """The scan itself: the gateway does import the public API, so a scan that found nothing
    anywhere would be no check at all."""
    assert "gateway/views.py" in importers_of("ledger_cluster.api")
    assert importers_of("lmdb") == {"storage.py"}
