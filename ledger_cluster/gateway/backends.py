"""The layer below the public service: a shard's core, reached by shard id, either in this
process (standalone) or through the cluster's leaders. Both coalesce each shard's concurrent
writes (coalescer.py): one LMDB write transaction, or one node call, carries every write that
arrived while the previous one was in flight."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import NoReturn, Protocol

from ledger_cluster import metrics
from ledger_cluster.client import ClusterClient
from ledger_cluster.config import ClusterConfig
from ledger_cluster.core import AccountsCore, commands
from ledger_cluster.core.commands import ItemAnswer
from ledger_cluster.deadlines import Deadline
from ledger_cluster.errors import BackendTimeoutError, BackendUnavailableError, UnknownOutcomeError
from ledger_cluster.gateway.coalescer import ShardCoalescer
from ledger_cluster.internal.v1 import core_pb2
from ledger_cluster.metrics import ShardFigures
from ledger_cluster.process import stop_broken_process
from ledger_cluster.security import ClientCredentials
from ledger_cluster.storage import DirectoryLock
from ledger_cluster.transfer_flow import LocalShard, TransferDriver

logger = logging.getLogger(__name__)

LEADER_POLL_SECONDS = 1.0
# Worker threads that run standalone applies (each one LMDB write transaction and its fsync,
# which release the GIL); one per shard, up to this many.
APPLY_THREADS_MAX = 64
# A standalone apply cannot be abandoned halfway; its drain logs when one runs this long.
APPLY_STALL_WARNING_SECONDS = 5.0


class CoreApi(Protocol):
    """What the public service needs from the shards."""

    def shard_id(self, account_id: int) -> str:
        """The shard that owns `account_id` (writes of one shard are coalesced)."""
        ...

    async def update(self, shard_id: str, items: list[bytes], deadline: Deadline) -> list[ItemAnswer]:
        """Apply `items` (core commands, none a batch) on the shard; one answer per item: its
        result, or a LedgerError saying it was not applied or may have been. Raises a
        LedgerError when the shard refuses them outright (nothing applied)."""
        ...

    async def read(
        self, account_id: int, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult: ...

    async def read_shard(
        self, shard_id: str, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult: ...

    def is_ready(self) -> bool: ...

    def shard_figures(self) -> list[ShardFigures]:
        """Per-shard figures for /metrics, from the shards this process holds."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class _CoalescingBackend:
    """One coalescer per shard in front of `_send`."""

    def __init__(self, config: ClusterConfig) -> None:
        self._config = config
        self._coalescers = {
            shard.shard_id: ShardCoalescer(shard.shard_id, functools.partial(self._send, shard.shard_id))
            for shard in config.shards
        }

    async def _send(
        self, shard_id: str, items: list[bytes], deadlines: list[Deadline]
    ) -> Sequence[ItemAnswer]:
        raise NotImplementedError

    def shard_id(self, account_id: int) -> str:
        return self._config.shard_for_account(account_id).shard_id

    def coalescer(self, shard_id: str) -> ShardCoalescer:
        return self._coalescers[shard_id]

    async def update(self, shard_id: str, items: list[bytes], deadline: Deadline) -> list[ItemAnswer]:
        return await self._coalescers[shard_id].submit(items, deadline)

    async def _close_coalescers(self) -> None:
        await asyncio.gather(*(coalescer.close() for coalescer in self._coalescers.values()))


class _StandaloneShard:
    def __init__(self, core: AccountsCore) -> None:
        self.core = core
        # Applies of one shard never overlap (its coalescer has one send in flight), so the
        # log index needs no lock.
        self.next_index = core.applied_index() + 1


def _always() -> bool:
    return True  # a standalone process leads every shard it holds


class StandaloneBackend(_CoalescingBackend):
    """Every shard of a config in this process: one LMDB environment per shard, no Raft. Each
    coalesced group of writes is one synced LMDB write transaction, so an acknowledged write
    survives kill -9 (and power loss). The data directory is locked against a second process."""

    def __init__(
        self,
        config: ClusterConfig,
        data_dir: str | os.PathLike[str],
        on_broken: Callable[[BaseException], NoReturn] = stop_broken_process,
    ) -> None:
        super().__init__(config)
        self._on_broken = on_broken
        self._closed = False
        self._lock = DirectoryLock(Path(data_dir))
        replicas_dir = Path(data_dir) / "replicas"
        self._shards: dict[str, _StandaloneShard] = {}
        try:
            for shard in config.shards:
                core = AccountsCore.open(replicas_dir / shard.shard_id, shard.lower_bound, shard.upper_bound)
                self._shards[shard.shard_id] = _StandaloneShard(core)
        except BaseException:
            self._close_shards()
            raise
        self._executor = futures.ThreadPoolExecutor(
            max_workers=min(len(config.shards), APPLY_THREADS_MAX), thread_name_prefix="apply"
        )
        # This process leads every shard: it expires and finishes transfers of all of them.
        self._driver = TransferDriver(self, self._local_shards)

    def _local_shards(self) -> list[LocalShard]:
        if self._closed:
            return []
        return [LocalShard(shard_id, shard.core, _always) for shard_id, shard in sorted(self._shards.items())]

    async def start(self) -> None:
        self._driver.start()

    def core(self, shard_id: str) -> AccountsCore:
        return self._shard(shard_id).core

    def _shard(self, shard_id: str) -> _StandaloneShard:
        shard = self._shards.get(shard_id)
        if shard is None or self._closed:
            raise BackendUnavailableError("server is shutting down; nothing applied")
        return shard

    async def _send(
        self, shard_id: str, items: list[bytes], deadlines: list[Deadline]
    ) -> Sequence[ItemAnswer]:
        shard = self._shard(shard_id)
        applying = asyncio.get_running_loop().run_in_executor(
            self._executor, self._apply, shard, items, deadlines
        )
        while True:
            done, _ = await asyncio.wait({applying}, timeout=APPLY_STALL_WARNING_SECONDS)
            if done:
                return applying.result()
            logger.warning(
                "shard %s: an apply has run for over %.0f s", shard_id, APPLY_STALL_WARNING_SECONDS
            )

    def _apply(
        self, shard: _StandaloneShard, items: list[bytes], deadlines: list[Deadline]
    ) -> list[ItemAnswer]:
        """On a worker thread: one LMDB write transaction for the items whose deadline has not
        passed while they waited for it; the others are never applied."""
        started_seconds = time.perf_counter()
        answers: list[ItemAnswer] = [
            BackendTimeoutError("the deadline passed before the write transaction; not applied")
        ] * len(items)
        live = [index for index, deadline in enumerate(deadlines) if not deadline.expired()]
        if not live:
            return answers
        try:
            result = shard.core.apply(commands.batch([items[index] for index in live]), shard.next_index)
        except Exception as error:  # any exception from apply: the state is not to be trusted
            self._on_broken(error)
        shard.next_index += 1
        metrics.APPLY_LATENCY.observe(time.perf_counter() - started_seconds)
        results = commands.item_results(result, len(live))
        for position, index in enumerate(live):
            answers[index] = (
                results[position]
                if results is not None
                else UnknownOutcomeError("applied, but the answer lacks the items' results")
            )
        return answers

    async def read(
        self, account_id: int, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult:
        return await self.read_shard(self.shard_id(account_id), query, consistent, deadline)

    async def read_shard(
        self, shard_id: str, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult:
        # One process, synced commits before acknowledgement: every read is linearizable,
        # so `consistent` needs no extra step here.
        return self._shard(shard_id).core.read(query)

    def is_ready(self) -> bool:
        return not self._closed

    def shard_figures(self) -> list[ShardFigures]:
        figures = []
        for shard_id, shard in sorted(self._shards.items()):
            used_bytes, map_bytes = shard.core.storage_bytes()
            figures.append(ShardFigures(shard_id, shard.core.applied_index(), used_bytes, map_bytes))
        return figures

    async def close(self) -> None:
        if self._closed:
            return
        await self._driver.stop()
        await self._close_coalescers()
        self._closed = True
        # Waits for an apply in flight: the environments close only after it committed.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._close_shards()

    def _close_shards(self) -> None:
        for shard in self._shards.values():
            shard.core.close()
        self._shards.clear()
        self._lock.release()


class ClusterBackend(_CoalescingBackend):
    """Every shard is a Raft group on the node processes; each coalesced group goes to the
    shard's leader through the ClusterClient. A background poll of the nodes keeps the leader
    cache warm and tells health whether every shard has a reachable leader."""

    def __init__(self, config: ClusterConfig, credentials: ClientCredentials) -> None:
        super().__init__(config)
        self._client = ClusterClient(config, credentials)
        self._shard_ids = {shard.shard_id for shard in config.shards}
        self._ready = False
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll_leaders(), name="leader-poll")

    async def _poll_leaders(self) -> None:
        previously_leaderless: list[str] = []
        while True:
            try:
                leaders = await self._client.refresh_leaders()
            except Exception:  # the poller must outlive any one bad answer, or health freezes
                logger.exception("leader poll failed")
                leaders = {}
            leaderless = sorted(self._shard_ids - set(leaders))
            if leaderless != previously_leaderless:
                if leaderless:
                    logger.warning("shards without a leader: %s", ", ".join(leaderless))
                else:
                    logger.info("every shard has a leader")
                previously_leaderless = leaderless
            self._ready = not leaderless
            await asyncio.sleep(LEADER_POLL_SECONDS)

    async def _send(
        self, shard_id: str, items: list[bytes], deadlines: list[Deadline]
    ) -> Sequence[ItemAnswer]:
        return await self._client.update(shard_id, items, deadlines)

    async def read(
        self, account_id: int, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult:
        return await self._client.read(self.shard_id(account_id), query, consistent, deadline)

    async def read_shard(
        self, shard_id: str, query: core_pb2.ReadQuery, consistent: bool, deadline: Deadline
    ) -> core_pb2.ReadResult:
        return await self._client.read(shard_id, query, consistent, deadline)

    def is_ready(self) -> bool:
        return self._ready

    def shard_figures(self) -> list[ShardFigures]:
        return []  # the shards live on the nodes, which report them

    async def close(self) -> None:
        await self._close_coalescers()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.wait({self._poller}, timeout=LEADER_POLL_SECONDS)
        await self._client.close()
