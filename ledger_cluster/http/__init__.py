"""LedgerService over HTTP/JSON: resource-style paths that call the very servicer the gRPC
port serves, so every rule lives in one place (the gateway's validation and backend)."""

from ledger_cluster.http.app import HttpSecurity, ledger_http_app
from ledger_cluster.http.server import HttpServer

__all__ = ["HttpSecurity", "HttpServer", "ledger_http_app"]
