#!/usr/bin/env python3
"""Thin script for ledger-node, for running from a source tree without installing."""

from ledger_cluster.cli.node import main

if __name__ == "__main__":
    main()
