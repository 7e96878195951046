"""The node-level Raft transport over real sockets on 127.0.0.1: a node's real `RaftLoop`
(listener, handshake, sealed frames, delivery to a shard's transport) against a peer played by
the test with the codec, so the test can forge, replay and reorder frames. Whether a forged frame
reaches a real cluster's state is checked in tests/test_cluster.py."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
from pysyncobj.node import Node

from ledger_cluster import metrics
from ledger_cluster.localcluster.processes import LOOPBACK_HOST, free_port
from ledger_cluster.raft_codec import (
    FRAME_BYTES_MAX,
    FRAME_HEADER,
    FrameOpener,
    FrameSealer,
    Hello,
    decode_hello,
    decode_messages,
    encode_hello,
    encode_message,
    link_keys,
    master_key,
    new_nonce,
)
from ledger_cluster.raft_loop import FRAME_PACK_BYTES, RaftLoop, ShardTransport

CLUSTER_ID = "0123456789abcdef0123456789abcdef"
SECRET = "a test secret that is long enough to pass for real"
SHARD_ID = "shard-00"
# The node under test is node02; the test plays node01, which dials it (the smaller id dials).
NODE_ID = "node02"
PEER_ID = "node01"
WAIT_SECONDS = 5.0
POLL_SECONDS = 0.01
RECEIVE_BYTES = 65536


@pytest.fixture(scope="module")
def key() -> bytes:
    return master_key(SECRET, CLUSTER_ID)


class Received:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.connected: list[str] = []

    def on_message(self, node: Node, message: dict[str, Any]) -> None:
        self.messages.append((str(node.id), message))

    def on_connected(self, node: Node) -> None:
        self.connected.append(str(node.id))


class NodeUnderTest:
    def __init__(self, loop: RaftLoop, transport: ShardTransport, received: Received, port: int) -> None:
        self.loop = loop
        self.transport = transport
        self.received = received
        self.port = port


def broken(error: BaseException) -> NoReturn:
    raise AssertionError(f"the loop found its node broken: {error!r}")


@pytest.fixture
def node(key: bytes) -> Iterator[NodeUnderTest]:
    port = free_port()
    loop = RaftLoop(
        NODE_ID, f"{LOOPBACK_HOST}:{port}", {PEER_ID: f"{LOOPBACK_HOST}:{free_port()}"}, key, broken
    )
    transport = loop.new_transport(SHARD_ID, [Node(PEER_ID)])
    received = Received()
    transport.setOnMessageReceivedCallback(received.on_message)
    transport.setOnNodeConnectedCallback(received.on_connected)
    loop.add_group(transport, lambda: None, needs_sync=lambda: False, begin_sync=lambda: lambda: None)
    loop.start()
    try:
        yield NodeUnderTest(loop, transport, received, port)
    finally:
        loop.stop()


class Peer:
    """node01's side of one connection, driven by hand."""

    def __init__(self, port: int, key: bytes, *, prove_key: bool = True) -> None:
        self.sock = socket.create_connection((LOOPBACK_HOST, port), timeout=WAIT_SECONDS)
        hello = Hello(PEER_ID, NODE_ID, new_nonce())
        self.sock.sendall(encode_hello(hello))
        buffer = bytearray()
        answer = None
        while answer is None:
            buffer += self.sock.recv(RECEIVE_BYTES)
            answer = decode_hello(buffer)
        their_hello, length = answer
        del buffer[:length]
        outgoing, incoming = link_keys(key, hello, their_hello)
        self.sealer = FrameSealer(outgoing)
        self.opener = FrameOpener(incoming)
        self.inbound = buffer
        if prove_key:
            self.send(self.sealer.seal(b""))  # the empty first frame, as a node sends it

    def frame(self, *messages: dict[str, Any]) -> bytes:
        return self.sealer.seal(b"".join(encode_message(SHARD_ID, message) for message in messages))

    def send(self, data: bytes) -> None:
        # A node that already closed the connection (a bad key) is what some tests wait for.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def closed_by_node(self) -> bool:
        """Whether the node closes this connection within the wait."""
        deadline = time.monotonic() + WAIT_SECONDS
        self.sock.settimeout(POLL_SECONDS)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(RECEIVE_BYTES)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
            if not chunk:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def vote(term: int) -> dict[str, Any]:
    return {"type": "response_vote", "term": term}


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)


def rejected(reason: str) -> float:
    value = metrics.RAFT_FRAMES_REJECTED.labels(reason=reason)._value.get()
    return float(value)


def test_a_peer_with_the_key_is_connected_and_its_messages_delivered_in_order(
    node: NodeUnderTest, key: bytes
) -> None:
    peer = Peer(node.port, key)
    try:
        peer.send(peer.frame(vote(1), vote(2)) + peer.frame(vote(3)))
        wait_for(lambda: len(node.received.messages) == 3, "three messages")
        assert [message["term"] for _, message in node.received.messages] == [1, 2, 3]
        assert node.received.connected == [PEER_ID]
        assert all(sender == PEER_ID for sender, _ in node.received.messages)
    finally:
        peer.close()


def test_a_replayed_frame_is_dropped_and_ends_the_connection(node: NodeUnderTest, key: bytes) -> None:
    peer = Peer(node.port, key)
    before = rejected("frame")
    try:
        recorded = peer.frame(vote(7))
        peer.send(recorded)
        wait_for(lambda: len(node.received.messages) == 1, "the original")
        peer.send(recorded)  # the same bytes again, on the same connection
        assert peer.closed_by_node()
    finally:
        peer.close()
    assert rejected("frame") == before + 1
    # A new connection has new keys: the recorded frame does not open there either.
    second = Peer(node.port, key)
    try:
        second.send(recorded)
        assert second.closed_by_node()
    finally:
        second.close()
    assert rejected("frame") == before + 2
    assert [message["term"] for _, message in node.received.messages] == [7]


def test_a_frame_sealed_without_the_cluster_key_is_dropped(node: NodeUnderTest, key: bytes) -> None:
    # Counted before the forger connects: its first frame (the key proof, sealed with the wrong
    # key) leaves inside Peer() and may be rejected before the constructor returns.
    before = rejected("frame")
    forger = Peer(node.port, master_key("a different secret, also long enough to pass", CLUSTER_ID))
    try:
        forger.send(forger.frame(vote(9)))
        assert forger.closed_by_node()
    finally:
        forger.close()
    assert rejected("frame") == before + 1
    assert node.received.messages == []
    assert node.received.connected == [], "a peer that never proved the key is never connected"


def test_a_tampered_frame_is_dropped(node: NodeUnderTest, key: bytes) -> None:
    peer = Peer(node.port, key)
    before = rejected("frame")
    try:
        frame = bytearray(peer.frame(vote(4)))
        frame[-1] ^= 1
        peer.send(bytes(frame))
        assert peer.closed_by_node()
    finally:
        peer.close()
    assert rejected("frame") == before + 1
    assert node.received.messages == []


def test_a_pickled_transmission_is_refused_even_from_a_peer_with_the_key(
    node: NodeUnderTest, key: bytes
) -> None:
    peer = Peer(node.port, key)
    before = rejected("message")
    try:
        chunk = {
            "type": "append_entries",
            "term": 1,
            "commit_index": 0,
            "prevLogIdx": 0,
            "prevLogTerm": 0,
            "transmission": "start",
            "data": b"\x80\x04",
        }
        peer.send(peer.frame(chunk))
        assert peer.closed_by_node()
    finally:
        peer.close()
    assert rejected("message") == before + 1
    assert node.received.messages == []


def test_a_hello_from_a_node_that_may_not_dial_is_refused(node: NodeUnderTest) -> None:
    sock = socket.create_connection((LOOPBACK_HOST, node.port), timeout=WAIT_SECONDS)
    before = rejected("handshake")
    try:
        sock.sendall(encode_hello(Hello("node99", NODE_ID, new_nonce())))
        sock.settimeout(WAIT_SECONDS)
        assert sock.recv(RECEIVE_BYTES) == b""
    finally:
        sock.close()
    assert rejected("handshake") == before + 1


def test_messages_the_node_sends_arrive_sealed_for_the_peer(node: NodeUnderTest, key: bytes) -> None:
    peer = Peer(node.port, key)
    try:
        peer.send(peer.frame(vote(1)))
        wait_for(lambda: node.received.connected == [PEER_ID], "the connection")

        def send_from_the_group() -> None:
            assert node.transport.send(Node(PEER_ID), vote(5))

        node.loop.call_soon(send_from_the_group)
        peer.sock.settimeout(WAIT_SECONDS)
        terms: list[int] = []
        while 5 not in terms:
            peer.inbound += peer.sock.recv(RECEIVE_BYTES)
            while (plaintext := peer.opener.take(peer.inbound)) is not None:
                terms.extend(message["term"] for _, message in decode_messages(plaintext))
        assert terms == [5]
    finally:
        peer.close()


def test_a_peer_that_has_not_proved_the_key_cannot_announce_a_large_frame(
    node: NodeUnderTest, key: bytes
) -> None:
    forger = Peer(
        node.port, master_key("a different secret, also long enough to pass", CLUSTER_ID), prove_key=False
    )
    before = rejected("frame")
    try:
        forger.send(FRAME_HEADER.pack(FRAME_BYTES_MAX))  # the header alone: nothing to buffer
        assert forger.closed_by_node()
    finally:
        forger.close()
    assert rejected("frame") == before + 1


def test_what_a_turn_sends_is_sealed_into_frames_of_bounded_size(node: NodeUnderTest, key: bytes) -> None:
    peer = Peer(node.port, key)
    big_message_count = 12
    try:
        peer.send(peer.frame(vote(1)))
        wait_for(lambda: node.received.connected == [PEER_ID], "the connection")

        def send_a_lot() -> None:
            for term in range(big_message_count):
                message = {"type": "apply_command", "command": bytes(FRAME_PACK_BYTES // 4), "term": term}
                assert node.transport.send(Node(PEER_ID), message)

        node.loop.call_soon(send_a_lot)
        peer.sock.settimeout(WAIT_SECONDS)
        frame_sizes: list[int] = []
        received = 0
        while received < big_message_count:
            peer.inbound += peer.sock.recv(RECEIVE_BYTES)
            while len(peer.inbound) >= FRAME_HEADER.size:
                (length,) = FRAME_HEADER.unpack_from(peer.inbound)
                plaintext = peer.opener.take(peer.inbound)
                if plaintext is None:
                    break
                messages = list(decode_messages(plaintext))
                if messages:
                    frame_sizes.append(length)
                received += len(messages)
        assert len(frame_sizes) > 1, "one turn's messages went out in several frames"
        assert max(frame_sizes) <= FRAME_PACK_BYTES + FRAME_PACK_BYTES // 4 + 1024
    finally:
        peer.close()
