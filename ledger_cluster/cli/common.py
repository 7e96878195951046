"""Pieces every command shares: logging, the version flag, config loading, error exits."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import click
import grpc

from ledger_cluster import __version__
from ledger_cluster.config import ClusterConfig, load
from ledger_cluster.errors import ConfigError
from ledger_cluster.gateway.service import CALLS_IN_FLIGHT_MAX
from ledger_cluster.http.server import HttpTls
from ledger_cluster.metrics import DEFAULT_METRICS_PORT
from ledger_cluster.security import (
    CLIENT_TOKENS_ENVIRONMENT_VARIABLE,
    CLUSTER_TOKEN_ENVIRONMENT_VARIABLE,
    CLUSTER_TOKEN_FILE_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE,
    INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE,
    SECRET_BYTES_MIN,
    ServerCredentials,
    read_client_tokens,
    tls_identity,
)
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


def refuse_secret_arguments(given: dict[str, str | None]) -> None:
    """Exit 2 when a secret was given as an argument: it would show in /proc/*/cmdline."""
    for option, value in given.items():
        if value is not None:
            raise click.UsageError(
                f"{option} is refused: a secret on the command line shows in /proc/*/cmdline."
                " Use its environment variable or its --...-file option"
            )


# The environment variables of `public_security_options` (and the client tokens' own).
PUBLIC_SECURITY_VARIABLES = (
    "LEDGER_TLS_CERT",
    "LEDGER_TLS_KEY",
    "LEDGER_TLS_CLIENT_CA",
    "LEDGER_CLIENT_TOKENS_FILE",
    CLIENT_TOKENS_ENVIRONMENT_VARIABLE,
)


@dataclass(frozen=True)
class PublicSecurity:
    """The public listener's TLS files and client token file, as given."""

    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    client_tokens_file: str | None
    allow_weak_secrets: bool

    def server_credentials(self) -> ServerCredentials:
        """UsageError for files that cannot serve (missing half of a pair, short tokens)."""
        # click reads a blank variable as unset, which here would mean "no token asked for".
        for variable in PUBLIC_SECURITY_VARIABLES:
            if variable in os.environ and not os.environ[variable].strip():
                raise click.UsageError(f"{variable} is set but blank; unset it or give it a value")
        try:
            return ServerCredentials(
                tls=tls_identity(self.tls_cert, self.tls_key, self.tls_client_ca),
                tokens=read_client_tokens(self.client_tokens_file, self.allow_weak_secrets),
                who="a client token (Authorization: Bearer ...)",
            )
        except ConfigError as error:
            raise click.UsageError(str(error)) from error

    def http_tls(self) -> HttpTls | None:
        """The HTTP API's TLS: the gRPC port's files (checked by `server_credentials`)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return HttpTls(self.tls_cert, self.tls_key, self.tls_client_ca)


def _collect_public_security(function: Command) -> Command:
    @functools.wraps(function)
    def collected(**arguments: Any) -> Any:
        arguments["public_security"] = PublicSecurity(
            tls_cert=arguments.pop("tls_cert"),
            tls_key=arguments.pop("tls_key"),
            tls_client_ca=arguments.pop("tls_client_ca"),
            client_tokens_file=arguments.pop("client_tokens_file"),
            allow_weak_secrets=arguments.pop("allow_weak_secrets"),
        )
        return function(**arguments)

    return cast(Command, collected)


def public_security_options(function: Command) -> Command:
    """TLS and client tokens of a public LedgerService listener, handed to the command as one
    `public_security: PublicSecurity`."""
    function = _collect_public_security(function)
    existing_file = click.Path(dir_okay=False, exists=True)
    for name, help_text in reversed(
        [
            ("--tls-cert", "PEM certificate chain: serve TLS (env LEDGER_TLS_CERT)."),
            ("--tls-key", "PEM private key of --tls-cert (env LEDGER_TLS_KEY)."),
            ("--tls-client-ca", "PEM CA: require client certificates it signed (env LEDGER_TLS_CLIENT_CA)."),
            (
                "--client-tokens-file",
                "File of accepted client tokens, one per line: every call must carry"
                " `authorization: Bearer <token>` (env LEDGER_CLIENT_TOKENS_FILE, or the tokens"
                f" comma-separated in {CLIENT_TOKENS_ENVIRONMENT_VARIABLE}).",
            ),
        ]
    ):
        variable = "LEDGER_" + name.removeprefix("--").replace("-", "_").upper()
        function = click.option(name, type=existing_file, envvar=variable, help=help_text)(function)
    return click.option(
        "--allow-weak-secrets",
        is_flag=True,
        help=f"Development only: accept secrets shorter than {SECRET_BYTES_MIN} bytes.",
    )(function)


def cluster_token_options(function: Command) -> Command:
    """--cluster-token-file, and --cluster-token only to refuse it."""
    function = click.option(
        "--cluster-token", hidden=True, help="Refused: a secret on the command line shows in ps."
    )(function)
    return click.option(
        "--cluster-token-file",
        type=click.Path(dir_okay=False, exists=True),
        envvar=CLUSTER_TOKEN_FILE_ENVIRONMENT_VARIABLE,
        help=(
            "File holding the token every NodeService call carries (env"
            f" {CLUSTER_TOKEN_FILE_ENVIRONMENT_VARIABLE}); without it the token is read from"
            f" {CLUSTER_TOKEN_ENVIRONMENT_VARIABLE}. At least {SECRET_BYTES_MIN} bytes, the same for"
            " every node, the gateway and ledger-dev. Mutual TLS between them comes from"
            f" {INTERNAL_TLS_CERTIFICATE_ENVIRONMENT_VARIABLE}, {INTERNAL_TLS_KEY_ENVIRONMENT_VARIABLE}"
            f" and {INTERNAL_TLS_CA_ENVIRONMENT_VARIABLE} (file paths), required for a node whose"
            " address is not a loopback address."
        ),
    )(function)


def listen_options(function: Command) -> Command:
    """--host, --port, --http-port, --metrics-port and --calls-in-flight-max of a public
    LedgerService listener, and its `public_security_options`."""
    function = public_security_options(function)
    function = click.option(
        "--http-port",
        type=click.IntRange(0, 65535),
        default=None,
        envvar="LEDGER_HTTP_PORT",
        help="Port of the HTTP/JSON API (docs at /docs), on --host, with the gRPC port's TLS and"
        " client tokens; 0 picks a free one. Off unless given (env LEDGER_HTTP_PORT).",
    )(function)
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
