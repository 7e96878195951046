"""The HTTP/JSON API through a real `ledger-standalone --http-port` and a real HTTP client
(httpx): every route, the Idempotency-Key header, error mapping, paging, the OpenAPI document,
and the same answer as gRPC for the same bad request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from openapi_spec_validator import validate

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.http.app import HTTP_STATUS_BY_CODE
from ledger_cluster.http.routes import ROUTES
from ledger_cluster.limits import PUBLIC_MESSAGE_BYTES_MAX
from ledger_cluster.status import error_details
from tests.processes import StandaloneServer, free_port, standalone_server, write_generated_config

CLIENT_TIMEOUT_SECONDS = 10.0
UNKNOWN_ACCOUNT_ID = "00000000000000ff"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneServer]:
    base = tmp_path_factory.mktemp("http")
    config_path = write_generated_config(base / "cluster_config.json", 3, 4, 3)
    with standalone_server(base / "data", config_path, base / "server.log", http_port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: StandaloneServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=CLIENT_TIMEOUT_SECONDS) as http:
        yield http


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def expect_error(response: httpx.Response, status: int, code: str, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert (body["code"], body["reason"]) == (code, reason), body
    assert body["message"]
    return body


def new_account(client: httpx.Client, **fields: object) -> dict[str, Any]:
    account: dict[str, Any] = ok(client.post("/v1/accounts", json=fields))["account"]
    return account


def create_transaction(client: httpx.Client, account_id: str, **fields: object) -> dict[str, Any]:
    response = client.post(f"/v1/accounts/{account_id}/transactions", json=fields)
    transaction: dict[str, Any] = ok(response)["transaction"]
    return transaction


def balances(client: httpx.Client, account_id: str) -> tuple[int, int]:
    account = ok(client.get(f"/v1/accounts/{account_id}", params={"consistent": "true"}))["account"]
    return int(account["availableBalance"]), int(account["settledBalance"])


def test_accounts_and_transactions(client: httpx.Client) -> None:
    account = new_account(client, currency="USD", metadata={"team": "web"})
    account_id = account["id"]
    assert account["currency"] == "USD"
    assert account["metadata"] == {"team": "web"}
    assert account["availableBalance"] == "0"  # proto3 JSON: int64 as a string, zeros included
    top_up = create_transaction(client, account_id, amount=100, settled=True, description="top-up")
    assert (top_up["status"], top_up["accountId"]) == ("TRANSACTION_STATUS_SETTLED", account_id)
    # int64 accepted as a JSON string too
    captured = create_transaction(client, account_id, amount="-30")
    released = create_transaction(client, account_id, amount=-25)
    assert balances(client, account_id) == (45, 100)
    settled = ok(client.post(f"/v1/transactions/{captured['id']}:settle", json={"amount": -20}))
    assert settled["transaction"]["settledAmount"] == "-20"
    cancelled = ok(client.post(f"/v1/transactions/{released['id']}:cancel"))
    assert cancelled["transaction"]["status"] == "TRANSACTION_STATUS_CANCELLED"
    assert balances(client, account_id) == (80, 80)
    fetched = ok(client.get(f"/v1/transactions/{captured['id']}", params={"consistent": "true"}))
    assert fetched["transaction"]["status"] == "TRANSACTION_STATUS_SETTLED"


def test_paging(client: httpx.Client) -> None:
    account_id = new_account(client)["id"]
    created = [
        create_transaction(client, account_id, amount=amount, settled=True)["id"] for amount in range(1, 6)
    ]
    seen: list[str] = []
    pages = 0
    parameters: dict[str, str | int] = {"page_size": 2}
    while True:
        page = ok(client.get(f"/v1/accounts/{account_id}/transactions", params=parameters))
        pages += 1
        assert len(page["transactions"]) <= 2
        seen += [transaction["id"] for transaction in page["transactions"]]
        if not page["nextPageToken"]:
            break
        parameters = {"pageSize": 2, "page_token": page["nextPageToken"]}  # either name works
    assert seen == created
    assert pages == 3
    bad_token = client.get(f"/v1/accounts/{account_id}/transactions", params={"page_token": "garbage"})
    expect_error(bad_token, 400, "INVALID_ARGUMENT", "INVALID_PAGE_TOKEN")


def test_idempotency_key(client: httpx.Client) -> None:
    account_id = new_account(client)["id"]
    path = f"/v1/accounts/{account_id}/transactions"
    headers = {"Idempotency-Key": "order-17"}
    first = ok(client.post(path, json={"amount": 40, "settled": True}, headers=headers))["transaction"]
    again = ok(client.post(path, json={"amount": 40, "settled": True}, headers=headers))["transaction"]
    assert again["id"] == first["id"]
    assert balances(client, account_id) == (40, 40)
    reused = client.post(path, json={"amount": 41, "settled": True}, headers=headers)
    expect_error(reused, 409, "ALREADY_EXISTS", "REQUEST_ID_REUSED")
    differing = client.post(path, json={"amount": 40, "requestId": "other"}, headers=headers)
    expect_error(differing, 400, "INVALID_ARGUMENT", "IDEMPOTENCY_KEY_MISMATCH")
    same = ok(
        client.post(path, json={"amount": 40, "settled": True, "request_id": "order-17"}, headers=headers)
    )
    assert same["transaction"]["id"] == first["id"]
    on_batch = client.post("/v1/transactions:batchCreate", json={"items": []}, headers=headers)
    expect_error(on_batch, 400, "INVALID_ARGUMENT", "IDEMPOTENCY_KEY_NOT_ACCEPTED")
    account_once = new_account_with_key(client, "account-key-1")
    assert new_account_with_key(client, "account-key-1") == account_once
    assert balances(client, account_id) == (40, 40)


def new_account_with_key(client: httpx.Client, key: str) -> str:
    response = client.post("/v1/accounts", json={}, headers={"Idempotency-Key": key})
    account_id: str = ok(response)["account"]["id"]
    return account_id


def test_transaction_batches(client: httpx.Client) -> None:
    account_id = new_account(client)["id"]
    items = [
        {"accountId": account_id, "amount": 50, "settled": True},
        {"accountId": account_id, "amount": -10},
        {"accountId": account_id, "amount": -5},
        {"accountId": "not-an-id", "amount": 1},
    ]
    results = ok(client.post("/v1/transactions:batchCreate", json={"items": items}))["results"]
    assert [list(result) for result in results] == [["transaction"]] * 3 + [["error"]]
    assert results[3]["error"]["reason"] == "INVALID_ACCOUNT_ID"
    captured, released = results[1]["transaction"]["id"], results[2]["transaction"]["id"]
    settle_body = {"transactionIds": [captured, UNKNOWN_ACCOUNT_ID + "0" * 16]}
    settled = ok(client.post("/v1/transactions:batchSettle", json=settle_body))["results"]
    assert settled[0]["transaction"]["status"] == "TRANSACTION_STATUS_SETTLED"
    assert settled[1]["error"]["code"] == "NOT_FOUND"
    cancelled = ok(client.post("/v1/transactions:batchCancel", json={"transaction_ids": [released]}))[
        "results"
    ]
    assert cancelled[0]["transaction"]["status"] == "TRANSACTION_STATUS_CANCELLED"
    assert balances(client, account_id) == (40, 40)


def test_transfers(client: httpx.Client) -> None:
    debit_id = new_account(client)["id"]
    credit_id = new_account(client)["id"]
    create_transaction(client, debit_id, amount=100, settled=True)
    pending = ok(
        client.post(
            "/v1/transfers", json={"debitAccountId": debit_id, "creditAccountId": credit_id, "amount": 30}
        )
    )["transfer"]
    fetched = ok(client.get(f"/v1/transfers/{pending['id']}", params={"consistent": "true"}))["transfer"]
    assert (fetched["id"], fetched["amount"]) == (pending["id"], "30")
    settled = ok(client.post(f"/v1/transfers/{pending['id']}:settle", json={"amount": 20}))["transfer"]
    assert settled["settledAmount"] == "20"
    other = ok(
        client.post(
            "/v1/transfers", json={"debitAccountId": debit_id, "creditAccountId": credit_id, "amount": 5}
        )
    )["transfer"]
    cancelled = ok(client.post(f"/v1/transfers/{other['id']}:cancel"))["transfer"]
    assert cancelled["status"] == "TRANSFER_STATUS_CANCELLED"
    items = [
        {"debitAccountId": debit_id, "creditAccountId": credit_id, "amount": 10, "settled": True},
        {"debitAccountId": debit_id, "creditAccountId": debit_id, "amount": 1, "settled": True},
    ]
    results = ok(client.post("/v1/transfers:batchCreate", json={"items": items}))["results"]
    assert results[0]["transfer"]["amount"] == "10"
    assert results[1]["error"]["reason"] == "SAME_ACCOUNT"
    assert balances(client, debit_id) == (70, 70)
    assert balances(client, credit_id) == (30, 30)
    missing = client.get(f"/v1/transfers/{UNKNOWN_ACCOUNT_ID}{'0' * 16}", params={"consistent": "true"})
    expect_error(missing, 404, "NOT_FOUND", "TRANSFER_NOT_FOUND")


def test_errors_change_nothing(client: httpx.Client) -> None:
    account_id = new_account(client)["id"]
    create_transaction(client, account_id, amount=7, settled=True)
    path = f"/v1/accounts/{account_id}/transactions"
    expect_error(client.get(f"/v1/accounts/{UNKNOWN_ACCOUNT_ID}"), 404, "NOT_FOUND", "ACCOUNT_NOT_FOUND")
    body = expect_error(client.get("/v1/accounts/xyz"), 400, "INVALID_ARGUMENT", "INVALID_ACCOUNT_ID")
    assert body["metadata"] == {"account_id": "xyz"}
    expect_error(client.post(path, json={"amount": 0}), 400, "INVALID_ARGUMENT", "INVALID_AMOUNT")
    malformed = client.post(path, content=b'{"amount": 5', headers={"content-type": "application/json"})
    expect_error(malformed, 400, "INVALID_ARGUMENT", "MALFORMED_JSON")
    expect_error(client.post(path, json=[1]), 400, "INVALID_ARGUMENT", "MALFORMED_JSON")
    expect_error(client.post(path, json={"amout": 5}), 400, "INVALID_ARGUMENT", "MALFORMED_REQUEST")
    expect_error(client.post(path, json={"amount": "five"}), 400, "INVALID_ARGUMENT", "MALFORMED_REQUEST")
    expect_error(client.get(path, params={"colour": "red"}), 400, "INVALID_ARGUMENT", "MALFORMED_REQUEST")
    other = {"accountId": UNKNOWN_ACCOUNT_ID, "amount": 5}
    expect_error(client.post(path, json=other), 400, "INVALID_ARGUMENT", "PATH_MISMATCH")
    overdrawn = create_transaction(client, account_id, amount=-8, settled=True)
    assert overdrawn["status"] == "TRANSACTION_STATUS_INSUFFICIENT_FUNDS"
    expect_error(client.get("/v1/nothing-here"), 404, "NOT_FOUND", "NO_SUCH_PATH")
    expect_error(client.delete(f"/v1/accounts/{account_id}"), 405, "UNIMPLEMENTED", "METHOD_NOT_ALLOWED")
    assert balances(client, account_id) == (7, 7)


def test_bodies_have_the_grpc_size_limit(client: httpx.Client) -> None:
    account_id = new_account(client)["id"]
    path = f"/v1/accounts/{account_id}/transactions"
    padding = b" " * (PUBLIC_MESSAGE_BYTES_MAX + 1)
    declared = client.post(path, content=padding, headers={"content-type": "application/json"})
    expect_error(declared, 413, "RESOURCE_EXHAUSTED", "BODY_TOO_LARGE")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        chunk = b" " * (1024 * 1024)
        for _ in range(PUBLIC_MESSAGE_BYTES_MAX // len(chunk) + 1):
            yield chunk

    streamed = client.post(path, content=chunks(), headers={"content-type": "application/json"})
    expect_error(streamed, 413, "RESOURCE_EXHAUSTED", "BODY_TOO_LARGE")
    deep = client.post(path, content=b"[" * 100_000, headers={"content-type": "application/json"})
    expect_error(deep, 400, "INVALID_ARGUMENT", "MALFORMED_JSON")
    assert balances(client, account_id) == (0, 0)


def test_same_rule_as_grpc(server: StandaloneServer, client: httpx.Client) -> None:
    """One validation: the same bad request gets the same code, reason and message on both."""
    account_id = new_account(client)["id"]
    description = "x" * 2000
    over_http = client.post(
        f"/v1/accounts/{account_id}/transactions", json={"amount": 1, "description": description}
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        request = ledger_pb2.CreateTransactionRequest(
            account_id=account_id, amount=1, description=description
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateTransaction(request, timeout=CLIENT_TIMEOUT_SECONDS)
    over_grpc = error_details(raised.value)
    body = expect_error(over_http, 400, over_grpc.code.name, over_grpc.reason)
    assert body["message"] == over_grpc.message


def test_openapi_document(client: httpx.Client) -> None:
    document = ok(client.get("/openapi.json"))
    validate(document)
    operations = {
        (path, method.upper()): operation["operationId"]
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    assert operations == {(route.openapi_path, route.http_method): route.rpc for route in ROUTES}
    assert set(operations.values()) == set(
        ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].methods_by_name
    )
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text


def test_every_grpc_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS_BY_CODE) == set(grpc.StatusCode)
    assert HTTP_STATUS_BY_CODE[grpc.StatusCode.FAILED_PRECONDITION] == 400
    assert HTTP_STATUS_BY_CODE[grpc.StatusCode.UNAVAILABLE] == 503
