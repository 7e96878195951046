#!/usr/bin/env python3
"""Thin script for ledger-gateway, for running from a source tree without installing."""

from ledger_cluster.cli.gateway import main

if __name__ == "__main__":
    main()
