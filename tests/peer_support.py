"""Helpers for the peer-tier tests: chunks of random bytes, a memory source over them, and peers that
misbehave on purpose (garbage, a death mid-transfer, silence, a corrupt or oversized chunk)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lmcache_connector.tiers.peer import auth
from lmcache_connector.tiers.peer.addresses import PeerAddress
from lmcache_connector.tiers.peer.client import ChunkWant
from lmcache_connector.tiers.peer.protocol import (
    FRAME_BYTES,
    FrameType,
    auth_frame,
    frame_header,
    hello_frame,
    parse_frame_header,
    welcome_frame,
)
from lmcache_connector.tiers.peer.source import Shape, SlotTable
from lmcache_connector.tiers.remote.value import ValueHeader, encode_value_bytes

NAMESPACE = "5eed" * 8  # a namespace digest, hex
OTHER_NAMESPACE = "07e4" * 8
REGIONS, ROW = 2, 64
MAX_BLOCKS = 4
TOKEN = b"a-token-of-the-deployment-0123456789"


@dataclass(frozen=True)
class Chunk:
    block_fps: tuple[bytes, ...]
    data: bytes

    @property
    def key(self) -> bytes:
        return self.block_fps[-1]

    @property
    def shape(self) -> Shape:
        return (REGIONS, len(self.block_fps), ROW)

    def want(self) -> tuple[ChunkWant, bytearray]:
        """What a client asks for this chunk, and the buffer its bytes land in."""
        buffer = bytearray(len(self.data))
        return ChunkWant(self.block_fps, self.shape, [memoryview(buffer)]), buffer


def make_chunk(num_blocks: int = MAX_BLOCKS) -> Chunk:
    return Chunk(tuple(os.urandom(16) for _ in range(num_blocks)), os.urandom(REGIONS * num_blocks * ROW))


class PoolSource:
    """A memory pool of slots (``[slot][region][block][row]``) behind a :class:`SlotTable`, as a
    worker keeps it; ``during_copy`` runs in the middle of every copy (to overwrite a slot then)."""

    def __init__(self, num_slots: int = 8, lending: bool = False):
        self.slot_bytes = REGIONS * MAX_BLOCKS * ROW
        self.pool = bytearray(num_slots * self.slot_bytes)
        self.table = SlotTable(num_slots, self._copy_out, self._view_out if lending else None)
        self.next_slot = 0
        self.copies = 0
        self.during_copy: Callable[[int], None] | None = None
        # With ``lending``: runs (with the chunk's key) once a lent chunk was hashed and confirmed,
        # before it is sent.
        self.during_send: Callable[[bytes], None] | None = None

    def add(self, chunk: Chunk) -> int:
        slot = self.next_slot
        self.next_slot += 1
        self.table.overwriting(slot)
        n = len(chunk.block_fps)
        for region in range(REGIONS):
            start = slot * self.slot_bytes + region * MAX_BLOCKS * ROW
            self.pool[start : start + n * ROW] = chunk.data[region * n * ROW : (region + 1) * n * ROW]
        self.table.holds(slot, chunk.key, chunk.block_fps, chunk.shape)
        return slot

    def rewrite(self, slot: int) -> None:
        """The worker reuses ``slot`` for other bytes."""
        self.table.overwriting(slot)
        start = slot * self.slot_bytes
        self.pool[start : start + self.slot_bytes] = os.urandom(self.slot_bytes)

    def _view_out(self, slot: int, shape: Shape) -> list[memoryview]:
        regions, n, row = shape
        start = slot * self.slot_bytes
        return [memoryview(self.pool)[start + r * MAX_BLOCKS * row :][: n * row] for r in range(regions)]

    def _copy_out(self, slot: int, shape: Shape, into: memoryview) -> None:
        self.copies += 1
        regions, n, row = shape
        for region in range(regions):
            start = slot * self.slot_bytes + region * MAX_BLOCKS * row
            into[region * n * row : (region + 1) * n * row] = self.pool[start : start + n * row]
            if region == 0 and self.during_copy is not None:
                self.during_copy(slot)

    def read(self, key, block_fps, scratch):
        return self.table.read(key, block_fps, scratch)

    def lend(self, key, block_fps):
        lent = self.table.lend(key, block_fps)
        hook = self.during_send
        if lent is None or hook is None:
            return lent
        calls = []

        def confirm() -> bool:
            ok = lent.confirm()
            if not calls:  # the server's check before the send: the send comes next
                calls.append(1)
                hook(key)
            return ok

        return type(lent)(lent.shape, lent.regions, confirm)


def free_ports(count: int) -> int:
    """A port such that it and the ``count - 1`` after it are free now (an instance's peer servers
    listen on ``LMCACHE_DISTRIBUTED_URL``'s port + each worker's rank)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        probes = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                probes.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in probes:
                sock.close()
    raise RuntimeError("no run of free ports")


# ---------------------------------------------------------------- peers that misbehave


def recv_all(sock: socket.socket, timeout: float = 2.0) -> bytes:
    """Everything the other side sends until it closes (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return bytes(data)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def frames(data: bytes) -> list[tuple[FrameType, int, bytes]]:
    """The frames in a byte stream: ``(type, tag, payload)``."""
    out, offset = [], 0
    while offset + FRAME_BYTES <= len(data):
        frame = parse_frame_header(data[offset : offset + FRAME_BYTES])
        offset += FRAME_BYTES
        out.append((frame.type, frame.tag, data[offset : offset + frame.length]))
        offset += frame.length
    return out


def raw_handshake(sock: socket.socket, token: bytes | None = None) -> None:
    """The client half of the handshake on a plain socket."""
    hello = parse_frame_header(recv_exactly(sock, FRAME_BYTES))
    server_nonce = recv_exactly(sock, hello.length)
    client_nonce = auth.new_nonce()
    proof = auth.client_proof(token, server_nonce, client_nonce) if token else None
    sock.sendall(auth_frame(client_nonce, proof))
    welcome = parse_frame_header(recv_exactly(sock, FRAME_BYTES))
    recv_exactly(sock, welcome.length)


def value_of(chunk: Chunk, namespace: str = NAMESPACE, rank: str = "tp0pp0") -> bytes:
    header = ValueHeader(namespace, rank, chunk.key.hex(), tuple(fp.hex() for fp in chunk.block_fps), chunk.shape)
    return encode_value_bytes(header, [memoryview(chunk.data)])


class FakePeer:
    """A listener whose connections run ``behave(sock, chunks)``, after an honest handshake unless
    ``handshake`` is False. ``chunks`` are the chunks it "holds"; ``connections`` counts accepts,
    ``dialled_at`` and ``ended_at`` hold when each connection was accepted and when it ended
    (``time.monotonic()``), so a test can tell how long a client stayed away after a failure."""

    def __init__(self, behave: Callable[[socket.socket, list[Chunk]], None], chunks=(), handshake: bool = True):
        self.behave, self.chunks, self.handshake = behave, list(chunks), handshake
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = PeerAddress("127.0.0.1", self.listener.getsockname()[1])
        self.connections = 0
        self.dialled_at: list[float] = []
        self.ended_at: list[float] = []
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.dialled_at.append(time.monotonic())
            self.connections += 1
            self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            if self.handshake:
                sock.sendall(hello_frame(auth.new_nonce(), auth_required=False))
                head = parse_frame_header(recv_exactly(sock, FRAME_BYTES))
                recv_exactly(sock, head.length)
                sock.sendall(welcome_frame(None, 64))
                head = parse_frame_header(recv_exactly(sock, FRAME_BYTES))
                recv_exactly(sock, head.length)
            self.behave(sock, self.chunks)
        except OSError:
            pass
        finally:
            sock.close()
            self.ended_at.append(time.monotonic())

    def wait_all_ended(self, timeout_s: float = 10) -> None:
        """Until every connection accepted so far has ended (the client hung up)."""
        deadline = time.monotonic() + timeout_s
        while len(self.ended_at) < self.connections:
            assert time.monotonic() < deadline, f"{self.connections - len(self.ended_at)} connections never ended"
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(2)


def counts_reaching(take_counts: Callable[[], dict[str, float]], timeout_s: float = 2.0, **least: float) -> dict:
    """``take_counts()`` summed until every counter in ``least`` reached its value (or the timeout):
    a server counts a chunk just after sending it, so its client can finish a moment before."""
    counts: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for name, amount in take_counts().items():
            counts[name] = counts.get(name, 0) + amount
        if all(counts.get(name, 0) >= amount for name, amount in least.items()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.01)


def found_frame(chunk: Chunk, tag: int = 0, value: bytes | None = None, length: int | None = None) -> bytes:
    value = value_of(chunk) if value is None else value
    return frame_header(FrameType.FOUND, len(value) if length is None else length, tag=tag) + value


def hold_until_closed(sock: socket.socket) -> None:
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


BEHAVIOURS: dict[str, Callable[[socket.socket, list[Chunk]], None]] = {
    "garbage": lambda sock, chunks: (sock.sendall(os.urandom(4096)), hold_until_closed(sock)),
    "dies mid-transfer": lambda sock, chunks: sock.sendall(found_frame(chunks[0])[:-100]),
    "never answers": lambda sock, chunks: hold_until_closed(sock),
    "sends a corrupt chunk": lambda sock, chunks: (
        sock.sendall(found_frame(chunks[0], value=value_of(chunks[0])[:-1] + b"\x00")),
        hold_until_closed(sock),
    ),
    "sends an oversized frame": lambda sock, chunks: (
        sock.sendall(frame_header(FrameType.FOUND, 1 << 31, tag=0) + b"\x00" * 64),
        hold_until_closed(sock),
    ),
    "sends another chunk": lambda sock, chunks: (
        sock.sendall(found_frame(chunks[0], value=value_of(chunks[1]) if len(chunks) > 1 else b"")),
        hold_until_closed(sock),
    ),
    "answers out of order": lambda sock, chunks: (sock.sendall(found_frame(chunks[0], tag=5)), hold_until_closed(sock)),
    "speaks another version": lambda sock, chunks: (
        sock.sendall(struct.pack("<4sHBBII", b"LMCP", 99, FrameType.MISSING, 0, 0, 0)),
        hold_until_closed(sock),
    ),
}
