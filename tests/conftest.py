"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from ledger_cluster.dev_certificates import DevelopmentCertificates, write_development_certificates


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> DevelopmentCertificates:
    """The development CA and a certificate for the loopback names it signed, made once per run."""
    return write_development_certificates(tmp_path_factory.mktemp("certificates"))
