"""One thread per node drives every Raft group of the node and the node's Raft connections.
Used only by `replica`.

Each shard's PySyncObj group runs with `autoTick` off and a `ShardTransport`; this loop ticks
a group when something reached it (a message from a peer, a proposal from the NodeService) and
every group every `LOOP_TICK_PERIOD_SECONDS` for its timers (heartbeats, elections). All groups
share one connection per peer node: the node with the smaller id dials, the other accepts.
What the groups send during one turn of the loop goes out as one sealed frame per peer.

Durability (group commit of the journals). A turn of the loop: deliver what arrived, then a
barrier (wait for the journal syncs begun last turn, then sync every journal changed since,
`needs_sync`/`begin_sync`, replica_journal.py), tick the groups, send, and begin syncing every
journal the ticks changed, in the background. So:
- a tick works on a durable log. PySyncObj's leader counts itself for every entry of its own
  log when it computes the commit index (syncobj.py `_onTick`: `count = 1` for each index up to
  `__getCurrentLogIndex()`), and a follower raises its commit index to the leader's up to its
  own last entry (`__onMessageReceived`, append_entries) and applies it in the same tick
  (`__applyLogEntries`). Entries arrive between ticks (delivered before the barrier) or are
  appended late in a tick (`_checkCommandsToApply`, after the commit index and the applies;
  their sync begins after the turn's send and the next barrier waits for it): neither the
  commit index nor the state machine ever moves on an unsynced entry. The one exception is
  the no-op entry a group of one replica appends when it elects itself in a tick: it commits
  in that tick, carries nothing, and is synced before anything after it;
- nothing a peer receives relies on an unsynced journal change of this node: a follower's
  acknowledgement (`next_node_idx` success) is queued while its entries are delivered and sent
  after the barrier that synced them; a candidacy (`request_vote`) is made in a tick; terms and
  votes are fsynced inside PySyncObj's `setCurrentTerm`, before the message is even queued. A
  leader's entries do go out before its own fsync ends (Raft allows it: the leader's copy counts
  only once the next barrier synced it), which overlaps the leader's fsync with the followers';
- one fsync per changed journal per turn, however many entries the turn appended: the
  journals' group commit. Several journals' fsyncs run in parallel on SYNC_THREADS threads,
  so the file system can commit them together.
A failed fsync stops the node (`on_broken`): the kernel may have dropped the pages, and a
second fsync would report success without them.

Nothing else here waits on disk: the replica applies committed entries, restores installed
snapshots and writes its compaction dumps on other threads (`replica_apply`, `replica_dump`).
The exception is back pressure: when a shard's applier has APPLY_QUEUE_ENTRIES_MAX entries
waiting, handing it the next one waits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

from pysyncobj.node import Node
from pysyncobj.transport import Transport

from ledger_cluster import metrics
from ledger_cluster.raft_codec import (
    KEY_PROOF_FRAME_BYTES,
    FrameError,
    FrameOpener,
    FrameSealer,
    HandshakeError,
    Hello,
    MessageError,
    decode_hello,
    decode_messages,
    encode_hello,
    encode_message,
    link_keys,
    new_nonce,
)

logger = logging.getLogger(__name__)

# Every group is ticked this often for its timers; a group with news is ticked at once.
LOOP_TICK_PERIOD_SECONDS = 0.1
# A dialer retries a peer it cannot reach this often.
LINK_RETRY_SECONDS = 0.5
# A connection from which nothing (not even a keepalive) arrived for this long is closed, so a
# paused or vanished peer counts as disconnected, as PySyncObj's own transport does.
LINK_SILENCE_TIMEOUT_SECONDS = 3.5
LINK_KEEPALIVE_SECONDS = 0.5
# A handshake not finished in this time is abandoned.
HANDSHAKE_TIMEOUT_SECONDS = 3.0
# Sealed bytes waiting for a peer that does not read; past it the connection is closed (the
# groups resend from their match index after it reconnects).
LINK_OUTBOUND_BYTES_MAX = 256 * 1024 * 1024
RECEIVE_CHUNK_BYTES = 256 * 1024
# Messages of one turn are sealed together up to about this size per frame.
FRAME_PACK_BYTES = 1024 * 1024
# Accepted connections that have not yet proved the key; beyond it, new ones are closed at once.
HANDSHAKING_LINKS_MAX = 64
LISTEN_BACKLOG = 16
# Work handed to the loop by other threads (leadership transfers); an admin asks for few.
LOOP_TASKS_MAX = 1024
BIND_ATTEMPTS_MAX = 20
BIND_RETRY_SECONDS = 0.5
LOOP_JOIN_TIMEOUT_SECONDS = 10.0
# fsyncs of different journals in flight at once.
SYNC_THREADS = 4


class ShardTransport(Transport):  # type: ignore[misc]  # pysyncobj ships no type information
    """What one group's SyncObj sees of the network: sends go through the node's loop."""

    def __init__(self, loop: RaftLoop, shard_id: str, partners: Iterable[Node]) -> None:
        super().__init__(None, None, None)
        self._loop = loop
        self.shard_id = shard_id
        self._partners = {node.id: node for node in partners}

    def send(self, node: Node, message: dict[str, Any]) -> bool:
        return self._loop.send(node.id, self.shard_id, message)

    def peer_connected(self, peer_id: str) -> None:
        if peer_id in self._partners:
            self._onNodeConnected(self._partners[peer_id])

    def peer_disconnected(self, peer_id: str) -> None:
        if peer_id in self._partners:
            self._onNodeDisconnected(self._partners[peer_id])

    def deliver(self, peer_id: str, message: dict[str, Any]) -> bool:
        node = self._partners.get(peer_id)
        if node is None:
            return False
        if message["type"] == "append_entries" and "prevLogIdx" not in message:
            # A snapshot chunk. PySyncObj raises a follower's commit index from any
            # append_entries, up to the follower's own last entry, although a chunk checked
            # nothing against its log: a deposed leader would apply its own uncommitted entry
            # before the snapshot replaced it. Only entries that matched the leader's may move it.
            message = {**message, "commit_index": 0}
        self._onMessageReceived(node, message)
        return True


class _Link:
    """One connection to a peer node: the handshake, then sealed frames both ways."""

    def __init__(self, sock: socket.socket, peer_id: str | None, dialer: bool, now: float) -> None:
        self.sock = sock
        self.peer_id = peer_id
        self.dialer = dialer
        self.connected = not dialer  # an accepted socket is connected; a dialed one not yet
        self.local_hello: Hello | None = None
        self.sealer: FrameSealer | None = None
        self.opener: FrameOpener | None = None
        self.authenticated = False
        self.inbound = bytearray()
        self.outbound = bytearray()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.started_seconds = now
        self.last_received_seconds = now
        self.last_sent_seconds = now
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed


class _Group:
    def __init__(
        self,
        tick: Callable[[], None],
        transport: ShardTransport,
        needs_sync: Callable[[], bool],
        begin_sync: Callable[[], Callable[[], None]],
    ) -> None:
        self.tick = tick
        self.transport = transport
        self.needs_sync = needs_sync
        self.begin_sync = begin_sync


class RaftLoop:
    """Owns the node's Raft listener, its peer connections and the thread that ticks every
    group. Build it, `add_group` every shard, then `start()`; `stop()` before destroying the
    groups."""

    def __init__(
        self,
        node_id: str,
        listen_address: str,
        peers: Mapping[str, str],
        key: bytes,
        on_broken: Callable[[BaseException], NoReturn],
    ) -> None:
        self.node_id = node_id
        self._on_broken = on_broken
        self._peers = dict(peers)
        self._key = key
        self._selector = selectors.DefaultSelector()
        self._listener = _listen(listen_address)
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._drain_wake)
        self._wake_lock = threading.Lock()
        self._woken: set[str] = set()
        self._wake_signalled = False
        self._tasks: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=LOOP_TASKS_MAX)
        self._groups: dict[str, _Group] = {}
        self._dirty: set[str] = set()
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix=f"raft-sync-{node_id}")
        self._syncs_running: list[Future[None]] = []
        self._links: dict[str, _Link] = {}
        self._handshaking: set[_Link] = set()
        self._next_dial_seconds: dict[str, float] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- set-up, from the thread that builds the node ----------------------------------------

    def new_transport(self, shard_id: str, partners: Iterable[Node]) -> ShardTransport:
        return ShardTransport(self, shard_id, partners)

    def add_group(
        self,
        transport: ShardTransport,
        tick: Callable[[], None],
        needs_sync: Callable[[], bool],
        begin_sync: Callable[[], Callable[[], None]],
    ) -> None:
        """`needs_sync` says whether the group's journal has changes not known durable;
        `begin_sync` returns the call that makes them durable (on any thread; it may block on
        the disk). See the module docstring."""
        if self._thread is not None:
            raise RuntimeError("groups are added before the loop starts")
        self._groups[transport.shard_id] = _Group(tick, transport, needs_sync, begin_sync)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"raft-loop-{self.node_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._signal()
        if self._thread is not None:
            self._thread.join(LOOP_JOIN_TIMEOUT_SECONDS)
            if self._thread.is_alive():
                raise RuntimeError(
                    f"the Raft loop of {self.node_id} did not stop within {LOOP_JOIN_TIMEOUT_SECONDS} s"
                )
        self._sync_pool.shutdown()  # after the syncs begun in the last turn
        for link in list(self._links.values()) + list(self._handshaking):
            link.sock.close()
        self._listener.close()
        self._wake_reader.close()
        self._wake_writer.close()
        self._selector.close()

    # -- from any thread -----------------------------------------------------------------------

    def call_soon(self, task: Callable[[], None]) -> None:
        """Run `task` on the loop thread (the only one that may touch a group's Raft state);
        raises queue.Full when LOOP_TASKS_MAX tasks already wait."""
        self._tasks.put_nowait(task)
        self._signal()

    def wake(self, shard_id: str) -> None:
        """Tick the group soon: a proposal is waiting in its queue."""
        with self._wake_lock:
            self._woken.add(shard_id)
            signalled = self._wake_signalled
            self._wake_signalled = True
        if not signalled:
            self._signal()

    def _signal(self) -> None:
        # A full socket already wakes the loop; a closed one means it stopped.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_writer.send(b"w")

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick_seconds = time.monotonic()
        while not self._stopping:
            timeout = max(0.0, next_tick_seconds - time.monotonic())
            for key, mask in self._selector.select(timeout):
                self._guarded(key.data, key.fileobj, mask)
            self._run_tasks()
            due = self._take_due()
            now = time.monotonic()
            if now >= next_tick_seconds:
                next_tick_seconds = now + LOOP_TICK_PERIOD_SECONDS
                due = set(self._groups)
                self._guarded(self._maintain_links, now)
            self._sync_barrier()  # last turn's appends and this turn's arrivals are durable
            for shard_id in due:
                self._tick(shard_id)
            self._guarded(self._flush_links)
            # This turn's appends, while they travel.
            self._syncs_running = [self._sync_pool.submit(self._synced, sync) for sync in self._begin_syncs()]

    def _guarded(self, step: Callable[..., None], *arguments: Any) -> None:
        """One step of a loop turn. The loop must outlive any one connection's trouble (a full
        file table, a peer whose name does not resolve): a dead loop would leave the process
        serving while none of its shards ticks."""
        try:
            step(*arguments)
        except Exception:
            logger.exception("a step of the Raft loop failed")

    def _take_due(self) -> set[str]:
        with self._wake_lock:
            due = self._woken | self._dirty
            self._woken = set()
            # Only now may the next wake signal again: a wake that came after the socket was
            # drained but before this found its shard here, and one after this writes a byte.
            self._wake_signalled = False
        self._dirty = set()
        return due

    def _sync_barrier(self) -> None:
        """Every group's journal changes so far are durable when this returns."""
        for future in self._syncs_running:
            future.result()
        self._syncs_running = []
        pending = list(self._begin_syncs())
        if len(pending) == 1:
            self._synced(pending[0])  # no thread hop for the usual case of one
        else:
            for future in [self._sync_pool.submit(self._synced, sync) for sync in pending]:
                future.result()

    def _begin_syncs(self) -> Iterator[Callable[[], None]]:
        """Each group with unsynced journal changes begins its sync; each call yielded finishes
        one. Lazily, so a caller can hand one to the pool before the next group begins."""
        return (self._begin_sync(group) for group in self._groups.values() if group.needs_sync())

    def _begin_sync(self, group: _Group) -> Callable[[], None]:
        try:
            return group.begin_sync()
        except Exception as error:  # no descriptor left, say: nothing may be sent unsynced
            self._on_broken(error)

    def _synced(self, sync: Callable[[], None]) -> None:
        try:
            sync()
        except Exception as error:
            # Sending anything now could acknowledge what the disk may have lost.
            self._on_broken(error)

    def _tick(self, shard_id: str) -> None:
        group = self._groups.get(shard_id)
        if group is None:
            return
        try:
            group.tick()
        except Exception:
            # PySyncObj's own tick thread logs and carries on the same way; an apply that
            # fails stops the process in the replica instead.
            logger.exception("shard %s: a Raft tick failed", shard_id)

    def _run_tasks(self) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                task()
            except Exception:
                logger.exception("a task on the Raft loop failed")

    def _drain_wake(self, sock: Any, mask: int) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    # -- connections ---------------------------------------------------------------------------

    def _maintain_links(self, now: float) -> None:
        for link in list(self._links.values()) + list(self._handshaking):
            if not link.authenticated and now - link.started_seconds > HANDSHAKE_TIMEOUT_SECONDS:
                self._close(link, "handshake timed out")
            elif link.authenticated and now - link.last_received_seconds > LINK_SILENCE_TIMEOUT_SECONDS:
                self._close(link, "peer silent")
            elif link.authenticated and now - link.last_sent_seconds > LINK_KEEPALIVE_SECONDS:
                link.pending.append(b"")
        for peer_id in sorted(self._peers):
            due = now >= self._next_dial_seconds.get(peer_id, 0.0)
            if peer_id > self.node_id and peer_id not in self._links and due:
                self._dial(peer_id, now)

    def _dial(self, peer_id: str, now: float) -> None:
        host, _, port = self._peers[peer_id].rpartition(":")
        self._next_dial_seconds[peer_id] = now + LINK_RETRY_SECONDS  # unless this connects
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # From the node's own Raft host, not whatever source the route picks (127.0.0.1 for
            # any loopback peer): a partition's rules tell the nodes apart by source address.
            sock.bind((self._listener.getsockname()[0], 0))
            result = sock.connect_ex((host, int(port)))
        except OSError as error:  # a name that does not resolve, a full file table
            sock.close()
            logger.warning("cannot dial %s at %s: %s", peer_id, self._peers[peer_id], error)
            return
        if result not in (0, errno.EINPROGRESS):
            sock.close()
            return
        link = _Link(sock, peer_id, dialer=True, now=now)
        self._links[peer_id] = link
        self._selector.register(sock, selectors.EVENT_WRITE, self._on_event(link))

    def _accept(self, listener: Any, mask: int) -> None:
        try:
            sock, _address = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as error:  # a full file table: the next turn tries again
            logger.warning("cannot accept a Raft connection: %s", error)
            return
        if len(self._handshaking) >= HANDSHAKING_LINKS_MAX:
            # Whoever opens connections without finishing handshakes gets no more of them.
            metrics.RAFT_FRAMES_REJECTED.labels(reason="handshake").inc()
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(sock, None, dialer=False, now=time.monotonic())
        self._handshaking.add(link)
        self._selector.register(sock, selectors.EVENT_READ, self._on_event(link))

    def _on_event(self, link: _Link) -> Callable[[Any, int], None]:
        def handle(sock: Any, mask: int) -> None:
            if link.closed:
                return
            if mask & selectors.EVENT_WRITE:
                self._on_writable(link)
            if mask & selectors.EVENT_READ and not link.closed:
                self._on_readable(link)

        return handle

    def _on_writable(self, link: _Link) -> None:
        if not link.connected:
            error = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._close(link, f"connect failed: {errno.errorcode.get(error, error)}")
                return
            link.connected = True
            assert link.peer_id is not None
            link.local_hello = Hello(self.node_id, link.peer_id, new_nonce())
            link.outbound += encode_hello(link.local_hello)
        self._write(link)

    def _write(self, link: _Link) -> None:
        try:
            while link.outbound:
                sent = link.sock.send(link.outbound)
                del link.outbound[:sent]
        except BlockingIOError:
            pass
        except OSError as error:
            self._close(link, f"send failed: {error}")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.outbound else 0)
        if self._selector.get_key(link.sock).events != events:
            self._selector.modify(link.sock, events, self._selector.get_key(link.sock).data)

    def _on_readable(self, link: _Link) -> None:
        try:
            while True:
                chunk = link.sock.recv(RECEIVE_CHUNK_BYTES)
                if not chunk:
                    self._close(link, "closed by the peer")
                    return
                link.inbound += chunk
                if link.authenticated:
                    # A large frame takes a while to arrive; bytes of it prove the peer alive.
                    link.last_received_seconds = time.monotonic()
                if len(chunk) < RECEIVE_CHUNK_BYTES:
                    break
        except BlockingIOError:
            pass
        except OSError as error:
            self._close(link, f"receive failed: {error}")
            return
        try:
            if link.opener is None:
                self._read_hello(link)
            if link.opener is not None:
                self._read_frames(link)
        except HandshakeError as error:
            metrics.RAFT_FRAMES_REJECTED.labels(reason="handshake").inc()
            self._close(link, f"bad handshake: {error}")
        except FrameError as error:
            metrics.RAFT_FRAMES_REJECTED.labels(reason="frame").inc()
            self._close(link, str(error))
        except MessageError as error:
            metrics.RAFT_FRAMES_REJECTED.labels(reason="message").inc()
            self._close(link, f"bad message: {error}")

    def _read_hello(self, link: _Link) -> None:
        decoded = decode_hello(link.inbound)
        if decoded is None:
            return
        hello, length = decoded
        del link.inbound[:length]
        if hello.receiver_node_id != self.node_id:
            raise HandshakeError(f"addressed to {hello.receiver_node_id!r}, not {self.node_id!r}")
        if link.dialer:
            if hello.sender_node_id != link.peer_id or link.local_hello is None:
                raise HandshakeError(f"answered by {hello.sender_node_id!r}, not {link.peer_id!r}")
            outgoing, incoming = link_keys(self._key, link.local_hello, hello)
        else:
            self._accept_hello(link, hello)
            assert link.local_hello is not None
            incoming, outgoing = link_keys(self._key, hello, link.local_hello)
        link.sealer = FrameSealer(outgoing)
        link.opener = FrameOpener(incoming)
        link.pending.append(b"")  # proves the key before anything else is sent
        self._flush(link)

    def _accept_hello(self, link: _Link, hello: Hello) -> None:
        peer_id = hello.sender_node_id
        if peer_id not in self._peers or peer_id >= self.node_id:
            raise HandshakeError(f"node {peer_id!r} may not dial {self.node_id!r}")
        link.peer_id = peer_id
        link.local_hello = Hello(self.node_id, peer_id, new_nonce())
        link.outbound += encode_hello(link.local_hello)

    def _read_frames(self, link: _Link) -> None:
        assert link.opener is not None and link.peer_id is not None
        while not link.is_closed():
            # Until the peer proved the key, only its empty key-proof frame is taken: nobody
            # without the key makes this node buffer a large frame.
            plaintext = link.opener.take(link.inbound, None if link.authenticated else KEY_PROOF_FRAME_BYTES)
            if plaintext is None:
                return
            link.last_received_seconds = time.monotonic()
            if not link.authenticated:
                self._open(link)
            for shard_id, message in decode_messages(plaintext):
                group = self._groups.get(shard_id)
                if group is None or not self._deliver(group, link.peer_id, message):
                    metrics.RAFT_FRAMES_REJECTED.labels(reason="shard").inc()
                    continue
                self._dirty.add(shard_id)
                if link.is_closed():  # a group's send overflowed the connection
                    return

    def _deliver(self, group: _Group, peer_id: str, message: dict[str, Any]) -> bool:
        try:
            return group.transport.deliver(peer_id, message)
        except Exception as error:
            # PySyncObj failed halfway through a message (its journal could not grow, say):
            # its state is no longer known to be whole.
            self._on_broken(error)

    def _open(self, link: _Link) -> None:
        """The peer proved it holds the cluster key: from now on its groups are connected."""
        assert link.peer_id is not None
        previous = self._links.get(link.peer_id)
        if previous is not None and previous is not link:
            self._close(previous, "replaced by a newer connection")  # the peer restarted
        self._handshaking.discard(link)
        self._links[link.peer_id] = link
        link.authenticated = True
        logger.info("raft link to %s open", link.peer_id)
        for group in self._groups.values():
            group.transport.peer_connected(link.peer_id)

    def _close(self, link: _Link, reason: str) -> None:
        if link.closed:
            return
        link.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(link.sock)
        link.sock.close()
        self._handshaking.discard(link)
        if link.peer_id is not None and self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
            if link.dialer:
                self._next_dial_seconds[link.peer_id] = time.monotonic() + LINK_RETRY_SECONDS
        if link.authenticated:
            logger.info("raft link to %s closed: %s", link.peer_id, reason)
            assert link.peer_id is not None
            for group in self._groups.values():
                group.transport.peer_disconnected(link.peer_id)
        else:
            logger.debug("raft connection closed before it was authenticated: %s", reason)

    # -- sending -------------------------------------------------------------------------------

    def send(self, peer_id: str, shard_id: str, message: dict[str, Any]) -> bool:
        """Queue one group's message for the peer; False when the peer is not connected."""
        link = self._links.get(peer_id)
        if link is None or not link.authenticated:
            return False
        encoded = encode_message(shard_id, message)
        link.pending.append(encoded)
        link.pending_bytes += len(encoded)
        if link.pending_bytes + len(link.outbound) > LINK_OUTBOUND_BYTES_MAX:
            self._close(link, f"peer does not read ({LINK_OUTBOUND_BYTES_MAX} bytes waiting)")
            return False
        return True

    def _flush_links(self) -> None:
        for link in list(self._links.values()):
            if link.pending and not link.closed:
                self._flush(link)

    def _flush(self, link: _Link) -> None:
        """Seal what is pending into frames of about FRAME_PACK_BYTES each (a larger message
        goes alone), so no frame comes near the receiver's limit however much a turn sent."""
        assert link.sealer is not None
        frame: list[bytes] = []
        frame_bytes = 0
        for message in link.pending:
            if frame and frame_bytes + len(message) > FRAME_PACK_BYTES:
                link.outbound += link.sealer.seal(b"".join(frame))
                frame, frame_bytes = [], 0
            frame.append(message)
            frame_bytes += len(message)
        link.outbound += link.sealer.seal(b"".join(frame))
        link.pending = []
        link.pending_bytes = 0
        link.last_sent_seconds = time.monotonic()
        self._write(link)


def _listen(address: str) -> socket.socket:
    """Bind exactly the configured address (never a wildcard); a port still held by a process
    that just exited is retried for a few seconds."""
    host, _, port = address.rpartition(":")
    for attempt in range(BIND_ATTEMPTS_MAX):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as error:
            sock.close()
            if error.errno != errno.EADDRINUSE or attempt == BIND_ATTEMPTS_MAX - 1:
                raise OSError(f"cannot listen for Raft on {address}: {error.strerror}") from error
            time.sleep(BIND_RETRY_SECONDS)
            continue
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")
