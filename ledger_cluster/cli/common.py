"""Pieces every command shares: logging, the version flag, config loading, error exits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import grpc

from ledger_cluster import __version__
from ledger_cluster.config import ClusterConfig, load
from ledger_cluster.errors import ConfigError
from ledger_cluster.gateway.service import CALLS_IN_FLIGHT_MAX
from ledger_cluster.metrics import DEFAULT_METRICS_PORT
from ledger_cluster.status import error_details

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The most --calls-in-flight-max accepts: each call in flight holds a coroutine and its request.
CALLS_IN_FLIGHT_LIMIT = 100_000

Command = TypeVar("Command", bound=Callable[..., Any])


def version_option(program: str) -> Callable[[Command], Command]:
    return click.version_option(__version__, "--version", "-V", prog_name=program)


def log_level_option(function: Command) -> Command:
    return click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="INFO",
        show_default=True,
        envvar="LEDGER_LOG_LEVEL",
        help="Logging threshold (env LEDGER_LOG_LEVEL).",
    )(function)


def config_option(function: Command) -> Command:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default="cluster_config.json",
        show_default=True,
        envvar="LEDGER_CONFIG",
        help="Cluster config file (env LEDGER_CONFIG).",
    )(function)


def listen_options(function: Command) -> Command:
    """--host, --port, --metrics-port and --calls-in-flight-max of a public LedgerService
    listener."""
    function = click.option(
        "--calls-in-flight-max",
        type=click.IntRange(1, CALLS_IN_FLIGHT_LIMIT),
        default=CALLS_IN_FLIGHT_MAX,
        show_default=True,
        envvar="LEDGER_CALLS_IN_FLIGHT_MAX",
        help="LedgerService calls served at once; beyond it a call gets RESOURCE_EXHAUSTED"
        " TOO_MANY_REQUESTS at once (health checks are never refused). Env LEDGER_CALLS_IN_FLIGHT_MAX.",
    )(function)
    function = click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        default=DEFAULT_METRICS_PORT,
        show_default=True,
        envvar="LEDGER_METRICS_PORT",
        help="Port of GET /metrics (Prometheus), on --host; 0 picks a free one (env LEDGER_METRICS_PORT).",
    )(function)
    function = click.option(
        "--port",
        type=click.IntRange(0, 65535),
        default=8000,
        show_default=True,
        envvar="LEDGER_PORT",
        help="gRPC port; 0 picks a free one (env LEDGER_PORT).",
    )(function)
    return click.option(
        "--host",
        default="127.0.0.1",
        show_default=True,
        envvar="LEDGER_HOST",
        help="Address to listen on (env LEDGER_HOST).",
    )(function)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def load_config(path: str) -> ClusterConfig:
    try:
        return load(path)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


def describe_rpc_error(error: grpc.RpcError) -> str:
    details = error_details(error)
    reason = f" {details.reason}" if details.reason else ""
    return f"{details.code.name}{reason}: {details.message}"
