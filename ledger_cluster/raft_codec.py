"""What the node-level Raft transport puts on the wire: the keys, the handshake, the sealed
frames and the encoding of PySyncObj's messages. Used only by `raft_loop`.

Keys. The cluster secret and the config's per-cluster salt (`cluster_id`) go through scrypt
once per process into a master key. Every connection then derives its own pair of keys (one per
direction) with HKDF from the master key and two fresh random nonces, one from each side, sent
in the clear handshake. Frames are sealed with AES-GCM under the sender's key and a counter
nonce that both sides keep: a frame replayed within a connection arrives with the wrong counter,
and one replayed from another connection under the wrong keys, so either fails to open.

Messages. PySyncObj's messages are dicts of strings, integers, booleans, bytes and tuples;
msgpack carries exactly those, so nothing read from the network is ever unpickled. A message
whose shape PySyncObj would trip over is refused here (MessageError), before it reaches it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ledger_cluster.errors import LedgerError
from ledger_cluster.limits import NODE_MESSAGE_BYTES_MAX

PROTOCOL_MAGIC = b"LCRAFT01"
HANDSHAKE_NONCE_BYTES = 32
NODE_ID_BYTES_MAX = 64
KEY_BYTES = 32
# scrypt's cost: about 50 ms once per process start, so guessing a weak secret from a captured
# handshake costs the same per guess.
SCRYPT_COST = 2**14
SCRYPT_BLOCK_SIZE = 8
SCRYPT_PARALLELISM = 1
MASTER_KEY_CONTEXT = b"ledger-cluster raft transport v1"
LINK_KEY_CONTEXT = b"ledger-cluster raft link v1"
FRAME_HEADER = struct.Struct(">I")
GCM_TAG_BYTES = 16
# The first frame each side sends is empty: it proves the key before anything else is taken.
KEY_PROOF_FRAME_BYTES = GCM_TAG_BYTES
NONCE_PREFIX = bytes(4)
# A frame holds messages up to about 1 MiB together, or one larger message alone: at most one
# append batch of entries (replica.APPEND_ENTRIES_BATCH_BYTES_MAX, twice a node command).
FRAME_BYTES_MAX = 4 * NODE_MESSAGE_BYTES_MAX

# The message types PySyncObj sends between group members, and the fields each one needs.
_REQUIRED_FIELDS: dict[str, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    "request_vote": (("term", int), ("last_log_index", int), ("last_log_term", int)),
    "response_vote": (("term", int),),
    "append_entries": (("term", int), ("commit_index", int)),
    "next_node_idx": (("next_node_idx", int), ("reset", bool), ("success", bool)),
    "apply_command": (("command", bytes),),
    "apply_command_response": (("request_id", int),),
    "timeout_now": (("term", int),),
}


class HandshakeError(LedgerError):
    """A peer's hello that is malformed, or names the wrong nodes."""


class FrameError(LedgerError):
    """A frame that fails authentication or exceeds the size limit; the connection is closed."""


class MessageError(LedgerError):
    """An authenticated frame whose content is not a well-formed PySyncObj message."""


def master_key(secret: str, cluster_id: str) -> bytes:
    """The cluster's transport key, from its secret and its per-cluster salt."""
    kdf = Scrypt(
        salt=MASTER_KEY_CONTEXT + bytes.fromhex(cluster_id),
        length=KEY_BYTES,
        n=SCRYPT_COST,
        r=SCRYPT_BLOCK_SIZE,
        p=SCRYPT_PARALLELISM,
    )
    return kdf.derive(secret.encode("utf-8"))


@dataclass(frozen=True)
class Hello:
    sender_node_id: str
    receiver_node_id: str
    nonce: bytes


def new_nonce() -> bytes:
    return os.urandom(HANDSHAKE_NONCE_BYTES)


def encode_hello(hello: Hello) -> bytes:
    sender = hello.sender_node_id.encode("ascii")
    receiver = hello.receiver_node_id.encode("ascii")
    return PROTOCOL_MAGIC + bytes([len(sender)]) + sender + bytes([len(receiver)]) + receiver + hello.nonce


def decode_hello(buffer: bytes | bytearray) -> tuple[Hello, int] | None:
    """The hello at the start of `buffer` and its length, or None while it is incomplete."""
    offset = len(PROTOCOL_MAGIC)
    if len(buffer) < offset + 1:
        if bytes(buffer) != PROTOCOL_MAGIC[: len(buffer)]:
            raise HandshakeError("the peer does not speak this transport")
        return None
    if bytes(buffer[:offset]) != PROTOCOL_MAGIC:
        raise HandshakeError("the peer does not speak this transport (or another version of it)")
    names = []
    for _ in range(2):
        if len(buffer) < offset + 1:
            return None
        length = buffer[offset]
        if not 1 <= length <= NODE_ID_BYTES_MAX:
            raise HandshakeError(f"a node id of {length} bytes")
        if len(buffer) < offset + 1 + length:
            return None
        try:
            names.append(bytes(buffer[offset + 1 : offset + 1 + length]).decode("ascii"))
        except UnicodeDecodeError:
            raise HandshakeError("a node id that is not ASCII") from None
        offset += 1 + length
    if len(buffer) < offset + HANDSHAKE_NONCE_BYTES:
        return None
    nonce = bytes(buffer[offset : offset + HANDSHAKE_NONCE_BYTES])
    return Hello(names[0], names[1], nonce), offset + HANDSHAKE_NONCE_BYTES


class FrameSealer:
    """Seals this side's frames of one connection: AES-GCM, counter nonces, the length header
    as associated data."""

    def __init__(self, key: bytes) -> None:
        self._cipher = AESGCM(key)
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        header = FRAME_HEADER.pack(len(plaintext) + GCM_TAG_BYTES)
        nonce = NONCE_PREFIX + self._counter.to_bytes(8, "big")
        self._counter += 1
        return header + self._cipher.encrypt(nonce, plaintext, header)


class FrameOpener:
    """Opens the peer's frames of one connection, in order; any failure ends the connection."""

    def __init__(self, key: bytes) -> None:
        self._cipher = AESGCM(key)
        self._counter = 0

    def take(self, buffer: bytearray, length_max: int | None = None) -> bytes | None:
        """Remove the first whole frame from `buffer` and return its plaintext; None while the
        frame is incomplete. Raises FrameError, also for a frame longer than `length_max`
        (sealed bytes; default FRAME_BYTES_MAX)."""
        if len(buffer) < FRAME_HEADER.size:
            return None
        (length,) = FRAME_HEADER.unpack_from(buffer)
        if not GCM_TAG_BYTES <= length <= (FRAME_BYTES_MAX if length_max is None else length_max):
            raise FrameError(f"a frame of {length} bytes")
        end = FRAME_HEADER.size + length
        if len(buffer) < end:
            return None
        header = bytes(buffer[: FRAME_HEADER.size])
        sealed = bytes(buffer[FRAME_HEADER.size : end])
        del buffer[:end]
        nonce = NONCE_PREFIX + self._counter.to_bytes(8, "big")
        try:
            plaintext = self._cipher.decrypt(nonce, sealed, header)
        except InvalidTag:
            raise FrameError("a frame that fails authentication (forged, replayed or reordered)") from None
        self._counter += 1
        return plaintext


def link_keys(master: bytes, dialer: Hello, acceptor: Hello) -> tuple[bytes, bytes]:
    """(dialer-to-acceptor key, acceptor-to-dialer key) of one connection."""
    info = LINK_KEY_CONTEXT + b"|" + dialer.sender_node_id.encode() + b"|" + acceptor.sender_node_id.encode()
    material = HKDF(
        algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=dialer.nonce + acceptor.nonce, info=info
    ).derive(master)
    return material[:KEY_BYTES], material[KEY_BYTES:]


def encode_message(shard_id: str, message: dict[str, Any]) -> bytes:
    """One message of one shard's group; a frame's plaintext is a run of these."""
    packed: bytes = msgpack.packb((shard_id, message), use_bin_type=True)
    return packed


def decode_messages(plaintext: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (shard id, message) pairs of a frame. Raises MessageError."""
    unpacker = msgpack.Unpacker(
        raw=False, use_list=False, strict_map_key=True, max_buffer_size=max(len(plaintext), 1)
    )
    unpacker.feed(plaintext)
    try:
        for item in unpacker:
            yield _checked(item)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise MessageError(f"undecodable message: {error}") from error


def _checked(item: Any) -> tuple[str, dict[str, Any]]:
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
        raise MessageError("a message must be a (shard id, fields) pair")
    shard_id, message = item
    if not isinstance(message, dict):
        raise MessageError("a message's fields must be a map")
    kind = message.get("type")
    required = _REQUIRED_FIELDS.get(kind) if isinstance(kind, str) else None
    if required is None:
        raise MessageError(f"unknown message type {kind!r}")
    for name, field_type in required:
        value = message.get(name)
        if not isinstance(value, field_type) or (field_type is int and isinstance(value, bool)):
            raise MessageError(f"{kind}.{name} is {type(value).__name__}")
    if kind == "append_entries":
        _check_append_entries(message)
    return shard_id, message


def _check_append_entries(message: dict[str, Any]) -> None:
    # PySyncObj unpickles the chunks of a 'transmission'; this transport never sends one (the
    # append batch limit exceeds any entry), so one arriving is refused rather than unpickled.
    if "transmission" in message:
        raise MessageError("append_entries with a pickled transmission")
    if "prevLogIdx" in message:
        if not isinstance(message.get("prevLogIdx"), int) or not isinstance(message.get("prevLogTerm"), int):
            raise MessageError("append_entries with a bad previous entry")
        entries = message.get("entries", ())
        if not isinstance(entries, tuple) or not all(_is_entry(entry) for entry in entries):
            raise MessageError("append_entries with malformed entries")
    serialized = message.get("serialized")
    if serialized is False:  # the leader could not read its dump: nothing to install
        message["serialized"] = serialized = None
    if serialized is not None and not (
        isinstance(serialized, tuple)
        and len(serialized) == 3
        and isinstance(serialized[0], bytes)
        and all(isinstance(flag, bool) for flag in serialized[1:])
    ):
        raise MessageError("append_entries with a malformed snapshot chunk")


def _is_entry(entry: Any) -> bool:
    return (
        isinstance(entry, tuple)
        and len(entry) == 3
        and isinstance(entry[0], bytes)
        and isinstance(entry[1], int)
        and isinstance(entry[2], int)
    )
