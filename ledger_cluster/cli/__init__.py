"""Command-line entry points: ledger-standalone, ledger-node, ledger-gateway, ledger-dev."""
