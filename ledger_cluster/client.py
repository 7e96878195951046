"""ClusterClient: shard -> leader node, with a leader cache refreshed from hints, and retries with
backoff inside each write's own deadline. Asyncio: one `grpc.aio` channel per node, used from one
event loop.

A retry always re-sends the very same command bytes (same ids, same `now`), so the core
recognises a repeat and a command can never apply twice however often it is sent. Each command
of a coalesced update keeps its own deadline and its own fate: answered, never applied, or
unknown (it may have reached the log in an attempt whose answer was lost).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from ledger_cluster.config import ClusterConfig, ShardConfig
from ledger_cluster.core import commands
from ledger_cluster.core.commands import ItemAnswer
from ledger_cluster.deadlines import MICROSECONDS_PER_SECOND, Deadline
from ledger_cluster.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    LedgerError,
    UnknownOutcomeError,
)
from ledger_cluster.internal.v1 import core_pb2, node_pb2, node_pb2_grpc
from ledger_cluster.limits import NODE_MESSAGE_BYTES_MAX
from ledger_cluster.node_calls import NodeCalls
from ledger_cluster.node_protocol import LEADER_HINT_METADATA_KEY, NodeReason, is_not_taken
from ledger_cluster.security import ClientCredentials
from ledger_cluster.status import ErrorDetails, error_details

logger = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_SECONDS_MAX = 2.0
# How long an attempt waits for a channel to a node to connect before trying another replica.
CONNECT_TIMEOUT_SECONDS_MAX = 0.5
BACKOFF_INITIAL_SECONDS = 0.02
BACKOFF_MAX_SECONDS = 0.5
ATTEMPTS_MAX = 200  # a bound on the loop even with a huge deadline
# Leader hints followed without backoff in one call: two nodes pointing at each other during an
# election must not spin.
HINTS_FOLLOWED_MAX = 3
LEADERLESS_FAIL_FAST_SECONDS = 3.0
STATUS_TIMEOUT_SECONDS = 1.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", NODE_MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", NODE_MESSAGE_BYTES_MAX),
    # Reconnect quickly to a node that restarts: failover must not wait on gRPC's long backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# A node answering these codes without a reason of ours may or may not have taken the command
# (a connection lost mid-call, a timeout): retry the same bytes, and remember it may apply.
_TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}

# Not-taken answers after which the cached leader is no use for the next attempt.
_LEADER_GONE_REASONS = frozenset(
    {
        NodeReason.NO_LEADER,
        NodeReason.SHARD_NOT_HOSTED,
        NodeReason.NODE_UNAVAILABLE,
        NodeReason.PROPOSAL_DENIED,
    }
)


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    address: str
    replicas: tuple[node_pb2.ReplicaStatus, ...]
    error: str  # empty when the node answered


# Refusals made before the command was read: every replica would refuse them the same way.
_REFUSED_REASONS = frozenset({NodeReason.UNAUTHENTICATED, NodeReason.COMMAND_TOO_LARGE})


class _Verdict(enum.Enum):
    FOLLOW_HINT = enum.auto()  # not taken; the leader is known: ask it at once
    NOT_TAKEN = enum.auto()  # not taken; back off and try again
    LEADERLESS = enum.auto()  # not taken, and the shard has had no leader for too long
    REFUSED = enum.auto()  # not taken, and no retry changes that (a wrong token, a command too long)
    MAYBE_TAKEN = enum.auto()  # may have reached the log: retry the same bytes
    UNEXPECTED = enum.auto()  # a bug or a refusal no retry can fix


class _Route:
    """One call's walk over a shard's replicas: which node to ask next, hints followed,
    backoff, and what each failure means."""

    def __init__(self, client: ClusterClient, shard: ShardConfig) -> None:
        self._client = client
        self.shard = shard
        self._backoff_seconds = BACKOFF_INITIAL_SECONDS
        self._hints_followed = 0
        self.last_problem = ""

    def node(self, attempt: int) -> str:
        leader = self._client.cached_leader(self.shard.shard_id)
        if leader is not None:
            return leader
        return self.shard.replicas[attempt % len(self.shard.replicas)].node_id

    def never_sent(self, node_id: str, why: str) -> _Verdict:
        self.last_problem = f"{node_id}: {why}"
        self._client.remember_leader(self.shard.shard_id, None)
        return self._leaderless_or_not_taken()

    def _leaderless_or_not_taken(self) -> _Verdict:
        if self._client.leaderless_seconds(self.shard.shard_id) > LEADERLESS_FAIL_FAST_SECONDS:
            # An election takes at most ~1.4 s: a shard leaderless for longer has lost its
            # majority. Say so now instead of holding the caller to its deadline.
            return _Verdict.LEADERLESS
        return _Verdict.NOT_TAKEN

    def failed(self, node_id: str, details: ErrorDetails) -> _Verdict:
        self.last_problem = f"{node_id}: {details.code.name} {details.reason} {details.message}".strip()
        if details.reason == NodeReason.NOT_LEADER:
            hint = details.metadata.get(LEADER_HINT_METADATA_KEY) or None
            self._client.remember_leader(self.shard.shard_id, hint)
            if hint is not None and hint != node_id and self._hints_followed < HINTS_FOLLOWED_MAX:
                self._hints_followed += 1
                return _Verdict.FOLLOW_HINT
            return _Verdict.NOT_TAKEN
        if details.reason in _REFUSED_REASONS:
            return _Verdict.REFUSED
        if is_not_taken(details.reason):
            # A busy leader (QUEUE_FULL, NOT_PROPOSED, TOO_MANY_REQUESTS) is still the leader.
            if details.reason in _LEADER_GONE_REASONS:
                self._client.remember_leader(self.shard.shard_id, None)
            if details.reason == NodeReason.NO_LEADER:
                return self._leaderless_or_not_taken()
            return _Verdict.NOT_TAKEN
        # A lost connection, or a proposal whose leader lost its term: ask around again.
        self._client.remember_leader(self.shard.shard_id, None)
        if details.reason == NodeReason.OUTCOME_UNKNOWN or details.code in _TRANSIENT_CODES:
            return _Verdict.MAYBE_TAKEN
        return _Verdict.UNEXPECTED

    async def pause(self, deadline: Deadline) -> None:
        sleep_seconds = min(self._backoff_seconds * random.uniform(0.5, 1.0), deadline.remaining_seconds())
        if sleep_seconds > 0:
            await asyncio.sleep(sleep_seconds)
        self._backoff_seconds = min(self._backoff_seconds * 2, BACKOFF_MAX_SECONDS)


class _UpdateFates:
    """What became of each command of one update: its answer, or whether it may have reached
    the log in an attempt that got no answer."""

    def __init__(self, shard_id: str, deadlines: Sequence[Deadline]) -> None:
        self._shard_id = shard_id
        self.deadlines = deadlines
        self.answers: list[ItemAnswer | None] = [None] * len(deadlines)
        self.maybe_applied = [False] * len(deadlines)

    def open_indexes(self) -> list[int]:
        """The commands still to send: unanswered, with time left."""
        return [
            index
            for index, answer in enumerate(self.answers)
            if answer is None and not self.deadlines[index].expired()
        ]

    def not_proposed(self, index: int) -> LedgerError:
        """A node dropped it unproposed when its time ran out."""
        if self.maybe_applied[index]:
            return UnknownOutcomeError(f"shard {self._shard_id}: an earlier attempt may still apply")
        return BackendTimeoutError(f"shard {self._shard_id}: the deadline passed before it was proposed")

    def end_unknown(self, indexes: Sequence[int], why: str) -> None:
        for index in indexes:
            self.answers[index] = UnknownOutcomeError(f"shard {self._shard_id}: {why}; it may apply")

    def end_all(self, indexes: Sequence[int], why: str) -> None:
        for index in indexes:
            if self.maybe_applied[index]:
                self.answers[index] = UnknownOutcomeError(f"shard {self._shard_id}: {why}; it may apply")
            else:
                self.answers[index] = BackendUnavailableError(f"shard {self._shard_id}: {why}; not applied")

    def final(self, last_problem: str) -> list[ItemAnswer]:
        """Every answer; a command still open ran out of time: unknown if an attempt may have
        taken it, "unavailable" if every attempt failed, "deadline" if none was made."""
        for index, answer in enumerate(self.answers):
            if answer is not None:
                continue
            if self.maybe_applied[index]:
                self.answers[index] = UnknownOutcomeError(
                    f"shard {self._shard_id}: no answer in time (last: {last_problem}); it may still apply"
                )
            elif last_problem:
                self.answers[index] = BackendUnavailableError(
                    f"shard {self._shard_id} did not answer in time; last: {last_problem}"
                )
            else:
                self.answers[index] = BackendTimeoutError(
                    f"shard {self._shard_id}: the deadline passed before any attempt"
                )
        return [answer for answer in self.answers if answer is not None]


class ClusterClient:
    """Calls every node's NodeService with the cluster's credentials (the token passed per call:
    cheaper on this hot path than an asyncio interceptor)."""

    def __init__(self, config: ClusterConfig, credentials: ClientCredentials) -> None:
        self.config = config
        bare = credentials.without_interceptors()
        self._metadata = credentials.metadata
        self._channels = {
            node.node_id: bare.aio_channel(node.grpc_address, options=CHANNEL_OPTIONS)
            for node in config.nodes
        }
        self._stubs = {
            node_id: node_pb2_grpc.NodeServiceStub(channel) for node_id, channel in self._channels.items()
        }
        self._node_calls = {
            node_id: NodeCalls(node_id, stub, self._metadata) for node_id, stub in self._stubs.items()
        }
        self._shards_by_id = {shard.shard_id: shard for shard in config.shards}
        self._leaders: dict[str, str] = {}
        # Why each node last failed to answer a status poll ("" once it answers).
        self._node_errors: dict[str, str] = {}
        # When each shard was last seen without a usable leader (absent: it has one, or unknown).
        self._leaderless_since: dict[str, float] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    # -- leader cache --

    def cached_leader(self, shard_id: str) -> str | None:
        return self._leaders.get(shard_id)

    def remember_leader(self, shard_id: str, node_id: str | None) -> None:
        shard = self._shards_by_id.get(shard_id)
        if shard is None:
            return  # a node reporting a shard this config does not know
        if node_id and any(replica.node_id == node_id for replica in shard.replicas):
            self._leaders[shard_id] = node_id
        else:
            self._leaders.pop(shard_id, None)

    def leaderless_seconds(self, shard_id: str) -> float:
        """How long refresh_leaders has seen this shard without a usable leader (0: it has one,
        or nobody polls)."""
        since = self._leaderless_since.get(shard_id)
        return 0.0 if since is None else time.monotonic() - since

    async def _connected(self, node_id: str, deadline: Deadline) -> bool:
        """Whether the channel to `node_id` is up, waiting briefly for one that is connecting.
        A call is only made on a connected channel, so a failure to connect proves the command
        never left this process."""
        channel = self._channels[node_id]
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return True
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            return False
        wait_seconds = min(deadline.remaining_seconds(), CONNECT_TIMEOUT_SECONDS_MAX)
        try:
            await asyncio.wait_for(channel.channel_ready(), wait_seconds)
        except TimeoutError:
            return False
        return True

    # -- calls --

    async def update(
        self, shard_id: str, items: Sequence[bytes], deadlines: Sequence[Deadline]
    ) -> list[ItemAnswer]:
        """Apply `items` (each one core command, never a batch) on the shard's leader, each
        with its own deadline; one answer per item: its CommandResult, or a LedgerError
        saying it was not applied (BackendUnavailableError, BackendTimeoutError) or may have
        been (UnknownOutcomeError)."""
        shard = self._shards_by_id[shard_id]
        route = _Route(self, shard)
        fates = _UpdateFates(shard_id, deadlines)
        for attempt in range(ATTEMPTS_MAX):
            open_indexes = fates.open_indexes()
            if not open_indexes:
                break
            call_deadline = max(deadlines[index] for index in open_indexes).earlier(
                ATTEMPT_TIMEOUT_SECONDS_MAX
            )
            node_id = route.node(attempt)
            verdict = await self._update_attempt(
                route,
                node_id=node_id,
                items=items,
                fates=fates,
                open_indexes=open_indexes,
                call_deadline=call_deadline,
            )
            if verdict is None or verdict is _Verdict.FOLLOW_HINT:
                continue
            if verdict is _Verdict.LEADERLESS:
                fates.end_all(open_indexes, f"no leader for {LEADERLESS_FAIL_FAST_SECONDS:.0f} s")
                break
            if verdict is _Verdict.REFUSED:
                logger.warning("shard %s: refused by %s", shard_id, route.last_problem)
                fates.end_all(open_indexes, f"refused by {route.last_problem}")
                break
            if verdict is _Verdict.UNEXPECTED:
                # Not a retry case, and the node may have taken them before it failed.
                logger.warning("shard %s: unexpected answer from %s", shard_id, route.last_problem)
                fates.end_unknown(open_indexes, f"unexpected answer from {route.last_problem}")
                break
            await route.pause(call_deadline)
        return fates.final(route.last_problem)

    async def _update_attempt(
        self,
        route: _Route,
        *,
        node_id: str,
        items: Sequence[bytes],
        fates: _UpdateFates,
        open_indexes: list[int],
        call_deadline: Deadline,
    ) -> _Verdict | None:
        """One UpdateRequest of the open commands to `node_id`; None when it was answered."""
        if not await self._connected(node_id, call_deadline):
            return route.never_sent(node_id, "not connected")
        if call_deadline.expired():
            return _Verdict.NOT_TAKEN  # connecting took the time left: nothing was sent
        budgets_us = [
            int(min(fates.deadlines[index], call_deadline).remaining_seconds() * MICROSECONDS_PER_SECOND)
            for index in open_indexes
        ]
        request = node_pb2.UpdateRequest(
            shard_id=route.shard.shard_id,
            command=commands.batch([items[index] for index in open_indexes]),
            item_budgets_us=budgets_us,
        )
        response = await self._node_calls[node_id].update(request, call_deadline)
        if isinstance(response, ErrorDetails):
            verdict = route.failed(node_id, response)
            if verdict is _Verdict.MAYBE_TAKEN:
                for index in open_indexes:
                    fates.maybe_applied[index] = True
            return verdict
        self.remember_leader(route.shard.shard_id, node_id)
        self._record_answers(response, fates, open_indexes)
        return None

    @staticmethod
    def _record_answers(
        response: node_pb2.UpdateResponse, fates: _UpdateFates, open_indexes: list[int]
    ) -> None:
        results = commands.item_results(response.result, len(open_indexes))
        expired = set(response.expired_items)
        for position, index in enumerate(open_indexes):
            if position in expired:
                fates.answers[index] = fates.not_proposed(index)
            elif results is None:
                fates.answers[index] = UnknownOutcomeError("applied, but the answer lacks the items' results")
            else:
                fates.answers[index] = results[position]

    async def read(
        self, shard_id: str, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult:
        shard = self._shards_by_id[shard_id]
        route = _Route(self, shard)
        request = node_pb2.ReadRequest(shard_id=shard_id, query=query, consistent=consistent)
        for attempt in range(ATTEMPTS_MAX):
            if deadline.expired():
                break
            call_deadline = deadline.earlier(ATTEMPT_TIMEOUT_SECONDS_MAX)
            node_id = route.node(attempt)
            if not await self._connected(node_id, call_deadline):
                verdict = route.never_sent(node_id, "not connected")
            elif call_deadline.expired():
                verdict = _Verdict.NOT_TAKEN  # connecting took the time left: nothing was sent
            else:
                try:
                    response = await self._stubs[node_id].Read(
                        request, timeout=call_deadline.remaining_seconds(), metadata=self._metadata
                    )
                except grpc.aio.AioRpcError as error:
                    verdict = route.failed(node_id, error_details(error))
                else:
                    self.remember_leader(shard_id, node_id)
                    return response.result
            if verdict is _Verdict.FOLLOW_HINT:
                continue
            if verdict in (_Verdict.LEADERLESS, _Verdict.REFUSED):
                break
            if verdict is _Verdict.UNEXPECTED:
                logger.warning("shard %s: unexpected answer from %s", shard_id, route.last_problem)
                raise LedgerError(f"shard {shard_id}: unexpected answer from {route.last_problem}")
            await route.pause(call_deadline)
        if not route.last_problem:
            raise BackendTimeoutError(f"shard {shard_id}: the deadline passed before any attempt")
        raise BackendUnavailableError(f"shard {shard_id} did not answer in time; last: {route.last_problem}")

    # -- status --

    async def node_statuses(self, timeout_seconds: float = STATUS_TIMEOUT_SECONDS) -> list[NodeStatus]:
        """Every node's view of its replicas, asked in parallel; unreachable nodes say why."""

        async def ask(node_id: str, address: str) -> NodeStatus:
            try:
                response = await self._stubs[node_id].Status(
                    node_pb2.StatusRequest(), timeout=timeout_seconds, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as error:
                return NodeStatus(node_id, address, (), error.code().name)
            return NodeStatus(node_id, address, tuple(response.replicas), "")

        return list(
            await asyncio.gather(*(ask(node.node_id, node.grpc_address) for node in self.config.nodes))
        )

    def _report_node_errors(self, statuses: list[NodeStatus]) -> None:
        """Log each node's failure to answer once, when it changes (UNAUTHENTICATED names a
        token mismatch at once, instead of only "shards without a leader")."""
        for status in statuses:
            if status.error != self._node_errors.get(status.node_id, ""):
                if status.error:
                    logger.warning(
                        "node %s (%s) does not answer: %s", status.node_id, status.address, status.error
                    )
                else:
                    logger.info("node %s (%s) answers again", status.node_id, status.address)
                self._node_errors[status.node_id] = status.error

    async def refresh_leaders(self, timeout_seconds: float = STATUS_TIMEOUT_SECONDS) -> dict[str, str]:
        """Ask every node who leads what; remember and return shard id -> leader node id for
        the shards whose leader answered as leader with a majority in reach (the highest term
        wins a disagreement)."""
        statuses = await self.node_statuses(timeout_seconds)
        self._report_node_errors(statuses)
        leaders = leaders_of(statuses)
        for shard_id, node_id in leaders.items():
            self.remember_leader(shard_id, node_id)
        now = time.monotonic()
        for shard_id in self._shards_by_id:
            if shard_id in leaders:
                self._leaderless_since.pop(shard_id, None)
            else:
                self._leaderless_since.setdefault(shard_id, now)
        return leaders


def leaders_of(statuses: Sequence[NodeStatus]) -> dict[str, str]:
    """Shard id -> the node that leads it with a majority in reach (highest term wins)."""
    best: dict[str, tuple[int, str]] = {}
    for status in statuses:
        for replica in status.replicas:
            usable = replica.is_leader and replica.has_quorum
            if usable and replica.term >= best.get(replica.shard_id, (-1, ""))[0]:
                best[replica.shard_id] = (replica.term, replica.node_id)
    return {shard_id: node_id for shard_id, (_, node_id) in best.items()}


def node_statuses_now(
    config: ClusterConfig, credentials: ClientCredentials, timeout_seconds: float = STATUS_TIMEOUT_SECONDS
) -> list[NodeStatus]:
    """`node_statuses` for synchronous tools (status, backup): its own client and event loop."""

    async def ask() -> list[NodeStatus]:
        client = ClusterClient(config, credentials)
        try:
            return await client.node_statuses(timeout_seconds)
        finally:
            await client.close()

    return asyncio.run(ask())
