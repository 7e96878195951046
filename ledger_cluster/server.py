"""A gRPC server for LedgerService with health and reflection, bounded in every dimension,
that shuts down gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc
from ledger_cluster.gateway import CoreApi, LedgerGateway

logger = logging.getLogger(__name__)

LEDGER_SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
WORKER_THREADS = 128
# Beyond this many RPCs in flight, grpc answers RESOURCE_EXHAUSTED at once instead of queueing
# without bound.
CONCURRENT_RPCS_MAX = 256
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
SHUTDOWN_GRACE_SECONDS = 5.0
HEALTH_REFRESH_SECONDS = 0.5


class LedgerServer:
    def __init__(self, backend: CoreApi, address: str) -> None:
        self.backend = backend
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="rpc"),
            maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX,
            options=[
                ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
                # Fail loudly when the port is taken instead of sharing it with another server.
                ("grpc.so_reuseport", 0),
            ],
        )
        self._gateway = LedgerGateway(backend)
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(self._gateway, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (LEDGER_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._stopping = threading.Event()
        self._health_watcher = threading.Thread(target=self._watch_health, name="health", daemon=True)

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", LEDGER_SERVICE_NAME):
            self._health.set(service, status)

    def _refresh_health(self) -> None:
        serving = self.backend.is_ready()
        self._set_health(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def _watch_health(self) -> None:
        # Health follows the backend: a cluster gateway is SERVING only while every shard has
        # a reachable leader.
        while not self._stopping.wait(HEALTH_REFRESH_SECONDS):
            self._refresh_health()

    def start(self) -> None:
        self._server.start()
        self._refresh_health()
        self._health_watcher.start()

    def stop(self) -> None:
        """Stop taking RPCs, let those in flight finish, then close the backend."""
        self._stopping.set()
        if self._health_watcher.is_alive():
            self._health_watcher.join()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(SHUTDOWN_GRACE_SECONDS).wait()
        self._gateway.close()
        self.backend.close()


def install_stop_signals() -> threading.Event:
    """Turn SIGTERM and SIGINT into an event. Installed first thing at start-up, so a signal
    that arrives while the process is still starting stops it cleanly too."""
    stop_requested = threading.Event()

    def request_stop(signal_number: int, frame: FrameType | None) -> None:
        logger.info("received %s, shutting down", signal.Signals(signal_number).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop_requested


def run_until(server: LedgerServer, stop_requested: threading.Event) -> None:
    """Serve until `stop_requested` is set, then stop gracefully."""
    server.start()
    stop_requested.wait()
    server.stop()
    logger.info("stopped")
