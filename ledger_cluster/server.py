"""The asyncio gRPC server of LedgerService (gateway and standalone mode) with health and
reflection on the same port, a /metrics endpoint, and a graceful stop on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.gateway import CoreApi, LedgerService
from ledger_cluster.http import HttpSecurity, HttpServer, ledger_http_app
from ledger_cluster.http.server import HttpTls
from ledger_cluster.limits import PUBLIC_MESSAGE_BYTES_MAX
from ledger_cluster.metrics import MetricsServer, serve_metrics
from ledger_cluster.security import ServerCredentials, is_loopback_address

logger = logging.getLogger(__name__)

LEDGER_SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
SHUTDOWN_GRACE_SECONDS = 5.0
HEALTH_REFRESH_SECONDS = 0.5

ServingStatus: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType


class LedgerServer:
    """Build inside the event loop that serves it (grpc.aio binds to the running loop)."""

    def __init__(self, service: LedgerService, address: str, credentials: ServerCredentials) -> None:
        self.service = service
        self.backend = service.backend
        self._server = grpc.aio.server(
            interceptors=credentials.interceptors(),
            options=[
                ("grpc.max_receive_message_length", PUBLIC_MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", PUBLIC_MESSAGE_BYTES_MAX),
                # Fail loudly when the port is taken instead of sharing it with another server.
                ("grpc.so_reuseport", 0),
            ],
        )
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(service, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (LEDGER_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = credentials.add_port(self._server, address)
        self._serving: ServingStatus | None = None
        self._health_watcher: asyncio.Task[None] | None = None

    async def _set_health(self, status: ServingStatus) -> None:
        if status != self._serving:
            self._serving = status
            for service in ("", LEDGER_SERVICE_NAME):
                await self._health.set(service, status)

    async def _watch_health(self) -> None:
        # Health follows the backend: a cluster gateway is SERVING only while every shard has
        # a reachable leader.
        while True:
            serving = self.backend.is_ready()
            await self._set_health(
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await asyncio.sleep(HEALTH_REFRESH_SECONDS)

    async def start(self) -> None:
        await self.backend.start()
        await self._server.start()
        self._health_watcher = asyncio.get_running_loop().create_task(self._watch_health(), name="health")

    async def stop(self) -> None:
        """Stop taking RPCs, let those in flight finish, then close the backend."""
        if self._health_watcher is not None:
            self._health_watcher.cancel()
            await asyncio.wait({self._health_watcher}, timeout=HEALTH_REFRESH_SECONDS)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(SHUTDOWN_GRACE_SECONDS)
        # Finishes of transfers already answered: sent before the backend goes (or the debit
        # shard's driver sends them a second later).
        await self.service.transfers.close()
        await self.backend.close()


def install_stop_signals() -> threading.Event:
    """Turn SIGTERM and SIGINT into an event. Installed first thing at start-up, so a signal
    that arrives while the process is still starting stops it cleanly too; `wait_for_stop`
    takes over once the event loop runs."""
    stop_requested = threading.Event()

    def request_stop(signal_number: int, frame: FrameType | None) -> None:
        logger.info("received %s, shutting down", signal.Signals(signal_number).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop_requested


async def wait_for_stop(stop_requested: threading.Event) -> None:
    """Until SIGTERM or SIGINT, including one that came before the event loop ran."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop(signal_number: signal.Signals) -> None:
        logger.info("received %s, shutting down", signal_number.name)
        stop.set()

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, request_stop, signal_number)
    if stop_requested.is_set():
        stop.set()
    await stop.wait()


async def serve_ledger(
    make_backend: Callable[[], CoreApi],
    *,
    host: str,
    port: int,
    metrics_port: int,
    role: str,
    calls_in_flight_max: int,
    credentials: ServerCredentials,
    stop_requested: threading.Event,
    describe: Callable[[int, int], str],
    http_port: int | None = None,
    http_tls: HttpTls | None = None,
) -> None:
    """Serve LedgerService over a new backend until asked to stop, and over HTTP/JSON on
    `http_port` when given (same host, same client tokens, TLS from `http_tls`). Raises OSError
    when a port is taken (after closing what it opened). `describe(port, metrics_port)` is
    logged once serving."""
    if not credentials.tls and not credentials.tokens and not is_loopback_address(f"{host}:{port}"):
        logger.warning(
            "LedgerService on %s:%d takes calls from anybody who can reach it, in plaintext:"
            " give it --tls-cert/--tls-key and client tokens, or keep it behind a proxy that does",
            host,
            port,
        )
    backend = make_backend()
    metrics_server: MetricsServer | None = None
    try:
        server = LedgerServer(
            LedgerService(backend, calls_in_flight_max=calls_in_flight_max), f"{host}:{port}", credentials
        )
        metrics_server = serve_metrics(host, metrics_port, role, role, backend.shard_figures)
    except BaseException:
        await backend.close()
        raise
    http_server: HttpServer | None = None
    try:
        if http_port is not None:
            # Bound before health can say SERVING: a client told so finds the HTTP port listening.
            security = HttpSecurity(tokens=credentials.tokens, who=credentials.who)
            app = ledger_http_app(server.service, security)
            # Calls in flight get as long to finish at a stop as on the gRPC port.
            http_server = HttpServer(app, host, http_port, http_tls, SHUTDOWN_GRACE_SECONDS)
        await server.start()
        if http_server is not None:
            await http_server.start()
            logger.info("HTTP API on %s:%d (%s)", host, http_server.port, "https" if http_tls else "http")
        logger.info("%s", describe(server.port, metrics_server.port))
        await wait_for_stop(stop_requested)
    finally:
        # Metrics first: a scrape must not read shards the backend is closing. HTTP before
        # gRPC: its calls run on the servicer whose backend the gRPC server's stop closes.
        metrics_server.close()
        if http_server is not None:
            await http_server.stop()
        await server.stop()
        logger.info("stopped")
