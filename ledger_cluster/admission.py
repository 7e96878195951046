"""Admission and accounting for the calls of one asyncio gRPC service.

grpc's own `maximum_concurrent_rpcs` counts every service on the port, health checks included,
and refuses with a bare RESOURCE_EXHAUSTED. The gate counts one service's calls only, so a
saturated API still answers its health checks, and its refusal carries an ErrorInfo like every
other error. It also turns exceptions into statuses (one error path for every handler) and
counts each call by method and code, with its latency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from prometheus_client import Counter, Histogram

from ledger_cluster import metrics
from ledger_cluster.status import ApiError

logger = logging.getLogger(__name__)

Response = TypeVar("Response")

TOO_MANY_REQUESTS_REASON = "TOO_MANY_REQUESTS"


async def abort(context: grpc.aio.ServicerContext[object, object], failure: ApiError) -> NoReturn:
    await context.abort_with_status(failure.to_grpc_status())
    raise AssertionError("abort_with_status returned")  # it always raises


class CallGate:
    """At most `calls_in_flight_max` calls of one service at a time; beyond that each new call
    gets RESOURCE_EXHAUSTED TOO_MANY_REQUESTS at once. Runs on the event loop's thread only,
    so the count needs no lock."""

    def __init__(
        self,
        service: str,
        calls_in_flight_max: int,
        translate: Callable[[Exception], ApiError | None] = lambda error: None,
    ) -> None:
        self._service = service
        self._calls_in_flight_max = calls_in_flight_max
        self._translate = translate
        self._in_flight = 0
        metrics.RPC_IN_FLIGHT.labels(service).set_function(lambda: self._in_flight)
        self._counters: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._latencies: dict[str, Histogram] = {}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _account(self, method: str, code: grpc.StatusCode, started_seconds: float) -> None:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = metrics.RPC_REQUESTS.labels(self._service, method, code.name)
            self._counters[(method, code)] = counter
        counter.inc()
        latency = self._latencies.get(method)
        if latency is None:
            latency = metrics.RPC_LATENCY.labels(self._service, method)
            self._latencies[method] = latency
        latency.observe(time.perf_counter() - started_seconds)

    def _refusal(self) -> ApiError:
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            TOO_MANY_REQUESTS_REASON,
            f"{self._service} already serves {self._calls_in_flight_max} calls; retry later",
        )

    def failure(self, error: Exception) -> ApiError:
        """The status an error of a handler stands for."""
        if isinstance(error, ApiError):
            return error
        translated = self._translate(error)
        if translated is not None:
            return translated
        logger.error("unexpected error while serving a request", exc_info=error)
        return ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error: {type(error).__name__}")

    async def stream(
        self,
        method: str,
        context: grpc.aio.ServicerContext[object, object],
        handler: Callable[[], AsyncIterator[Response]],
    ) -> AsyncIterator[Response]:
        """As `run`, for a server-streaming call: counted in flight while it streams."""
        started_seconds = time.perf_counter()
        if self._in_flight >= self._calls_in_flight_max:
            failure = self._refusal()
        else:
            self._in_flight += 1
            try:
                async for response in handler():
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                failure = self.failure(error)
            else:
                self._account(method, grpc.StatusCode.OK, started_seconds)
                return
            finally:
                self._in_flight -= 1
        self._account(method, failure.code, started_seconds)
        await abort(context, failure)

    async def run(
        self,
        method: str,
        context: grpc.aio.ServicerContext[object, object],
        handler: Callable[[], Awaitable[Response]],
        *,
        capped: bool = True,
    ) -> Response:
        """The handler's response, or the call ended with the status its error stands for.
        An uncapped call (a status poll that must answer under load, like a health check) is
        counted but never refused."""
        started_seconds = time.perf_counter()
        if capped and self._in_flight >= self._calls_in_flight_max:
            failure = self._refusal()
        else:
            self._in_flight += 1
            try:
                response = await handler()
            except grpc.aio.AbortError:
                raise  # a handler that ended the call itself
            except Exception as error:
                failure = self.failure(error)
            else:
                self._account(method, grpc.StatusCode.OK, started_seconds)
                return response
            finally:
                self._in_flight -= 1
        self._account(method, failure.code, started_seconds)
        await abort(context, failure)
