"""The HTTP API takes the gRPC port's TLS files and client tokens: HTTPS only, and
`Authorization: Bearer <token>` on every call, through a real server and client."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ledger_cluster.dev_certificates import DevelopmentCertificates
from tests.processes import (
    LOOPBACK_HOST,
    free_port,
    tls_standalone_server,
)

CLIENT_TOKEN = "client-token-for-the-http-tests-00000001"
OTHER_TOKEN = "client-token-nobody-was-ever-given-00002"
CLIENT_TIMEOUT_SECONDS = 10.0


@contextmanager
def https_server(base: Path, certificates: DevelopmentCertificates, client_ca: bool) -> Iterator[str]:
    """A ledger-standalone with TLS and client tokens on both ports; yields the HTTPS URL."""
    with tls_standalone_server(
        base, certificates, CLIENT_TOKEN, client_ca=client_ca, http_port=free_port()
    ) as server:
        yield f"https://{LOOPBACK_HOST}:{server.http_port}"


@pytest.fixture(scope="module")
def https_url(
    tmp_path_factory: pytest.TempPathFactory, certificates: DevelopmentCertificates
) -> Iterator[str]:
    with https_server(tmp_path_factory.mktemp("https"), certificates, client_ca=False) as url:
        yield url


@pytest.fixture(scope="module")
def client(https_url: str, certificates: DevelopmentCertificates) -> Iterator[httpx.Client]:
    verify = ssl.create_default_context(cafile=str(certificates.ca_path))
    with httpx.Client(base_url=https_url, verify=verify, timeout=CLIENT_TIMEOUT_SECONDS) as http:
        yield http


def test_calls_need_a_token(client: httpx.Client) -> None:
    for headers in (
        {},
        {"Authorization": f"Bearer {OTHER_TOKEN}"},
        {"Authorization": f"Basic {CLIENT_TOKEN}"},
    ):
        refused = client.post("/v1/accounts", json={}, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (refused.json()["code"], refused.json()["reason"]) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    accepted = client.post("/v1/accounts", json={}, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert accepted.status_code == 200, accepted.text
    account_id = accepted.json()["account"]["id"]
    assert client.get(f"/v1/accounts/{account_id}").status_code == 401


def test_openapi_is_open_and_names_the_scheme(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["security"] == [{"bearer": []}]


def test_plaintext_is_refused(https_url: str) -> None:
    plain_url = https_url.replace("https://", "http://")
    with httpx.Client(timeout=CLIENT_TIMEOUT_SECONDS) as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"{plain_url}/openapi.json")


def test_client_ca_asks_for_a_client_certificate(
    tmp_path: Path, certificates: DevelopmentCertificates
) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    with https_server(tmp_path, certificates, client_ca=True) as url:
        without = ssl.create_default_context(cafile=str(certificates.ca_path))
        with (
            httpx.Client(verify=without, timeout=CLIENT_TIMEOUT_SECONDS) as anonymous,
            pytest.raises(httpx.HTTPError),
        ):
            anonymous.post(f"{url}/v1/accounts", json={}, headers=headers)
        identified = ssl.create_default_context(cafile=str(certificates.ca_path))
        identified.load_cert_chain(str(certificates.certificate_path), str(certificates.key_path))
        with httpx.Client(verify=identified, timeout=CLIENT_TIMEOUT_SECONDS) as client:
            created = client.post(f"{url}/v1/accounts", json={}, headers=headers)
            assert created.status_code == 200, created.text
