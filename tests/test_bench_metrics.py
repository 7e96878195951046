"""Fast tests of the bench's CPU readings: real Prometheus pages served by real HTTP servers on
127.0.0.1, read over HTTP, parsed, named, differenced and divided per transaction."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, MetricsHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from ledger_cluster import bench, bench_metrics
from tests.processes import LOOPBACK_HOST, free_port, run_dev_cli

FETCH_TIMEOUT_SECONDS = 2.0
# shutdown() waits up to one poll interval; short, so a test's servers stop at once.
SERVER_POLL_INTERVAL_SECONDS = 0.01
SERVER_JOIN_TIMEOUT_SECONDS = 5.0
CLI_TIMEOUT_SECONDS = 30.0
START_TIME_SECONDS = 1_700_000_000.0


class ProcessFigures(Collector):
    """What a server process's default registry reports about itself, with values the test sets
    between two readings."""

    def __init__(self, cpu_seconds: float, info: dict[str, str] | None = None) -> None:
        self.cpu_seconds = cpu_seconds
        self.start_time_seconds = START_TIME_SECONDS
        self.info = info

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", value=self.cpu_seconds
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process.", value=self.start_time_seconds
        )
        if self.info is not None:
            yield InfoMetricFamily("ledger_process", "Which process serves these metrics.", value=self.info)


@contextmanager
def metrics_endpoint(figures: Collector) -> Iterator[str]:
    """A real /metrics endpoint (prometheus_client's own handler and text format) on a free
    loopback port, stopped on exit; yields its URL."""
    registry = CollectorRegistry()
    registry.register(figures)
    server = ThreadingHTTPServer((LOOPBACK_HOST, 0), MetricsHandler.factory(registry))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVER_POLL_INTERVAL_SECONDS}, daemon=True
    )
    thread.start()
    try:
        yield f"http://{LOOPBACK_HOST}:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(SERVER_JOIN_TIMEOUT_SECONDS)


def read(urls: list[str]) -> dict[str, bench_metrics.Sample]:
    return asyncio.run(bench_metrics.sample_endpoints(urls, FETCH_TIMEOUT_SECONDS))


def dead_url() -> str:
    return f"http://{LOOPBACK_HOST}:{free_port()}/metrics"


def test_a_page_is_read_and_named_by_ledger_process_info() -> None:
    figures = ProcessFigures(12.5, info={"role": "node", "name": "node01"})
    with metrics_endpoint(figures) as url:
        sample = bench_metrics.fetch_sample(url, FETCH_TIMEOUT_SECONDS)
    assert sample == bench_metrics.ProcessSample(
        name="node01", role="node", cpu_seconds=12.5, start_time_seconds=START_TIME_SECONDS
    )


def test_a_page_without_process_info_is_named_by_host_and_port() -> None:
    with metrics_endpoint(ProcessFigures(3.0)) as url:
        sample = bench_metrics.fetch_sample(url, FETCH_TIMEOUT_SECONDS)
    port = url.split(":")[2].split("/")[0]
    assert sample == bench_metrics.ProcessSample(
        name=f"{LOOPBACK_HOST}:{port}", role="", cpu_seconds=3.0, start_time_seconds=START_TIME_SECONDS
    )


def test_pages_without_cpu_or_unparseable_give_no_reading() -> None:
    without_cpu = bench_metrics.parse_metrics_page("# TYPE other gauge\nother 1.0\n", "fallback")
    assert without_cpu == bench_metrics.Missing("the page has no process_cpu_seconds_total")
    garbled = bench_metrics.parse_metrics_page('process_cpu_seconds_total{role="x 1.0\n', "fallback")
    assert isinstance(garbled, bench_metrics.Missing)
    assert garbled.reason.startswith("unparseable page")


def test_the_window_is_the_difference_divided_per_transaction() -> None:
    gateway = ProcessFigures(10.0, info={"role": "gateway", "name": "gateway"})
    node = ProcessFigures(40.0)
    with metrics_endpoint(gateway) as gateway_url, metrics_endpoint(node) as node_url:
        before = read([gateway_url, node_url])
        # Binary fractions, so the expected figures below are exact.
        gateway.cpu_seconds += 0.25
        node.cpu_seconds += 1.5
        after = read([gateway_url, node_url])
    node_name = node_url.removeprefix("http://").removesuffix("/metrics")
    window = bench_metrics.cpu_window(before, after)
    assert window == bench_metrics.CpuWindow({"gateway": 0.25, node_name: 1.5}, {})

    result = bench.BenchResult(transactions=500, cpu=window, load_generator_cpu_seconds=0.125)
    summary = result.summary()
    assert summary["cpu_us_per_tx"] == 3500.0  # 1.75 s over 500 transactions
    assert summary["cpu_us_per_tx_by_process"] == {"gateway": 500.0, node_name: 3000.0}
    assert summary["cpu_seconds_by_process"] == {"gateway": 0.25, node_name: 1.5}
    assert summary["load_generator_cpu_us_per_tx"] == 250.0
    assert summary["metrics_missing"] == {}
    line = result.describe()
    assert f"CPU per transaction 3500.0 µs (gateway 500.0, {node_name} 3000.0)" in line
    assert "load generator 250.0 µs" in line


def test_an_endpoint_that_stops_answering_is_reported_missing() -> None:
    staying = ProcessFigures(1.0, info={"role": "node", "name": "node02"})
    leaving = ProcessFigures(2.0, info={"role": "node", "name": "node03"})
    with metrics_endpoint(staying) as staying_url:
        with metrics_endpoint(leaving) as leaving_url:
            before = read([staying_url, leaving_url])
        staying.cpu_seconds = 1.5
        after = read([staying_url, leaving_url])
    assert isinstance(before[leaving_url], bench_metrics.ProcessSample)
    assert isinstance(after[leaving_url], bench_metrics.Missing)
    window = bench_metrics.cpu_window(before, after)
    assert window.cpu_seconds_by_process == {"node02": 0.5}
    assert list(window.missing) == [leaving_url]
    assert window.missing[leaving_url].startswith("after the window: ")


def test_a_restart_during_the_window_gives_no_figure() -> None:
    figures = ProcessFigures(5.0, info={"role": "node", "name": "node01"})
    with metrics_endpoint(figures) as url:
        before = read([url])
        figures.start_time_seconds += 60.0
        figures.cpu_seconds = 7.0
        after = read([url])
    window = bench_metrics.cpu_window(before, after)
    assert window.cpu_seconds_by_process == {}
    assert window.missing == {url: "node01 restarted during the window"}


def test_two_endpoints_of_one_name_are_told_apart_by_address() -> None:
    first_url, second_url = "http://127.0.0.1:9100/metrics", "http://127.0.0.1:9200/metrics"
    before: dict[str, bench_metrics.Sample] = {
        first_url: bench_metrics.ProcessSample("standalone", "standalone", 1.0),
        second_url: bench_metrics.ProcessSample("standalone", "standalone", 2.0),
    }
    after: dict[str, bench_metrics.Sample] = {
        first_url: bench_metrics.ProcessSample("standalone", "standalone", 1.5),
        second_url: bench_metrics.ProcessSample("standalone", "standalone", 2.25),
    }
    window = bench_metrics.cpu_window(before, after)
    assert window.cpu_seconds_by_process == {"standalone": 0.5, "standalone@127.0.0.1:9200": 0.25}


def test_the_probe_keeps_the_endpoints_that_answer() -> None:
    silent_url = dead_url()
    with metrics_endpoint(ProcessFigures(1.0)) as live_url:
        answering, silent = asyncio.run(bench_metrics.probe_endpoints([silent_url, live_url]))
    assert answering == [live_url]
    assert list(silent) == [silent_url]
    assert silent[silent_url].startswith("probe: URLError")


def test_without_readings_the_cpu_figures_are_empty() -> None:
    result = bench.BenchResult(transactions=100, load_generator_cpu_seconds=0.01)
    summary = result.summary()
    assert summary["cpu_us_per_tx"] is None
    assert summary["cpu_us_per_tx_by_process"] == {}
    assert summary["cpu_seconds_by_process"] == {}
    assert summary["load_generator_cpu_us_per_tx"] == 100.0
    assert "CPU per transaction: no metrics endpoint gave a reading" in result.describe()
    assert bench.BenchResult().summary()["load_generator_cpu_us_per_tx"] is None


def test_only_loopback_urls_are_accepted() -> None:
    for url in (
        "http://127.0.0.1:9101/metrics",
        "http://127.8.9.10:9101/metrics",
        "http://[::1]:9101/metrics",
        "http://localhost:9100/metrics",
    ):
        assert bench_metrics.loopback_url_problem(url) is None, url
    assert bench_metrics.loopback_url_problem("http://10.0.0.1:9100/metrics") == (
        "http://10.0.0.1:9100/metrics: 10.0.0.1 is not a loopback address (benches only talk to loopback)"
    )
    assert "is not a loopback address" in (
        bench_metrics.loopback_url_problem("http://example.com/metrics") or ""
    )
    assert bench_metrics.loopback_url_problem("https://127.0.0.1/metrics") == (
        "https://127.0.0.1/metrics: only http:// endpoints are read"
    )
    assert "out of range" in (bench_metrics.loopback_url_problem("http://127.0.0.1:99999/metrics") or "")


def test_the_bench_command_refuses_a_metrics_url_off_loopback() -> None:
    completed = run_dev_cli(
        [
            "bench",
            "--gateway",
            f"{LOOPBACK_HOST}:{free_port()}",
            "--metrics",
            "http://192.0.2.1:9100/metrics",
        ],
        CLI_TIMEOUT_SECONDS,
    )
    assert completed.returncode == 2, completed.stderr
    assert "192.0.2.1 is not a loopback address" in completed.stderr


def test_throughput_is_reported_per_window_of_the_measured_period() -> None:
    result = bench.BenchResult(
        transactions=5000,
        measured_seconds=30.5,
        window_seconds=10.0,
        transactions_by_window=[2000, 1800, 1200],
    )
    summary = result.summary()
    # The last window ends with the period: 10.5 s.
    assert summary["throughput_tx_per_s_by_window"] == [200.0, 180.0, round(1200 / 10.5, 1)]
    assert summary["window_ratio_last_to_first"] == round(round(1200 / 10.5, 1) / 200.0, 3)
    assert summary["window_seconds"] == 10.0
    assert "tx/s per 10 s window 200, 180, 114 (last/first 0.572)" in result.describe()
    single = bench.BenchResult(transactions=10, measured_seconds=5.0, transactions_by_window=[10])
    assert single.summary()["window_ratio_last_to_first"] is None
    assert "window" not in single.describe()


def test_transactions_count_in_the_window_their_operation_started_in() -> None:
    tally = bench._Tally(window_seconds=10.0, windows=6)
    tally.measure_started_monotonic = 100.0
    tally.add_transactions(1000, 100.0)
    tally.add_transactions(1000, 109.999)
    tally.add_transactions(1000, 110.0)
    tally.add_transactions(1000, 160.001)  # started as the 60 s period closed: the sixth window
    assert tally.transactions_by_window == [2000, 1000, 0, 0, 0, 1000]
    assert tally.transactions == 4000
