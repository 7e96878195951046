"""CPU per transaction for `ledger-dev bench`: each server process's Prometheus endpoint
(`process_cpu_seconds_total`), read right before and right after the measured window, the
processes named by their `ledger_process_info` labels. Endpoints are only ever loopback
addresses."""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from ledger_cluster.config import DEFAULT_METRICS_PORT_BASE
from ledger_cluster.deadlines import MICROSECONDS_PER_SECOND
from ledger_cluster.metrics import DEFAULT_METRICS_PORT

METRICS_URLS_MAX = 16
METRICS_PROBE_TIMEOUT_SECONDS = 0.5
METRICS_FETCH_TIMEOUT_SECONDS = 2.0
# urllib's timeout bounds each socket operation, not the whole fetch; past this extra the fetch
# is given up and its endpoint reported missing.
METRICS_FETCH_GRACE_SECONDS = 1.0
METRICS_PAGE_BYTES_MAX = 4 * 1024 * 1024
# The dev cluster: the gateway (or ledger-standalone) on 9100, node01..node03 on 9101..9103.
DEV_CLUSTER_NODES = 3
DEFAULT_METRICS_URLS = tuple(
    f"http://127.0.0.1:{port}/metrics"
    for port in (
        DEFAULT_METRICS_PORT,
        *range(DEFAULT_METRICS_PORT_BASE, DEFAULT_METRICS_PORT_BASE + DEV_CLUSTER_NODES),
    )
)
CPU_SECONDS_METRIC = "process_cpu_seconds_total"
START_TIME_METRIC = "process_start_time_seconds"
PROCESS_INFO_METRIC = "ledger_process_info"


@dataclass(frozen=True)
class ProcessSample:
    """One reading of a server process's endpoint."""

    name: str
    role: str
    cpu_seconds: float
    start_time_seconds: float | None = None


@dataclass(frozen=True)
class Missing:
    """An endpoint that gave no usable reading, and why."""

    reason: str


Sample = ProcessSample | Missing


@dataclass(frozen=True)
class CpuWindow:
    """Server CPU spent between two readings, by process name; endpoints without both
    readings of one process are listed by URL in `missing`."""

    cpu_seconds_by_process: dict[str, float]
    missing: dict[str, str]


def cpu_us_per_transaction(cpu_seconds: float, transactions: int) -> float | None:
    """Microseconds of CPU per counted transaction; None when nothing was counted."""
    if transactions <= 0:
        return None
    return round(cpu_seconds * MICROSECONDS_PER_SECOND / transactions, 1)


# --- metrics endpoints -------------------------------------------------------------------------


def loopback_url_problem(url: str) -> str | None:
    """Why `url` cannot be a metrics endpoint, or None. Benches here only talk to loopback, so
    the host must be a loopback address (or `localhost`), and the scheme plain http."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return f"{url}: only http:// endpoints are read"
    host = parts.hostname
    if not host:
        return f"{url}: no host"
    try:
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as error:
        return f"{url}: {error}"
    if host == "localhost":
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{url}: {host} is not a loopback address (benches only talk to loopback)"
    if not address.is_loopback:
        return f"{url}: {host} is not a loopback address (benches only talk to loopback)"
    return None


def _host_and_port(url: str) -> str:
    return urlsplit(url).netloc


def parse_metrics_page(text: str, fallback_name: str) -> Sample:
    """The process CPU of one Prometheus text page, named by its `ledger_process_info` name
    label, else `fallback_name`."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as error:
        return Missing(f"unparseable page: {error}")
    cpu_seconds: float | None = None
    start_time_seconds: float | None = None
    name, role = fallback_name, ""
    for family in families:
        for sample in family.samples:
            if sample.name == CPU_SECONDS_METRIC:
                cpu_seconds = sample.value
            elif sample.name == START_TIME_METRIC:
                start_time_seconds = sample.value
            elif sample.name == PROCESS_INFO_METRIC:
                name = sample.labels.get("name") or fallback_name
                role = sample.labels.get("role", "")
    if cpu_seconds is None:
        return Missing(f"the page has no {CPU_SECONDS_METRIC}")
    return ProcessSample(name, role, cpu_seconds, start_time_seconds)


# Loopback only: a proxy from the environment (http_proxy) must never see these requests.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_sample(url: str, timeout_seconds: float) -> Sample:
    """One blocking read of an endpoint; any failure is a Missing, never an exception."""
    try:
        with _DIRECT_OPENER.open(url, timeout=timeout_seconds) as response:
            body: bytes = response.read(METRICS_PAGE_BYTES_MAX + 1)
    except (OSError, http.client.HTTPException, ValueError) as error:
        # urllib.error.URLError and HTTPError are OSErrors; a garbled answer is an HTTPException.
        return Missing(f"{type(error).__name__}: {error}")
    if len(body) > METRICS_PAGE_BYTES_MAX:
        return Missing(f"page larger than {METRICS_PAGE_BYTES_MAX} bytes")
    return parse_metrics_page(body.decode("utf-8", errors="replace"), _host_and_port(url))


async def sample_endpoints(urls: Sequence[str], timeout_seconds: float) -> dict[str, Sample]:
    """Every endpoint read at once, each on its own thread, so a dead endpoint costs
    `timeout_seconds` once and not once per endpoint; the answer is keyed by URL."""
    if not urls:
        return {}
    if len(urls) > METRICS_URLS_MAX:
        raise ValueError(f"{len(urls)} metrics endpoints; at most {METRICS_URLS_MAX}")
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="bench-metrics")

    async def read(url: str) -> Sample:
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(executor, fetch_sample, url, timeout_seconds),
                timeout_seconds + METRICS_FETCH_GRACE_SECONDS,
            )
        except TimeoutError:
            return Missing(f"no answer within {timeout_seconds + METRICS_FETCH_GRACE_SECONDS} s")

    try:
        samples = await asyncio.gather(*(read(url) for url in urls))
    finally:
        # A fetch stuck past its grace keeps its thread until urllib's own timeout ends it;
        # nothing waits for it.
        executor.shutdown(wait=False, cancel_futures=True)
    return dict(zip(urls, samples, strict=True))


def cpu_window(before: Mapping[str, Sample], after: Mapping[str, Sample]) -> CpuWindow:
    """Each endpoint's CPU between two readings. An endpoint that missed either reading, or whose
    process restarted in between, has no figure and is listed with the reason."""
    by_process: dict[str, float] = {}
    missing: dict[str, str] = {}
    for url in dict.fromkeys([*before, *after]):
        first = before.get(url, Missing("not read before the window"))
        last = after.get(url, Missing("not read after the window"))
        if isinstance(first, Missing):
            missing[url] = f"before the window: {first.reason}"
        elif isinstance(last, Missing):
            missing[url] = f"after the window: {last.reason}"
        elif last.name != first.name:
            missing[url] = f"{first.name} before the window, {last.name} after it"
        elif last.cpu_seconds < first.cpu_seconds or last.start_time_seconds != first.start_time_seconds:
            missing[url] = f"{first.name} restarted during the window"
        else:
            # Two endpoints may carry one name (two standalone servers): the address tells them apart.
            name = first.name if first.name not in by_process else f"{first.name}@{_host_and_port(url)}"
            by_process[name] = last.cpu_seconds - first.cpu_seconds
    return CpuWindow(by_process, missing)


async def probe_endpoints(urls: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The endpoints to read during the run, and those given explicitly that do not answer.
    Without explicit URLs the dev cluster's ports are tried and the silent ones dropped."""
    candidates = DEFAULT_METRICS_URLS if urls is None else tuple(dict.fromkeys(urls))
    samples = await sample_endpoints(candidates, METRICS_PROBE_TIMEOUT_SECONDS)
    answering = [url for url, sample in samples.items() if isinstance(sample, ProcessSample)]
    silent = {
        url: f"probe: {sample.reason}"
        for url, sample in samples.items()
        if isinstance(sample, Missing) and urls is not None
    }
    return answering, silent
