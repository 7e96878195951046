"""Every Python example in docs/sdk.md runs, as written, against a real standalone server whose
address is in LEDGER_ADDRESS."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import (
    REPO_CONFIG_PATH,
    REPO_ROOT,
    StandaloneServer,
    clean_environment,
    standalone_server,
)

SDK_DOC_PATH = REPO_ROOT / "docs" / "sdk.md"
EXAMPLE_PATTERN = re.compile(r"```python\n(.*?)```", re.DOTALL)
EXAMPLE_TIMEOUT_SECONDS = 30.0
# The doc has this many examples; a changed count means an example was lost or not picked up.
EXAMPLES_COUNT = 7

EXAMPLES = EXAMPLE_PATTERN.findall(SDK_DOC_PATH.read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    directory = tmp_path_factory.mktemp("sdk-docs")
    with standalone_server(directory / "data", REPO_CONFIG_PATH, directory / "server.log") as running:
        yield running


def test_the_examples_are_all_found() -> None:
    assert len(EXAMPLES) == EXAMPLES_COUNT


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example-{index}" for index in range(len(EXAMPLES))])
def test_the_example_runs(example: str, server: StandaloneServer, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example)
    environment = {**clean_environment(), "LEDGER_ADDRESS": server.address, "PYTHONPATH": str(REPO_ROOT)}
    finished = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_SECONDS,
        env=environment,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
