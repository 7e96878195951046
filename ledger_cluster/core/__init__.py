"""The deterministic ledger state machine of one shard."""

from ledger_cluster.core.accounts_core import AccountsCore
from ledger_cluster.core.migration import SNAPSHOT_TABLE_IDS
from ledger_cluster.core.tables import SNAPSHOT_TABLES, TABLE_NAMES

__all__ = ["SNAPSHOT_TABLES", "SNAPSHOT_TABLE_IDS", "TABLE_NAMES", "AccountsCore"]
