"""Test helpers on top of `ledger_cluster.localcluster.processes`: the repository's paths, a
generated config file, and a `ledger-standalone` server started and stopped by PID."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ledger_cluster import config as cluster_config
from ledger_cluster.dev_certificates import DevelopmentCertificates
from ledger_cluster.localcluster.processes import (
    EXIT_TIMEOUT_SECONDS,
    HEALTH_RPC_TIMEOUT_SECONDS,
    KILL_TIMEOUT_SECONDS,
    LEDGER_SERVICE_NAME,
    LOG_TAIL_LINES,
    LOOPBACK_HOST,
    POLL_INTERVAL_SECONDS,
    READY_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    LocalClusterError,
    ManagedProcess,
    clean_environment,
    free_port,
    free_ports,
    health_status,
    log_tail,
    managed_process,
    run_dev_cli,
    start_process,
    wait_until_serving,
)
from ledger_cluster.security import ClientCredentials, TlsIdentity

__all__ = [
    "EXIT_TIMEOUT_SECONDS",
    "HEALTH_RPC_TIMEOUT_SECONDS",
    "KILL_TIMEOUT_SECONDS",
    "LEDGER_SERVICE_NAME",
    "LOG_TAIL_LINES",
    "LOOPBACK_HOST",
    "POLL_INTERVAL_SECONDS",
    "READY_TIMEOUT_SECONDS",
    "REPO_CONFIG_PATH",
    "REPO_ROOT",
    "STOP_TIMEOUT_SECONDS",
    "LocalClusterError",
    "ManagedProcess",
    "StandaloneServer",
    "clean_environment",
    "development_tls",
    "free_port",
    "free_ports",
    "health_status",
    "log_tail",
    "managed_process",
    "rpc_count",
    "run_dev_cli",
    "standalone_server",
    "start_process",
    "start_standalone",
    "tls_standalone_server",
    "wait_until_serving",
    "write_generated_config",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG_PATH = REPO_ROOT / "cluster_config.json"
METRICS_TIMEOUT_SECONDS = 5.0


def write_generated_config(path: Path, nodes: int = 3, shards: int = 4, replicas: int = 3) -> Path:
    """A small validated cluster config, written atomically like `ledger-dev seed-cluster-config`."""
    cluster_config.write_atomic(cluster_config.generate(nodes, shards, replicas), path)
    return path


# -- ledger-standalone ----------------------------------------------------------------------------


def standalone_command(
    port: int,
    data_dir: Path,
    config_path: Path,
    metrics_port: int | None = None,
    http_port: int | None = None,
) -> list[str]:
    """Its metrics on a free port unless given: never the default one, which a developer's own
    server may hold. The HTTP API only when `http_port` is given."""
    http_arguments = [] if http_port is None else ["--http-port", str(http_port)]
    return [
        sys.executable,
        "-m",
        "ledger_cluster.cli.standalone",
        "--port",
        str(port),
        "--metrics-port",
        str(free_port() if metrics_port is None else metrics_port),
        "--data-dir",
        str(data_dir),
        "--config",
        str(config_path),
        *http_arguments,
    ]


@dataclass
class StandaloneServer:
    process: ManagedProcess
    port: int
    metrics_port: int
    data_dir: Path
    config_path: Path
    http_port: int | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK_HOST}:{self.port}"

    @property
    def http_url(self) -> str:
        assert self.http_port is not None, "started without an HTTP port"
        return f"http://{LOOPBACK_HOST}:{self.http_port}"


def start_standalone(
    data_dir: Path,
    config_path: Path,
    log_path: Path,
    port: int | None = None,
    http_port: int | None = None,
    *,
    extra_arguments: Sequence[str] = (),
    environment: dict[str, str] | None = None,
    credentials: ClientCredentials | None = None,
) -> StandaloneServer:
    """Start ledger-standalone and wait until it is SERVING; the caller must stop it (prefer
    `standalone_server`). A server that does not become ready is stopped before failing.
    `credentials` are what its health check presents (plaintext without)."""
    chosen_port = free_port() if port is None else port
    metrics_port = free_port()
    command = standalone_command(chosen_port, data_dir, config_path, metrics_port, http_port)
    command += extra_arguments
    process = start_process(f"ledger-standalone :{chosen_port}", command, log_path, env=environment)
    try:
        wait_until_serving(process, f"{LOOPBACK_HOST}:{chosen_port}", credentials=credentials)
    except BaseException:
        process.stop()
        raise
    return StandaloneServer(
        process=process,
        port=chosen_port,
        metrics_port=metrics_port,
        data_dir=data_dir,
        config_path=config_path,
        http_port=http_port,
    )


@contextmanager
def standalone_server(
    data_dir: Path,
    config_path: Path,
    log_path: Path,
    port: int | None = None,
    http_port: int | None = None,
    *,
    extra_arguments: Sequence[str] = (),
    environment: dict[str, str] | None = None,
    credentials: ClientCredentials | None = None,
) -> Iterator[StandaloneServer]:
    """A SERVING ledger-standalone for the duration of the block, stopped however it ends."""
    server = start_standalone(
        data_dir,
        config_path,
        log_path,
        port=port,
        http_port=http_port,
        extra_arguments=extra_arguments,
        environment=environment,
        credentials=credentials,
    )
    try:
        yield server
    finally:
        server.process.stop()


def development_tls(certificates: DevelopmentCertificates, with_certificate: bool = True) -> TlsIdentity:
    """A client's TLS identity from the development certificates: their CA as roots, and their
    certificate as the client's own unless `with_certificate` is false."""
    return TlsIdentity(
        certificate_chain=certificates.certificate_path.read_bytes() if with_certificate else b"",
        private_key=certificates.key_path.read_bytes() if with_certificate else b"",
        root_certificates=certificates.ca_path.read_bytes(),
    )


@contextmanager
def tls_standalone_server(
    base: Path,
    certificates: DevelopmentCertificates,
    client_tokens: str,
    *,
    client_ca: bool = False,
    http_port: int | None = None,
) -> Iterator[StandaloneServer]:
    """A SERVING ledger-standalone under `base` for the duration of the block, serving TLS (the
    development certificate) and asking for one of `client_tokens` (LEDGER_CLIENT_TOKENS), on
    its gRPC port and on `http_port` if given; with `client_ca`, clients must also present a
    certificate of the development CA. Stopped however the block ends."""
    config_path = write_generated_config(base / "cluster_config.json", 3, 2, 3)
    tls_arguments = [
        "--tls-cert",
        str(certificates.certificate_path),
        "--tls-key",
        str(certificates.key_path),
    ]
    if client_ca:
        tls_arguments += ["--tls-client-ca", str(certificates.ca_path)]
    # A server given a client CA asks for a client certificate even for health checks.
    identity = development_tls(certificates, with_certificate=client_ca)
    with standalone_server(
        base / "data",
        config_path,
        base / "server.log",
        http_port=http_port,
        extra_arguments=tls_arguments,
        environment={**clean_environment(), "LEDGER_CLIENT_TOKENS": client_tokens},
        credentials=ClientCredentials(token=None, tls=identity),
    ) as server:
        yield server


def scrape(address: str) -> dict[str, list[Sample]]:
    """GET /metrics of one process: every sample, by metric name."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=METRICS_TIMEOUT_SECONDS) as response:
        text = response.read().decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value_of(samples: dict[str, list[Sample]], metric: str, **labels: str) -> float:
    """The one sample of `metric` whose labels include `labels`."""
    matching = [sample.value for sample in samples.get(metric, []) if labels.items() <= sample.labels.items()]
    assert len(matching) == 1, f"{metric}{labels}: {matching}"
    return matching[0]


def rpc_count(server: StandaloneServer, method: str) -> int:
    """Calls of `method` the server has answered (with any code), from its own metrics."""
    samples = scrape(f"{LOOPBACK_HOST}:{server.metrics_port}").get("ledger_rpc_requests_total", [])
    return int(sum(sample.value for sample in samples if sample.labels["method"] == method))
