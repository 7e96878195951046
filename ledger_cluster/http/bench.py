"""HTTP `POST /v1/accounts/{id}/transactions` against unary gRPC `CreateTransaction` on one
server, at the same concurrency, in alternating rounds of the same run: the figure issue 16
asks the HTTP API to reach (at least 0.7 of the gRPC rate).

    python -m ledger_cluster.http.bench --grpc 127.0.0.1:8000 --http http://127.0.0.1:8080

Each client is a coroutine on one event loop (one grpc.aio channel; HTTP/1.1 keep-alive, one
connection per client), writing settled top-ups of 1 to its own account with a fresh request
id each. The HTTP client is aiohttp's by default: httpx's (`--http-client httpx`, one
AsyncClient per coroutine) costs the client process about 2 ms of CPU per call, so it measures
itself rather than the server. Needs the dev extra (aiohttp, httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import click
import grpc
import httpx

from ledger_cluster.api.v1 import ledger_pb2, ledger_pb2_grpc

CONCURRENCY_DEFAULT = 64
DURATION_SECONDS_DEFAULT = 4.0
ROUNDS_DEFAULT = 3
CALL_TIMEOUT_SECONDS = 10.0

Call = Callable[[str], Awaitable[None]]


async def _rate(call: Call, account_ids: list[str], duration_seconds: float) -> float:
    """Calls answered per second by one coroutine per account, for `duration_seconds`."""
    stop_monotonic = time.monotonic() + duration_seconds
    answered = 0

    async def client(account_id: str) -> None:
        nonlocal answered
        while time.monotonic() < stop_monotonic:
            await call(account_id)
            answered += 1

    started = time.monotonic()
    await asyncio.gather(*(client(account_id) for account_id in account_ids))
    return answered / (time.monotonic() - started)


def _grpc_call(stub: ledger_pb2_grpc.LedgerServiceStub) -> Call:
    async def call(account_id: str) -> None:
        request = ledger_pb2.CreateTransactionRequest(
            account_id=account_id, amount=1, settled=True, request_id=secrets.token_hex(8)
        )
        await cast(Awaitable[object], stub.CreateTransaction(request, timeout=CALL_TIMEOUT_SECONDS))

    return call


_BODY = json.dumps({"amount": 1, "settled": True})


def _headers() -> dict[str, str]:
    return {"Idempotency-Key": secrets.token_hex(8), "Content-Type": "application/json"}


def _aiohttp_call(session: aiohttp.ClientSession) -> Call:
    async def call(account_id: str) -> None:
        path = f"/v1/accounts/{account_id}/transactions"
        async with session.post(path, data=_BODY, headers=_headers()) as response:
            response.raise_for_status()
            await response.read()

    return call


def _httpx_calls(clients: list[httpx.AsyncClient], account_ids: list[str]) -> Call:
    """One AsyncClient per account: httpx's connection pool slows down sharply as more
    coroutines share one."""
    client_of = dict(zip(account_ids, clients, strict=True))

    async def call(account_id: str) -> None:
        path = f"/v1/accounts/{account_id}/transactions"
        response = await client_of[account_id].post(path, content=_BODY, headers=_headers())
        response.raise_for_status()

    return call


async def _http_rates(
    http_client: str, http_url: str, account_ids: list[str], duration_seconds: float, rounds: int
) -> AsyncIterator[float]:
    if http_client == "aiohttp":
        connector = aiohttp.TCPConnector(limit=len(account_ids))
        async with aiohttp.ClientSession(http_url, connector=connector) as session:
            for _ in range(rounds):
                yield await _rate(_aiohttp_call(session), account_ids, duration_seconds)
        return
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=http_url, timeout=CALL_TIMEOUT_SECONDS)
            )
            for _ in account_ids
        ]
        for _ in range(rounds):
            yield await _rate(_httpx_calls(clients, account_ids), account_ids, duration_seconds)


@dataclass(frozen=True)
class Comparison:
    grpc_address: str
    http_url: str
    http_client: str
    concurrency: int
    duration_seconds: float
    rounds: int


async def compare(comparison: Comparison) -> tuple[list[float], list[float]]:
    """Rounds alternate, an HTTP run then a gRPC run, so both see the same machine."""
    async with grpc.aio.insecure_channel(comparison.grpc_address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        accounts = await asyncio.gather(
            *(stub.CreateAccount(ledger_pb2.CreateAccountRequest()) for _ in range(comparison.concurrency))
        )
        account_ids = [response.account.id for response in accounts]
        duration_seconds = comparison.duration_seconds
        grpc_rates: list[float] = []
        http_rates: list[float] = []
        http_runs = _http_rates(
            comparison.http_client, comparison.http_url, account_ids, duration_seconds, comparison.rounds
        )
        async for http_rate in http_runs:
            grpc_rates.append(await _rate(_grpc_call(stub), account_ids, duration_seconds))
            http_rates.append(http_rate)
        return grpc_rates, http_rates


@click.command()
@click.option("--grpc", "grpc_address", default="127.0.0.1:8000", show_default=True)
@click.option("--http", "http_url", default="http://127.0.0.1:8080", show_default=True)
@click.option("--http-client", type=click.Choice(["aiohttp", "httpx"]), default="aiohttp", show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=CONCURRENCY_DEFAULT, show_default=True)
@click.option(
    "--duration-seconds", type=click.FloatRange(0.1), default=DURATION_SECONDS_DEFAULT, show_default=True
)
@click.option("--rounds", type=click.IntRange(1, 20), default=ROUNDS_DEFAULT, show_default=True)
def main(**options: Any) -> None:
    comparison = Comparison(**options)
    concurrency, http_client = comparison.concurrency, comparison.http_client
    grpc_rates, http_rates = asyncio.run(compare(comparison))
    grpc_median, http_median = statistics.median(grpc_rates), statistics.median(http_rates)
    click.echo(
        f"gRPC CreateTransaction, {concurrency} clients: " + ", ".join(f"{r:.0f}/s" for r in grpc_rates)
    )
    click.echo(
        f"HTTP POST transactions ({http_client}), {concurrency} clients: "
        + ", ".join(f"{r:.0f}/s" for r in http_rates)
    )
    ratio = http_median / grpc_median
    click.echo(f"medians: gRPC {grpc_median:.0f}/s, HTTP {http_median:.0f}/s, HTTP/gRPC {ratio:.2f}x")


if __name__ == "__main__":
    main()
