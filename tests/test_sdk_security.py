"""The SDK's clients against a standalone server that serves TLS and checks bearer tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from ledger_cluster.dev_certificates import DevelopmentCertificates
from ledger_cluster.errors import ConfigError
from ledger_cluster.sdk import AsyncLedgerClient, LedgerClient, UnauthenticatedError
from ledger_cluster.security import (
    CLIENT_TLS_CA_ENVIRONMENT_VARIABLE,
    CLIENT_TOKEN_ENVIRONMENT_VARIABLE,
)
from tests.processes import (
    tls_standalone_server,
)

CLIENT_TOKEN = "client-token-for-the-sdk-tests-000000001"
OTHER_TOKEN = "client-token-nobody-was-ever-given-000002"
# A quick refusal: an unauthenticated call is not retried, so it needs no long deadline.
REFUSAL_DEADLINE_SECONDS = 5.0


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, certificates: DevelopmentCertificates
) -> Iterator[str]:
    with tls_standalone_server(tmp_path_factory.mktemp("sdk-tls"), certificates, CLIENT_TOKEN) as server:
        yield server.address


def test_the_sync_client_presents_tls_roots_from_a_path_and_a_token(
    tls_server: str, certificates: DevelopmentCertificates
) -> None:
    with LedgerClient(tls_server, tls_root_certificates=certificates.ca_path, token=CLIENT_TOKEN) as client:
        account = client.create_account("EUR")
        assert client.get_account(account.id).id == account.id
    refused = LedgerClient(
        tls_server,
        tls_root_certificates=str(certificates.ca_path),
        token=OTHER_TOKEN,
        retry_deadline_seconds=REFUSAL_DEADLINE_SECONDS,
    )
    with refused, pytest.raises(UnauthenticatedError, match="UNAUTHENTICATED"):
        refused.create_account("EUR")


def test_the_async_client_presents_tls_roots_as_bytes_and_needs_the_token(
    tls_server: str, certificates: DevelopmentCertificates
) -> None:
    roots = certificates.ca_path.read_bytes()

    async def scenario() -> None:
        async with AsyncLedgerClient(tls_server, tls_root_certificates=roots, token=CLIENT_TOKEN) as client:
            account = await client.create_account("EUR")
            assert (await client.create_transaction(account.id, 5, settled=True)).amount == 5
        async with AsyncLedgerClient(tls_server, tls_root_certificates=roots) as anonymous:
            with pytest.raises(UnauthenticatedError, match="UNAUTHENTICATED"):
                await anonymous.create_account("EUR")

    asyncio.run(scenario())


def test_a_token_is_never_sent_in_the_clear_beyond_loopback() -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        LedgerClient("192.0.2.1:8000", token=CLIENT_TOKEN)


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_from_environment_reads_the_token_and_the_tls_roots(
    tls_server: str, certificates: DevelopmentCertificates, monkeypatch: pytest.MonkeyPatch, client_kind: str
) -> None:
    monkeypatch.setenv(CLIENT_TLS_CA_ENVIRONMENT_VARIABLE, str(certificates.ca_path))
    monkeypatch.setenv(CLIENT_TOKEN_ENVIRONMENT_VARIABLE, CLIENT_TOKEN)
    if client_kind == "sync":
        deadline = REFUSAL_DEADLINE_SECONDS
        with LedgerClient.from_environment(tls_server, retry_deadline_seconds=deadline) as client:
            account = client.create_account("EUR")
            assert client.get_account(account.id).id == account.id
    else:

        async def scenario() -> None:
            async with AsyncLedgerClient.from_environment(
                tls_server, retry_deadline_seconds=REFUSAL_DEADLINE_SECONDS
            ) as client:
                account = await client.create_account("EUR")
                assert (await client.get_account(account.id)).id == account.id

        asyncio.run(scenario())
    # The same roots with another token: the server refuses, so the token did come from there.
    monkeypatch.setenv(CLIENT_TOKEN_ENVIRONMENT_VARIABLE, OTHER_TOKEN)
    with (
        LedgerClient.from_environment(tls_server, retry_deadline_seconds=REFUSAL_DEADLINE_SECONDS) as refused,
        pytest.raises(UnauthenticatedError, match="UNAUTHENTICATED"),
    ):
        refused.create_account("EUR")
