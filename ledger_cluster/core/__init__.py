"""The deterministic ledger state machine of one shard."""

from ledger_cluster.core.accounts_core import AccountsCore, verify_balances
from ledger_cluster.core.tables import SNAPSHOT_TABLES, TABLE_NAMES

__all__ = ["SNAPSHOT_TABLES", "TABLE_NAMES", "AccountsCore", "verify_balances"]
