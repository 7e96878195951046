"""uvicorn serving the HTTP API on the event loop of the gRPC server, with TLS from the same
files as the gRPC port."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette

LISTEN_BACKLOG = 2048


@dataclass(frozen=True)
class HttpTls:
    """PEM files, as given to the gRPC port: a certificate chain and its key, and a client CA
    when clients must present a certificate it signed."""

    certificate_path: str
    key_path: str
    client_ca_path: str | None = None


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound here rather than by uvicorn, which exits the process when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it each keep-alive response waits 40 ms on Nagle and the client's delayed ACK.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {error}") from error
    listener.setblocking(False)
    return listener


class HttpServer:
    """Start and stop from the event loop that serves the gRPC port: the handlers call its
    servicer directly. uvicorn's `serve()` would take over SIGTERM and SIGINT, which the
    process's own stop owns, so this drives its startup and shutdown itself."""

    def __init__(
        self, app: Starlette, host: str, port: int, tls: HttpTls | None, shutdown_grace_seconds: float
    ) -> None:
        self._socket = _listening_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # A Date header would need uvicorn's main loop ticking to stay current.
            date_header=False,
            timeout_graceful_shutdown=int(shutdown_grace_seconds),
            ssl_certfile=tls.certificate_path if tls else None,
            ssl_keyfile=tls.key_path if tls else None,
            ssl_ca_certs=tls.client_ca_path if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_path else ssl.CERT_NONE,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])

    async def stop(self) -> None:
        """Stop taking connections and let the calls in flight finish."""
        await self._server.shutdown(sockets=[self._socket])
        self._socket.close()
