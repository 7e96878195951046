#!/usr/bin/env python3
"""Thin script for ledger-standalone, for running from a source tree without installing."""

from ledger_cluster.cli.standalone import main

if __name__ == "__main__":
    main()
