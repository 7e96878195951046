"""docs/http.md's examples run as written, with curl and jq, against a fresh
`ledger-standalone --http-port`, and print what the page says they print."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.processes import REPO_ROOT, clean_environment, free_port, standalone_server, write_generated_config

DOCS_PATH = REPO_ROOT / "docs" / "http.md"
EXAMPLES_TIMEOUT_SECONDS = 60.0


def fenced_block(text: str, heading: str, language: str) -> str:
    """The first ```language block after `heading`."""
    section = text[text.index(heading) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no {language} block after {heading!r} in {DOCS_PATH}"
    return match.group(1)


def test_examples_print_what_the_page_says(tmp_path: Path) -> None:
    text = DOCS_PATH.read_text()
    script = fenced_block(text, "## Examples", "sh")
    expected = fenced_block(text, "prints", "text")
    config_path = write_generated_config(tmp_path / "cluster_config.json", 3, 2, 3)
    with standalone_server(
        tmp_path / "data", config_path, tmp_path / "server.log", http_port=free_port()
    ) as server:
        environment = {**clean_environment(), "LEDGER_HTTP": server.http_url}
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            env=environment,
            capture_output=True,
            text=True,
            timeout=EXAMPLES_TIMEOUT_SECONDS,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
