"""A LedgerServer in this process over real gRPC and a real LMDB-backed standalone backend, its
asyncio event loop on a thread of its own, so a test can call it with the blocking grpc client
while it serves."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

from ledger_cluster.gateway import CoreApi, LedgerService
from ledger_cluster.security import ServerCredentials
from ledger_cluster.server import LedgerServer

LOOP_CALL_TIMEOUT_SECONDS = 30.0
# In-process servers take calls without TLS or tokens (test_security.py covers those).
OPEN_PORT = ServerCredentials(tls=None, tokens=(), who="")
Result = TypeVar("Result")


class LoopThread:
    """An event loop running on its own thread until `close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Result]) -> Result:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(LOOP_CALL_TIMEOUT_SECONDS)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(LOOP_CALL_TIMEOUT_SECONDS)
        self.loop.close()


@contextmanager
def served(
    make_service: Callable[[], LedgerService],
) -> Iterator[tuple[grpc.Channel, LedgerServer, LoopThread]]:
    """Serve a LedgerService (built on the loop thread, as grpc.aio requires) on a free
    loopback port for the block; a blocking channel to it, the server and its loop."""
    loop_thread = LoopThread()
    try:

        async def start() -> LedgerServer:
            server = LedgerServer(make_service(), "127.0.0.1:0", OPEN_PORT)
            await server.start()
            return server

        server = loop_thread.run(start())
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                yield channel, server, loop_thread
        finally:
            loop_thread.run(server.stop())
    finally:
        loop_thread.close()


def backend_service(backend: CoreApi, **options: Any) -> Callable[[], LedgerService]:
    return lambda: LedgerService(backend, **options)
