"""Network partitions for the nemesis: a private network namespace to run the cluster in, and
iptables rules inside it that cut or thin the Raft links between nodes.

Safety (see FAULTS.md): a partitioned cluster only ever runs inside ONE private namespace
whose only interface is its own loopback, nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 of that
loopback, so no rule and no packet can reach anything outside it. The `Firewall` refuses to
touch iptables unless the process really is inside the namespace it was started in
(`ip netns identify`), never in the host's.

What a fault cuts: the Raft links between nodes, matched by the nodes' own addresses (a node
dials its peers from its own host, see raft_loop) and the two Raft ports of the link. Client
links stay up in every fault: the gateway, the nemesis's own calls and the node-to-node gRPC
calls of a transfer's driver all leave from 127.0.0.1 and reach every node. So a client can
still reach a node cut off from its peers, a deposed leader included: the hardest case for the
promises (it must answer with an error or an unknown outcome, never a stale or wrong answer).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# Set (to the namespace's name) in the environment of a runner re-executed inside a namespace.
NAMESPACE_ENVIRONMENT_VARIABLE = "LEDGER_NEMESIS_NAMESPACE"
NAMESPACE_PREFIX = "ledger-nemesis"
# The chain every nemesis rule lives in, jumped to first from OUTPUT (loopback packets pass
# OUTPUT once, so one place drops them); healing flushes it.
CHAIN = "LEDGER-NEMESIS"
COMMAND_TIMEOUT_SECONDS = 10.0
# Processes still in the namespace when the runner ended get this long after SIGTERM.
LEFTOVER_STOP_SECONDS = 5.0
POLL_INTERVAL_SECONDS = 0.05


class NamespaceError(RuntimeError):
    """A namespace or a firewall rule could not be made, or would not be private."""


@dataclass(frozen=True)
class RaftEndpoint:
    """A node as the firewall sees it: its own loopback address and its Raft port."""

    node_id: str
    host: str
    raft_port: int


def raft_endpoint(node_id: str, raft_address: str) -> RaftEndpoint:
    host, _, port = raft_address.rpartition(":")
    return RaftEndpoint(node_id, host, int(port))


def drop_rule(source: RaftEndpoint, destination: RaftEndpoint, probability: float = 1.0) -> list[str]:
    """iptables arguments (after `-A CHAIN`) that drop what `source` sends to `destination` on
    the Raft link between them, whichever of the two dialed it: every packet, or each at random
    with `probability`."""
    if source.host == destination.host:
        raise NamespaceError(f"{source.node_id} and {destination.node_id} share {source.host}")
    rule = ["-p", "tcp", "-s", source.host, "-d", destination.host]
    rule += ["-m", "multiport", "--ports", f"{source.raft_port},{destination.raft_port}"]
    if probability < 1.0:
        rule += ["-m", "statistic", "--mode", "random", "--probability", f"{probability:.4f}"]
    return [*rule, "-j", "DROP"]


def cut_rules(side: Sequence[RaftEndpoint], other_side: Sequence[RaftEndpoint]) -> list[list[str]]:
    """Both directions between every node of `side` and every node of `other_side`."""
    return [
        rule
        for first in side
        for second in other_side
        for rule in (drop_rule(first, second), drop_rule(second, first))
    ]


def namespace_problem() -> str | None:
    """Why this process cannot make a private namespace with a firewall, or None if it can."""
    if os.geteuid() != 0:
        return "network partitions need root (a private network namespace and iptables in it)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"network partitions need `{tool}` (apt-get install -y {package})"
    return None


def _run(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NamespaceError(f"{' '.join(command)}: {error}") from error
    if done.returncode != 0:
        raise NamespaceError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def current_namespace() -> str:
    """The name of the network namespace this process is in ('' for the host's)."""
    return _run(["ip", "netns", "identify", str(os.getpid())]).strip()


@contextmanager
def private_namespace() -> Iterator[str]:
    """A new network namespace with only its loopback, up; deleted when the block ends (after
    any process still inside is stopped), however it ends."""
    name = f"{NAMESPACE_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        interfaces = [
            line.split(":")[1].strip() for line in _run(["ip", "-n", name, "-o", "link"]).splitlines()
        ]
        if interfaces != ["lo"]:
            raise NamespaceError(f"namespace {name} has interfaces {interfaces}, not only lo")
        yield name
    finally:
        try:
            _stop_leftovers(name)
        finally:
            _run(["ip", "netns", "delete", name])


def _stop_leftovers(name: str) -> None:
    """Processes left in the namespace (a runner that died before stopping its nodes) are all
    descendants of the runner this module started: SIGTERM each by PID, then SIGKILL."""
    deadline = time.monotonic() + LEFTOVER_STOP_SECONDS
    sent_signal = signal.SIGTERM
    while pids := [int(pid) for pid in _run(["ip", "netns", "pids", name]).split()]:
        for pid in pids:
            try:
                os.kill(pid, sent_signal)
            except ProcessLookupError:
                continue
        if time.monotonic() > deadline:
            sent_signal = signal.SIGKILL
        time.sleep(POLL_INTERVAL_SECONDS)


def run_inside_new_namespace(command: Sequence[str]) -> int:
    """Run `command` inside a new private namespace (which it learns from
    NAMESPACE_ENVIRONMENT_VARIABLE) and return its exit code; the namespace is gone afterwards.
    An interrupt reaches the command too (same process group): this waits for it to clean up."""
    with private_namespace() as name:
        environment = {**os.environ, NAMESPACE_ENVIRONMENT_VARIABLE: name}
        child = subprocess.Popen(["ip", "netns", "exec", name, *command], env=environment)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue


def rerun_in_namespace_unless_inside() -> None:
    """For a command that needs partitions: return if this process already runs in the private
    namespace made for it; otherwise re-execute this very command line inside a new one and exit
    with its exit code. Raises NamespaceError when that cannot be done here."""
    expected = os.environ.get(NAMESPACE_ENVIRONMENT_VARIABLE)
    if expected:
        if current_namespace() != expected:
            raise NamespaceError(
                f"{NAMESPACE_ENVIRONMENT_VARIABLE}={expected}, but this is not that namespace"
            )
        return
    problem = namespace_problem()
    if problem is not None:
        raise NamespaceError(problem)
    sys.exit(run_inside_new_namespace([sys.executable, "-m", "ledger_cluster.cli.dev", *sys.argv[1:]]))


class Firewall:
    """The nemesis's iptables rules, in the private namespace this process runs in."""

    def __init__(self) -> None:
        expected = os.environ.get(NAMESPACE_ENVIRONMENT_VARIABLE, "")
        actual = current_namespace() if expected else ""
        if not expected or actual != expected:
            raise NamespaceError(
                "refusing to add firewall rules outside a private nemesis namespace"
                f" (expected {expected or 'one'}, this process is in {actual or 'the host namespace'})"
            )
        self.namespace = expected
        try:
            _run(["iptables", "-N", CHAIN])
            _run(["iptables", "-I", "OUTPUT", "1", "-j", CHAIN])
        except NamespaceError:  # an earlier run in this namespace made them: start clean
            _run(["iptables", "-C", "OUTPUT", "-j", CHAIN])
            self.heal()

    def add(self, rules: Sequence[Sequence[str]]) -> None:
        for rule in rules:
            _run(["iptables", "-A", CHAIN, *rule])

    def rules(self) -> list[str]:
        """The chain's rules as `iptables -S` prints them."""
        return [line for line in _run(["iptables", "-S", CHAIN]).splitlines() if line.startswith("-A")]

    def heal(self) -> None:
        _run(["iptables", "-F", CHAIN])
