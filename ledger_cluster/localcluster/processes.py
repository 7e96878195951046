"""Real ledger processes on this machine, for tests and the dev tools (`ledger-dev nemesis`):
pick a loopback port, start a process with its output in a log file, wait until gRPC health
says SERVING, stop it by PID (SIGTERM, then SIGKILL), kill -9 it, pause and resume it, and put
the log's tail into every failure message.

Callers start every process inside a context manager whose `finally` stops it, so a failure
leaves nothing running.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger_cluster.errors import LedgerError
from ledger_cluster.security import ClientCredentials

LOOPBACK_HOST = "127.0.0.1"
LEDGER_SERVICE_NAME = "ledger_cluster.api.v1.LedgerService"

READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
KILL_TIMEOUT_SECONDS = 10.0
EXIT_TIMEOUT_SECONDS = 30.0
HEALTH_RPC_TIMEOUT_SECONDS = 1.0
POLL_INTERVAL_SECONDS = 0.05
LOG_TAIL_LINES = 60
# Short reconnect backoff, so a probe notices a server the moment it starts listening.
_PROBE_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


class LocalClusterError(LedgerError):
    """A local process or cluster did not do what its caller waited for; the message carries
    the last lines of the logs. Not an AssertionError: pytest reports any exception from a
    test anyway, and a harness that could not start or stop a process is not a failed check of
    the code under test."""


# Test and tool ports come from below the kernel's ephemeral range: a port from inside it may be
# taken, while its node is down for a restart, as the local end of some outgoing connection (a
# peer reconnecting to that very node), and the restarted node then cannot listen on it.
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LISTEN_PORT_LOWEST = 10_000
PORT_PROBES_MAX = 1000


def _listen_port_range() -> range | None:
    try:
        ephemeral_lowest = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if ephemeral_lowest - LISTEN_PORT_LOWEST < PORT_PROBES_MAX:
        return None
    return range(LISTEN_PORT_LOWEST, ephemeral_lowest)


def _bound_probe(port: int) -> socket.socket | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((LOOPBACK_HOST, port))
    except OSError:
        probe.close()
        return None
    return probe


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback TCP ports that nothing listens on right now, below the
    ephemeral range where the kernel says which one it is: every probe socket stays bound until
    all are chosen, so no port is handed out twice."""
    candidates = _listen_port_range()
    probes: list[socket.socket] = []
    try:
        for _ in range(PORT_PROBES_MAX):
            if candidates is None or len(probes) == count:
                break
            # A port already probed fails to bind again: the bound probes keep the ports distinct.
            probe = _bound_probe(random.choice(candidates))
            if probe is not None:
                probes.append(probe)
        while len(probes) < count:
            probe = _bound_probe(0)
            if probe is None:
                raise LocalClusterError("no free loopback port")
            probes.append(probe)
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        return f"<cannot read {path}: {error}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ManagedProcess:
    """One child process whose stdout and stderr go to `log_path`."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        """The exit code once the process has ended (reaping it), else None."""
        return self.popen.poll()

    def is_running(self) -> bool:
        return self.exit_code() is None

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}, exit code {self.popen.returncode})"

    def fail(self, message: str) -> NoReturn:
        raise LocalClusterError(
            f"{self.describe()}: {message}\n--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
        )

    def wait_exit(self, timeout_seconds: float = EXIT_TIMEOUT_SECONDS) -> int:
        """Wait for the process to end on its own; fail (it is still running) past the timeout."""
        try:
            return self.popen.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after {timeout_seconds} s")

    def stop(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM by PID and wait; SIGKILL if it does not end in time. Returns the exit code
        (negative: the signal that ended it)."""
        if self.exit_code() is not None:
            return self.popen.returncode
        os.kill(self.pid, signal.SIGTERM)
        # A paused (SIGSTOPped) process only acts on the SIGTERM once it runs again.
        os.kill(self.pid, signal.SIGCONT)
        try:
            return self.popen.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self, timeout_seconds: float = KILL_TIMEOUT_SECONDS) -> int:
        """kill -9 by PID and reap the process."""
        if self.exit_code() is not None:
            return self.popen.returncode
        os.kill(self.pid, signal.SIGKILL)
        try:
            return self.popen.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            self.fail(f"did not end {timeout_seconds} s after SIGKILL")


def clean_environment() -> dict[str, str]:
    """This process's environment without LEDGER_* variables, so a developer's shell settings
    (LEDGER_HOST, LEDGER_CONFIG, ...) cannot change what a test starts."""
    return {key: value for key, value in os.environ.items() if not key.startswith("LEDGER_")}


def run_dev_cli(
    arguments: Sequence[str],
    timeout_seconds: float,
    cwd: Path | None = None,
    environment: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`ledger-dev ARGUMENTS...` in a subprocess, waited for, so nothing is left running;
    `environment` is added to the clean one (a cluster's credentials, say)."""
    return subprocess.run(
        [sys.executable, "-m", "ledger_cluster.cli.dev", *arguments],
        cwd=cwd,
        env={**clean_environment(), **(environment or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
    )


def start_process(
    name: str,
    command: Sequence[str],
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    """Start `command`, appending its output to `log_path` (so restarts keep earlier logs).
    `env` defaults to `clean_environment()`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        log_file.write(f"=== {name}: {' '.join(command)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=clean_environment() if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return ManagedProcess(name=name, command=list(command), log_path=log_path, popen=popen)


@contextmanager
def managed_process(
    name: str,
    command: Sequence[str],
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ManagedProcess]:
    """`start_process`, and stop the process when the block ends, however it ends."""
    process = start_process(name, command, log_path, cwd=cwd, env=env)
    try:
        yield process
    finally:
        process.stop()


def health_status(
    address: str, service: str = "", timeout_seconds: float = HEALTH_RPC_TIMEOUT_SECONDS
) -> str:
    """The name of `service`'s serving status at `address` (raises grpc.RpcError)."""
    with grpc.insecure_channel(address, options=_PROBE_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def wait_until_serving(
    process: ManagedProcess,
    address: str,
    service: str = "",
    timeout_seconds: float = READY_TIMEOUT_SECONDS,
    credentials: ClientCredentials | None = None,
) -> None:
    """Poll grpc.health.v1 Health/Check until SERVING; fail with the log tail if the process
    exits first or the deadline passes. `credentials` for a TLS port (plaintext without)."""
    deadline = time.monotonic() + timeout_seconds
    last_seen = "no answer yet"
    credentials = credentials or ClientCredentials(token=None, tls=None)
    with credentials.channel(address, options=_PROBE_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.exit_code() is not None:
                process.fail(f"exited before {address} was SERVING (last health answer: {last_seen})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                process.fail(
                    f"{address} not SERVING after {timeout_seconds} s (last health answer: {last_seen})"
                )
            try:
                response = stub.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=min(HEALTH_RPC_TIMEOUT_SECONDS, remaining),
                )
            except grpc.RpcError as error:
                # Every RpcError the grpc client raises is also a grpc.Call; the stubs cannot say so.
                last_seen = cast(grpc.Call, error).code().name
            else:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_seen = str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            time.sleep(POLL_INTERVAL_SECONDS)
