"""The public LedgerService and what it stands on: validation and page tokens
(`validation`), statuses of outcomes (`outcomes`), per-shard coalescing (`coalescer`), the
standalone and cluster backends (`backends`), and the asyncio service itself (`service`)."""

from ledger_cluster.gateway.backends import ClusterBackend, CoreApi, StandaloneBackend
from ledger_cluster.gateway.service import LedgerService, time_ordered_transaction_number
from ledger_cluster.gateway.validation import account_id_for_request, decode_page_token, encode_page_token

__all__ = [
    "ClusterBackend",
    "CoreApi",
    "LedgerService",
    "StandaloneBackend",
    "account_id_for_request",
    "decode_page_token",
    "encode_page_token",
    "time_ordered_transaction_number",
]
