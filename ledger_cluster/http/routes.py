"""The HTTP paths of LedgerService: one route per RPC, the path naming the resource as in
Google's API design guide (custom methods after a colon, `:settle`, `:batchCreate`)."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor

from ledger_cluster.api.v1 import ledger_pb2

SERVICE_DESCRIPTOR = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"]
# The request field an `Idempotency-Key` header fills.
REQUEST_ID_FIELD = "request_id"


@dataclass(frozen=True)
class HttpRoute:
    http_method: str
    # Starlette's template; `{name:resource}` is one path segment without a colon.
    path: str
    rpc: str
    # Path parameters are request fields of the same name; a GET reads the rest from the query
    # string, any other method from a JSON body.
    path_fields: tuple[str, ...] = ()
    summary: str = ""

    @property
    def request_descriptor(self) -> Descriptor:
        descriptor: Descriptor = SERVICE_DESCRIPTOR.methods_by_name[self.rpc].input_type
        return descriptor

    @property
    def response_descriptor(self) -> Descriptor:
        descriptor: Descriptor = SERVICE_DESCRIPTOR.methods_by_name[self.rpc].output_type
        return descriptor

    @property
    def has_body(self) -> bool:
        return self.http_method != "GET"

    @property
    def takes_idempotency_key(self) -> bool:
        return REQUEST_ID_FIELD in self.request_descriptor.fields_by_name

    @property
    def openapi_path(self) -> str:
        return self.path.replace(":resource}", "}")


ROUTES = (
    HttpRoute("POST", "/v1/accounts", "CreateAccount", summary="Create an account"),
    HttpRoute("GET", "/v1/accounts/{account_id:resource}", "GetAccount", ("account_id",), "Get an account"),
    HttpRoute(
        "POST",
        "/v1/accounts/{account_id:resource}/transactions",
        "CreateTransaction",
        ("account_id",),
        "Create a transaction on an account",
    ),
    HttpRoute(
        "GET",
        "/v1/accounts/{account_id:resource}/transactions",
        "ListTransactions",
        ("account_id",),
        "List an account's transactions, a page at a time",
    ),
    HttpRoute(
        "GET",
        "/v1/transactions/{transaction_id:resource}",
        "GetTransaction",
        ("transaction_id",),
        "Get a transaction",
    ),
    HttpRoute(
        "POST",
        "/v1/transactions/{transaction_id:resource}:settle",
        "SettleTransaction",
        ("transaction_id",),
        "Settle a pending transaction, fully or partially",
    ),
    HttpRoute(
        "POST",
        "/v1/transactions/{transaction_id:resource}:cancel",
        "CancelTransaction",
        ("transaction_id",),
        "Cancel a pending transaction",
    ),
    HttpRoute("POST", "/v1/transactions:batchCreate", "CreateTransactions", summary="Create transactions"),
    HttpRoute("POST", "/v1/transactions:batchSettle", "SettleTransactions", summary="Settle transactions"),
    HttpRoute("POST", "/v1/transactions:batchCancel", "CancelTransactions", summary="Cancel transactions"),
    HttpRoute("POST", "/v1/transfers", "CreateTransfer", summary="Create a transfer between two accounts"),
    HttpRoute(
        "GET", "/v1/transfers/{transfer_id:resource}", "GetTransfer", ("transfer_id",), "Get a transfer"
    ),
    HttpRoute(
        "POST",
        "/v1/transfers/{transfer_id:resource}:settle",
        "SettleTransfer",
        ("transfer_id",),
        "Settle a pending transfer, fully or partially",
    ),
    HttpRoute(
        "POST",
        "/v1/transfers/{transfer_id:resource}:cancel",
        "CancelTransfer",
        ("transfer_id",),
        "Cancel a pending transfer",
    ),
    HttpRoute("POST", "/v1/transfers:batchCreate", "CreateTransfers", summary="Create transfers"),
)
